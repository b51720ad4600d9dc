"""Raw-event data that would train on empty windows, refused (or warned about) when the dataset is opened:
an ms_to_idx that does not index the events, labels outside the events' time range (t_offset mistakes),
DDD17 index rows pointing nowhere; a rectify map of the wrong shape; window_ms beside window_events."""

import h5py
import numpy as np
import pytest

import setup
import train
from data.events.common import EmptyWindowWarning, EventSettings
from data.events.ddd17_events import DDD17Events
from data.events.dsec import DSECSemantic
from tests.conftest import one_line_error
from tests.event_fixtures import uniform, write_ddd17_recording, write_dsec_sequence, write_rectify_map

T_OFFSET = 1_600_000_000_000_000  # us
STAMPS = T_OFFSET + 50_000 * np.arange(1, 11)  # labels every 50 ms, events from 0 to 520 ms


def dsec_root(root, stamps=STAMPS, height=16, width=32, rows_below=4, gap=None, offset_stored=True):
    """One train and one test sequence of small labels; events over 0..520 ms (none in `gap`, (start, end) us);
    offset_stored False: events.h5 without its t_offset."""
    t = np.sort(uniform(1, 4000, 0, 520_000))
    if gap is not None:
        t = t[(t < gap[0]) | (t >= gap[1])]
    events = dict(x=uniform(2, t.size, 0, width), y=uniform(3, t.size, 0, height + rows_below), t=t + T_OFFSET, p=t % 2)
    yy, xx = np.mgrid[0 : height + rows_below, 0:width].astype(np.float32)
    rmap = np.stack([width - 1 - xx, yy], axis=-1)
    labels = [np.zeros((height, width), dtype=np.uint8)] * len(stamps)
    for split in ("train", "test"):
        write_dsec_sequence(root / split / "zurich_city_00_a", events, rmap, labels, stamps, t_offset=T_OFFSET)
        if not offset_stored:
            with h5py.File(root / split / "zurich_city_00_a/events/left/events.h5", "r+") as f:
                del f["t_offset"]
    return root


def train_argv(root, tmp_path, *extra):
    return [
        *("--dataset", "dsec-semantic", "--data_root", str(root), "--dsec_labels", "all", "--img_size", "-1"),
        *("--model_type", "ann", "--arch", "dl-vgg9", "--epochs", "1", "--num_workers", "0", "--device", "cpu"),
        *("--model_dir", str(tmp_path / "runs"), *extra),
    ]


def test_ms_to_idx_of_zeros_is_refused_before_training(capsys, tmp_path):
    """The case of the report: ms_to_idx all zeros (the right shape, non-decreasing) gave all-zero inputs."""
    root = dsec_root(tmp_path / "root")
    events_h5 = root / "train/zurich_city_00_a/events/left/events.h5"
    with h5py.File(events_h5, "r+") as f:
        f["ms_to_idx"][...] = 0
    one_line_error(
        capsys, train.main, train_argv(root, tmp_path), f"{events_h5}: ms_to_idx does not index events/t", "entry"
    )


@pytest.mark.parametrize(
    "stamps, offset_stored, window",
    [
        (STAMPS - T_OFFSET, True, dict(window_ms=50)),  # timestamps.txt without t_offset: before the events
        (STAMPS, False, dict(window_ms=50)),  # events.h5 without t_offset: the labels lie long after the events
        (STAMPS + 3_000_000, True, dict(window_events=100)),  # 3 s late: count windows would be stale
    ],
    ids=["labels-before", "labels-after", "count-window-stale"],
)
def test_labels_outside_the_events_time_range_are_refused(tmp_path, stamps, offset_stored, window):
    root = dsec_root(tmp_path, stamps=stamps, offset_stored=offset_stored)
    with pytest.raises(ValueError, match=r"sequence zurich_city_00_a: none of its 10 windows holds events of its"):
        DSECSemantic(root, "train", settings=EventSettings(**window), labels="all")


def test_some_empty_windows_are_named_with_their_share(tmp_path):
    root = dsec_root(tmp_path, gap=(190_000, 360_000))  # the windows of the labels at 250, 300 and 350 ms
    with pytest.warns(EmptyWindowWarning, match=r"sequence zurich_city_00_a: 3 of its 10 windows \(30%\) hold no"):
        ds = DSECSemantic(root, "train", labels="all")
    # items 4..6 (labels at 250..350 ms) are empty; 3 (200 ms) sees 150..190 ms, 7 (400 ms) 360..400 ms
    assert [bool(ds[i][0].any()) for i in range(3, 8)] == [True, False, False, False, True]


