"""dsec-semantic and ddd17-events on fixtures written here in the exact release formats: items against
brute-force references (window, rectification, representation, crop), label layouts, errors, and short
training runs through train.py whose labels are recoverable from the events only when both are aligned."""

import numpy as np
import pytest
import torch

import data
from data.events.common import EmptyWindowWarning, EventSettings
from data.events.ddd17_events import DDD17Events
from data.events.dsec import DSECSemantic
from tests.conftest import read_jsonl, run_script
from tests.event_fixtures import write_ddd17_recording, write_dsec_sequence, write_png
from tests.test_data_events import brute_voxel

T_OFFSET = 1_200_000_000
H, W = 480, 640


def real_rectify(x, y):
    """The fixture's rectification (mirror + stretch, fractional): raw (x, y) -> rectified."""
    return (W - 1 - x) + 0.25, 0.9 * y + 1.5


def real_map():
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    rx, ry = real_rectify(xx, yy)
    return np.stack([rx, ry], axis=-1)


@pytest.fixture(scope="module")
def real_size_root(tmp_path_factory):
    """One train sequence at DSEC's size: 480x640 sensor, 640x440 labels, 10 labels every 50 ms."""
    root = tmp_path_factory.mktemp("dsec")
    rng = np.random.default_rng(0)
    n = 3000
    t = np.sort(rng.integers(T_OFFSET, T_OFFSET + 520_000, n))
    t[1000:1010] = t[1000]  # equal timestamps
    events = dict(x=rng.integers(0, W, n), y=rng.integers(0, H, n), t=t, p=rng.integers(0, 2, n))
    keep = ~((events["t"] >= T_OFFSET + 300_000) & (events["t"] < T_OFFSET + 350_000))  # one silent window
    events = {k: v[keep] for k, v in events.items()}
    stamps = T_OFFSET + 50_000 * np.arange(1, 11)
    labels = [rng.integers(0, 11, (440, W)) for _ in stamps]
    labels[0][:5, :5] = 255
    write_dsec_sequence(root / "train/zurich_city_00_a", events, real_map(), labels, stamps, t_offset=T_OFFSET)
    return root, events, labels, stamps