def test_wrong_rectify_map_names_the_map(capsys, tmp_path):
    root = dsec_root(tmp_path / "small")
    rmap = root / "train/zurich_city_00_a/events/left/rectify_map.h5"
    write_rectify_map(rmap, np.zeros((20, 30, 2)))
    one_line_error(
        capsys, train.main, train_argv(root, tmp_path), f"{rmap}: rectify_map has shape [20, 30, 2], expected [H >= 16"
    )
    # DSEC's own labels (640 wide) need DSEC's 640x480 map: a transposed one is named as the culprit
    big = dsec_root(tmp_path / "big", height=440, width=640, rows_below=40)
    rmap = big / "train/zurich_city_00_a/events/left/rectify_map.h5"
    write_rectify_map(rmap, np.zeros((640, 480, 2)))
    with pytest.raises(ValueError, match=r"rectify_map has shape \[640, 480, 2\], expected \[480, 640, 2\]"):
        DSECSemantic(big, "train")
    write_rectify_map(rmap, np.full((480, 640, 2), -5.0))
    with pytest.raises(ValueError, match=r"rectify_map.h5: rectify_map sends every pixel outside the 640x480 frame"):
        DSECSemantic(big, "train")


def test_window_ms_and_window_events_together_are_refused(capsys, tmp_path):
    root = dsec_root(tmp_path / "root")
    both = ("--window_ms", "20", "--window_events", "100")
    one_line_error(capsys, train.main, train_argv(root, tmp_path, *both), "window_ms (20) and window_events (100)")
    config = tmp_path / "c.yaml"
    config.write_text("window_events: 32000\n")
    one_line_error(
        capsys, train.main, train_argv(root, tmp_path, "--config", str(config), "--window_ms", "10"), "both set"
    )
    # a given 50 is a given value, though it equals the default: the sources tell them apart
    argv = train_argv(root, tmp_path, "--window_ms", "50", "--window_events", "100")
    one_line_error(capsys, train.main, argv, "window_ms (50) and window_events (100)", "both set")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pth"))
    # the defaults do not count as given: either key alone is accepted
    for flags in (["--window_events", "100"], ["--window_ms", "20"]):
        cfg = setup.resolve_config(train.get_args_parser().parse_args(train_argv(root, tmp_path, *flags)))
        assert cfg["window_events"] == (100 if "--window_events" in flags else None)


# ----------------------------------------------------------------------------- DDD17
def ddd17_root(root, index_rows=None):
    """Seven recordings of 3000 events over 0.4 s, images every 50 ms, labels for images 6 and 8."""
    t0 = 1_487_339_175_000_000_123
    images = t0 + 50_000_000 * np.arange(1, 9)
    for d in range(7):
        t = t0 + np.sort(uniform(10 + d, 3000, 0, 400_000_000))
        x, y, p = uniform(20 + d, 3000, 0, 346), uniform(30 + d, 3000, 0, 260), t % 2
        label = np.zeros((200, 346), dtype=np.uint8)
        write_ddd17_recording(root / f"dir{d}", x, y, t, p, images, [label, label], [6, 8])
        if index_rows is not None:
            index = np.load(root / f"dir{d}/index/index_50ms.npy")
            index_rows(index, t)
            np.save(root / f"dir{d}/index/index_50ms.npy", index)
    return root


def test_ddd17_index_pointing_nowhere_is_refused(tmp_path):
    def past_the_end(index, t):
        index[5, 1] = t.size + 7

    root = ddd17_root(tmp_path / "a", past_the_end)
    with pytest.raises(ValueError, match=r"dir1/index/index_50ms.npy row 5 points at event 3007; .* has 3000"):
        DDD17Events(root, "val")

    def microseconds(index, t):  # another clock: the index's image times in us, events in ns
        index[:, 0] //= 1000

    root = ddd17_root(tmp_path / "b", microseconds)
    with pytest.raises(ValueError, match=r"index_50ms.npy: the row of image 6 .* the index does not belong"):
        DDD17Events(root, "val")


def test_ddd17_empty_windows(tmp_path):
    def nothing_before(index, t):
        index[:, 1:] = 0

    with pytest.raises(ValueError, match=r"recording .*dir1: 2 of its 2 windows hold no event"):
        DDD17Events(ddd17_root(tmp_path / "a", nothing_before), "val")

    def one_empty(index, t):  # the 50 ms window of image 6 (row 5): start at its end
        index[5, 2] = index[5, 1]

    root = ddd17_root(tmp_path / "b", one_empty)
    with pytest.warns(EmptyWindowWarning, match=r"recording .*dir1: 1 of its 2 windows \(50%\) hold no event"):
        ds = DDD17Events(root, "val", settings=EventSettings(window_ms=50))
    assert not ds[0][0].any() and ds[1][0].any()
    DDD17Events(root, "val")  # count windows end at the same index but hold the events before it: no warning