def reference(events, t_end, settings, crop=440):
    """Brute force: window by comparison, rectification by formula, voxel/histogram by loops, torch norm."""
    t = events["t"]
    if settings.window_events is None:
        sel = np.flatnonzero((t >= t_end - settings.window_ms * 1000) & (t < t_end))
    else:
        sel = np.flatnonzero(t < t_end)[-settings.window_events :]
    rx, ry = real_rectify(events["x"][sel].astype(float), events["y"][sel].astype(float))
    if not sel.size:
        grid = np.zeros((settings.bins, settings.per_bin, H, W))
    elif settings.representation == "voxel":
        grid = brute_voxel(rx, ry, t[sel], events["p"][sel], settings.bins, H, W, settings.separate_polarity)
    else:  # histogram of a time window: ESS's DSEC loader counts each of B equal parts of the window apart
        grid = np.zeros((settings.bins, 2, H, W))
        part = settings.window_ms * 1000 / settings.bins
        for xi, yi, ti, pi in zip(rx, ry, t[sel], events["p"][sel]):
            s = int((ti - (t_end - settings.window_ms * 1000)) // part)
            if 0 <= int(np.floor(xi)) < W and 0 <= int(np.floor(yi)) < H:
                grid[s, 1 if pi else 0, int(np.floor(yi)), int(np.floor(xi))] += 1  # negative, then positive
    g = torch.from_numpy(grid).float()
    mask = g != 0
    if settings.normalize == "nonzero" and mask.any():
        g[mask] = (g[mask] - g[mask].mean()) / g[mask].std()
    return g[..., :crop, :]


@pytest.mark.filterwarnings("ignore::data.events.common.EmptyWindowWarning")  # the fixture's silent window
@pytest.mark.parametrize(
    "settings",
    [
        EventSettings(),  # voxel, 5 bins, 50 ms, nonzero normalisation
        EventSettings(window_events=700, separate_polarity=True, bins=3, normalize="none", as_timesteps=True),
        EventSettings(representation="histogram", bins=2, window_ms=120, normalize="none"),
    ],
    ids=["voxel-50ms", "voxel-count-split-polarity", "histogram"],
)
def test_items_match_brute_force(real_size_root, settings):
    root, events, labels, stamps = real_size_root
    ds = DSECSemantic(root, "train", settings=settings, labels="all")
    assert len(ds) == 10 and ds.sequences[0].layout == "ess-readme"
    for i in (0, 4, 9):
        x, y = ds[i]
        ref = reference(events, stamps[i], settings)
        expected = ref if settings.as_timesteps else ref.reshape(-1, 440, W)
        assert x.shape == expected.shape and x.dtype == torch.float32
        assert torch.allclose(x, expected, atol=1e-4), (i, (x - expected).abs().max())
        assert y.dtype == torch.int64 and np.array_equal(y.numpy(), labels[i])
    # rectification matters: without it the events land elsewhere
    x, _ = ds[4]
    unrectified = dict(events, x=events["x"], y=events["y"])
    assert not torch.allclose(x.reshape(-1, 440, W)[:1], reference_unrectified(unrectified, stamps[4], settings))


def reference_unrectified(events, t_end, settings):
    sel = np.flatnonzero((events["t"] >= t_end - 50_000) & (events["t"] < t_end))
    grid = np.zeros((1, H, W))
    for xi, yi in zip(events["x"][sel], events["y"][sel]):
        grid[0, yi, xi] += 1
    return torch.from_numpy(grid).float()[:, :440]


def test_silent_window_gives_empty_input_and_ess_label_selection(real_size_root):
    root, events, labels, stamps = real_size_root
    with pytest.warns(EmptyWindowWarning, match=r"sequence zurich_city_00_a: 1 of its 10 windows \(10%\) hold no"):
        ds = DSECSemantic(root, "train", labels="all")
    x, y = ds[6]  # the window (300, 350] ms holds no event
    assert not x.any() and np.array_equal(y.numpy(), labels[6])
    with pytest.warns(EmptyWindowWarning, match="1 of its 2 windows"):
        ess = DSECSemantic(root, "train")  # ESS: the first 6 labels dropped, then every second
    assert [ess.sample(i)[1] for i in range(len(ess))] == [6, 8]
    assert [ess.sample(i)[2] for i in range(len(ess))] == [int(stamps[6]), int(stamps[8])]


@pytest.mark.filterwarnings("ignore::data.events.common.EmptyWindowWarning")  # the fixture's silent window
def test_registry_and_config_keys(real_size_root):
    root, *_ = real_size_root
    cfg = dict(dataset="dsec-semantic", data_root=str(root), img_size=-1, dsec_labels="all", bins=4)
    info = data.dataset_info("dsec-semantic", cfg)
    assert info["num_classes"] == 11 and info["in_channels"] == 4 and info["class_names"][-1] == "traffic sign"
    assert data.dataset_info("dsec-semantic", dict(cfg, dsec_classes=19))["num_classes"] == 19
    assert data.dataset_info("dsec-semantic", dict(cfg, thl=True, timesteps=4))["in_channels"] == 1
    with pytest.raises(ValueError, match=r"bins \(4\) must equal timesteps \(3\)"):
        data.dataset_info("dsec-semantic", dict(cfg, thl=True, timesteps=3))
    ds = data.build_dataset(cfg, "train")
    assert ds[0][0].shape == (4, 440, 640)
    small = data.build_dataset(dict(cfg, img_size=[110, 160], augment=True), "train")
    x, y = small[0]
    assert x.shape == (4, 110, 160) and y.shape == (110, 160)
    with pytest.raises(FileNotFoundError, match="split folder .*test not found"):
        data.build_dataset(cfg, "val")  # val reads test/, absent here
    with pytest.raises(ValueError, match=r"dsec-semantic has splits \['test', 'train', 'val'\], got 'valid'"):
        DSECSemantic(root, "valid")
    with pytest.raises(ValueError, match="dsec_classes must be 11 or 19, got 15"):
        data.dataset_info("dsec-semantic", dict(cfg, dsec_classes=15))


def small_sequence(rng, n_labels, height=16, width=32, rows_below=4, classes=(8,)):
    """Labels with a large random rectangle per class (the first fires on events, the second off events)
    and the raw events of those pixels under the mirror map rect_x = W - 1 - x, plus noise."""
    xs, ys, ts, ps, labels = [], [], [], [], []
    stamps = T_OFFSET + 50_000 * np.arange(1, n_labels + 1)
    for t_label in stamps:
        label = np.zeros((height, width), dtype=np.uint8)
        for cls, pol in zip(classes, (1, 0)):
            h, w = rng.integers(height // 2, height - 3), rng.integers(width // 3, width // 2)
            y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            label[y0 : y0 + h, x0 : x0 + w] = cls
            yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
            for _ in range(2):
                xs.append(width - 1 - xx.ravel())
                ys.append(yy.ravel())
                ts.append(t_label - rng.integers(1000, 45_000, xx.size))
                ps.append(np.full(xx.size, pol))
        noise = 20
        xs.append(rng.integers(0, width, noise))
        ys.append(rng.integers(0, height + rows_below, noise))
        ts.append(t_label - rng.integers(1000, 45_000, noise))
        ps.append(rng.integers(0, 2, noise))
        labels.append(label)
    x, y, t, p = (np.concatenate(a) for a in (xs, ys, ts, ps))
    order = np.argsort(t, kind="stable")
    events = dict(x=x[order], y=y[order], t=t[order], p=p[order])
    yy, xx = np.mgrid[0 : height + rows_below, 0:width].astype(np.float32)
    rmap = np.stack([width - 1 - xx, yy], axis=-1)
    return events, rmap, labels, stamps


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Two train sequences (two layouts) and one test sequence (the flat layout) of 16x32 labels."""
    root = tmp_path_factory.mktemp("dsec-small")
    rng = np.random.default_rng(1)
    for split, name, layout, n in (
        ("train", "zurich_city_00_a", "ess-readme", 16),
        ("train", "zurich_city_01_a", "ess-code", 16),
        ("test", "zurich_city_13_a", "flat", 12),
    ):
        events, rmap, labels, stamps = small_sequence(rng, n)
        write_dsec_sequence(root / split / name, events, rmap, labels, stamps, layout=layout, t_offset=T_OFFSET)
    return root


def test_layouts_are_detected(small_root):
    train = DSECSemantic(small_root, "train", labels="all")
    assert [s.layout for s in train.sequences] == ["ess-readme", "ess-code"] and len(train) == 32
    test = DSECSemantic(small_root, "val", labels="all")
    assert [s.layout for s in test.sequences] == ["flat"] and len(test) == 12


def test_train_py_learns_aligned_dsec_fixture(small_root, tmp_path):
    run_script(
        "train.py",
        *("--dataset", "dsec-semantic", "--data_root", small_root, "--dsec_labels", "all", "--img_size", "-1"),
        *("--model_type", "ann", "--arch", "dl-vgg9", "--epochs", "3", "--batch_size", "4", "--optimizer", "adam"),
        *("--lr", "1e-3", "--weight_decay", "0", "--scheduler", "poly", "--num_workers", "0", "--device", "cpu"),
        *("--seed", "0", "--model_dir", tmp_path, "--name", "dsec"),
        timeout=600,
    )
    records = read_jsonl(tmp_path / "dsec" / "metrics.jsonl")
    # background and car: predicting background everywhere scores about 0.35; the events give every pixel away
    assert max(r["val_miou"] for r in records) > 0.6, records


def test_train_py_snn_with_bins_as_timesteps(tmp_path):
    rng = np.random.default_rng(9)
    for split, n in (("train", 8), ("test", 4)):
        events, rmap, labels, stamps = small_sequence(rng, n)
        write_dsec_sequence(tmp_path / "root" / split / "s", events, rmap, labels, stamps, t_offset=T_OFFSET)
    run_script(
        "train.py",
        *("--dataset", "dsec-semantic", "--data_root", tmp_path / "root", "--dsec_labels", "all", "--img_size", "-1"),
        *("--model_type", "snn", "--thl", "true", "--bins", "2", "--timesteps", "2", "--arch", "fcn-vgg9"),
        *("--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--device", "cpu"),
        *("--model_dir", tmp_path, "--name", "snn"),
        timeout=600,
    )
    cfg = (tmp_path / "snn" / "config.yaml").read_text()
    assert "encoder: sequence" in cfg and "in_channels: 1" in cfg


def test_dsec_errors(tmp_path, small_root):
    with pytest.raises(FileNotFoundError, match="split folder .*train not found"):
        DSECSemantic(tmp_path, "train")
    seq = tmp_path / "train" / "zurich_city_00_a"
    (seq / "semantic" / "11classes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no 11-class labels for sequence .*zurich_city_00_a: expected"):
        DSECSemantic(tmp_path, "train")
    rng = np.random.default_rng(2)
    events, rmap, labels, stamps = small_sequence(rng, 8)
    write_dsec_sequence(seq, events, rmap, labels, stamps[:7].tolist() + [stamps[7]], t_offset=T_OFFSET)
    (seq / "semantic/timestamps.txt").write_text("".join(f"{s}\n" for s in stamps[:7]))
    with pytest.raises(ValueError, match=r"timestamps.txt holds 7 timestamps for 8 label files"):
        DSECSemantic(tmp_path, "train")
    (seq / "semantic/timestamps.txt").write_text("".join(f"{s}\n" for s in stamps))
    write_png(seq / "semantic/left/11classes/data/000000.png", np.zeros((16, 30)))
    with pytest.raises(ValueError, match=r"000000.png is 30x16; expected 32 wide and at most 20 high"):
        DSECSemantic(tmp_path, "train")
    write_png(seq / "semantic/left/11classes/data/000000.png", np.full((16, 32), 12))
    with pytest.raises(ValueError, match=r"000000.png has values \[12\] outside 0..10 and 255"):
        DSECSemantic(tmp_path, "train", labels="all")[0]
    (seq / "events/left/events.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"cannot read HDF5 file .*events.h5"):
        DSECSemantic(tmp_path, "train")


def test_synthetic_raw_events_go_through_the_dsec_reader():
    cfg = dict(
        dataset="synthetic-events",
        raw_events=True,
        img_size=24,
        num_train=2,
        representation="histogram",
        event_norm="none",
    )
    ds = data.build_dataset(cfg, "train")
    assert isinstance(ds, DSECSemantic) and len(ds) == 40
    assert data.dataset_info("synthetic-events", cfg)["in_channels"] == 10  # 5 slices x 2 polarities
    on_object = off_object = 0.0
    for i in range(0, 40, 5):
        x, y = ds[i]
        counts = x.reshape(5, 2, 24, 24).sum((0, 1))
        on_object += counts[y > 0].mean().item()
        off_object += counts[y == 0].mean().item()
    # the moving textured objects fire; the static background only sees sensor noise
    assert on_object > 5 * off_object
    thl = data.build_dataset(dict(cfg, thl=True, timesteps=5), "train")
    assert thl[0][0].shape == (5, 2, 24, 24)


# ----------------------------------------------------------------------------- ddd17-events
def ddd17_recording(rng, n_labels, first_image=3):
    """Labels 200x346 with a large rectangle (vehicle, on events), events on its pixels
    in the 50 ms before each image; plus noise in the bottom 60 sensor rows, which are cropped."""
    xs, ys, ts, ps, labels = [], [], [], [], []
    image_times = 1_000_000_000 + 50_000_000 * np.arange(1, first_image + n_labels + 1)
    for t_img in image_times[first_image:]:
        label = np.zeros((200, 346), dtype=np.uint8)
        for cls, pol in ((5, 1),):
            h, w = rng.integers(90, 150), rng.integers(110, 170)
            y0, x0 = rng.integers(0, 200 - h), rng.integers(0, 346 - w)
            label[y0 : y0 + h, x0 : x0 + w] = cls
            yy, xx = np.mgrid[y0 : y0 + h : 2, x0 : x0 + w : 2]
            xs.append(xx.ravel())
            ys.append(yy.ravel())
            ts.append(t_img - rng.integers(1_000_000, 45_000_000, xx.size))
            ps.append(np.full(xx.size, pol))
        xs.append(rng.integers(0, 346, 200))
        ys.append(rng.integers(200, 260, 200))
        ts.append(t_img - rng.integers(1_000_000, 45_000_000, 200))
        ps.append(rng.integers(0, 2, 200))
        labels.append(label)
    x, y, t, p = (np.concatenate(a) for a in (xs, ys, ts, ps))
    order = np.argsort(t, kind="stable")
    numbers = list(range(first_image + 1, first_image + n_labels + 1))  # label n is image n-1 (0-based)
    return (x[order], y[order], t[order], p[order]), image_times, labels, numbers


@pytest.fixture(scope="module")
def ddd17_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddd17-events")
    rng = np.random.default_rng(4)
    recordings = {}
    for i in range(7):
        (x, y, t, p), image_times, labels, numbers = ddd17_recording(rng, 4 if i == 1 else 6)
        write_ddd17_recording(root / f"dir{i}", x, y, t, p, image_times, labels, numbers)
        recordings[i] = (x, y, t, p, image_times, labels, numbers)
    return root, recordings


def test_ddd17_events_splits_and_items_brute_force(ddd17_root):
    root, recs = ddd17_root
    settings = EventSettings(window_events=500, normalize="nonzero")
    val = DDD17Events(root, "val", settings=settings, img_size=(200, 346))  # the sensor's width: no resize
    assert [r.folder.name for r in val.recordings] == ["dir1"] and len(val) == 4
    assert [r.folder.name for r in DDD17Events(root, "train", settings=settings).recordings] == [
        f"dir{i}" for i in (0, 2, 3, 5, 6)
    ]
    assert [r.folder.name for r in DDD17Events(root, "test", settings=settings).recordings] == ["dir4"]
    x, y, t, p, image_times, labels, numbers = recs[1]
    for i in range(4):
        item_x, item_y = val[i]
        t_img = image_times[numbers[i] - 1]
        sel = np.flatnonzero(t < t_img)[-500:]
        grid = torch.from_numpy(brute_voxel(x[sel], y[sel], t[sel], p[sel], 5, 260, 346)).float()
        mask = grid != 0
        grid[mask] = (grid[mask] - grid[mask].mean()) / grid[mask].std(unbiased=False)  # ESS's DDD17 norm
        assert item_x.shape == (5, 200, 346)
        assert torch.allclose(item_x, grid.reshape(5, 260, 346)[:, :200], atol=1e-4)
        assert np.array_equal(item_y.numpy(), labels[i])
    timed = EventSettings(window_ms=20, representation="histogram", bins=1, normalize="none")
    for exact in (True, False):
        timed.ess_exact = exact
        hx, _ = DDD17Events(root, "val", settings=timed, img_size=(200, 346))[2]
        t_img = image_times[numbers[2] - 1]
        sel = (t >= t_img - 20_000_000) & (t < t_img)
        if exact:  # ESS's DDD17 time windows leave out the events of their last instant
            sel &= t < t[sel].max()
        expected = np.zeros((2, 260, 346))
        np.add.at(expected, (p[sel], y[sel], x[sel]), 1)  # negative, then positive
        assert np.array_equal(hx.numpy(), expected[:, :200])
    assert DDD17Events(root, "val", settings=settings)[0][0].shape == (5, 200, 352)  # ESS's width by default


def test_ddd17_events_errors(tmp_path, ddd17_root):
    root, _ = ddd17_root
    with pytest.raises(
        FileNotFoundError, match="holds 0 dir\\* recordings; expected <root>/dir\\*/ \\(7 recordings\\)"
    ):
        DDD17Events(tmp_path, "train")
    with pytest.raises(ValueError, match=r"ddd17-events has splits .*, got 'dev'"):
        DDD17Events(root, "dev")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    t_file = copy / "dir1" / "events.dat.t"
    t_file.write_bytes(t_file.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"events.dat.t .* do not hold the same number of events"):
        DDD17Events(copy, "val")


def test_train_py_learns_ddd17_events_fixture(ddd17_root, tmp_path):
    root, _ = ddd17_root
    run_script(
        "train.py",
        *("--dataset", "ddd17-events", "--data_root", root, "--img_size", "40", "64", "--window_events", "3000"),
        # no normalisation: the non-zero normalisation is centred, so the 5x downscaling averages it away;
        # no BN: 24 steps leave BN's running statistics far from the batch statistics the net trained with
        *("--event_norm", "none", "--bn", "false"),
        *("--model_type", "ann", "--arch", "dl-vgg9", "--epochs", "2", "--batch_size", "4", "--optimizer", "adam"),
        *("--lr", "1e-3", "--weight_decay", "0", "--scheduler", "poly", "--num_workers", "0", "--device", "cpu"),
        *("--seed", "0", "--model_dir", tmp_path, "--name", "ddd17"),
        timeout=600,
    )
    records = read_jsonl(tmp_path / "ddd17" / "metrics.jsonl")
    assert max(r["val_miou"] for r in records) > 0.6, records


def test_dataloader_workers_read_the_same_items(small_root):
    ds = DSECSemantic(small_root, "train", labels="all")
    direct = [ds[i] for i in range(8)]  # the main process opens its handles first; forked workers reopen theirs
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = [b for _, b in zip(range(2), loader)]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(xs, torch.stack([x for x, _ in direct]))


def test_bad_settings_fail_before_training_in_one_line(capsys, tmp_path, small_root):
    import train
    from tests.conftest import one_line_error

    runs, empty = tmp_path / "runs", tmp_path / "empty"
    empty.mkdir()
    base = ["--dataset", "dsec-semantic", "--model_dir", str(runs), "--epochs", "1"]
    one_line_error(capsys, train.main, [*base, "--data_root", str(empty)], "split folder", "empty/train not found")
    one_line_error(
        capsys,
        train.main,
        [*base, "--data_root", str(small_root), "--thl", "true", "--timesteps", "4"],
        "bins (5) must equal timesteps (4)",
    )
    one_line_error(capsys, train.main, [*base, "--representation", "tensor"], "unknown representation 'tensor'")
    assert not [p for p in runs.rglob("*") if p.is_file()]  # nothing was written: no config, no checkpoint


def test_event_loader_benchmark_runs(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import event_loader

    out = tmp_path / "loader.json"
    argv = ["--items", "1", "--repeat", "1", "--rate", "0.05", "--seconds", "0.3", "--out", str(out)]
    assert event_loader.main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["windows_per_second"]) == 20 and all(v > 0 for v in result["windows_per_second"].values())
    assert event_loader.main(argv) == 1  # refuses to overwrite its output
    assert "exists" in capsys.readouterr().err
