"""dsec-semantic and ddd17-events items against the tensors ESS's own loaders build for the same windows.

tests/ess_reference.json holds digests and slices of the items that ESS's code produced: github uzh-rpg/ess at
commit 46bf1eed677d869c4733c89d2284e43ea27f97bd (its DSEC loader is the DSEC scripts', github uzh-rpg/DSEC at
af90ef112c175ddcb29d7bfefde517a877c18172), run by its datasets.DSEC_events_loader.DSECEvents and
datasets.ddd17_events_loader.DDD17Events on the fixtures tests/event_fixtures.py writes (write_ess_dsec_root
with the burst sequence, write_ess_ddd17_root), with the settings of ESS_SETTINGS below over these defaults:
DSEC nr_events_data 1, delta_t_per_data 50, nr_events_window 100000, voxel_grid, 5 bins, separate_pol False,
normalize_event True, 11 classes, fixed_duration False, resize False; DDD17 the same with nr_events_per_data
32000 and resize True (ESS's default), random_crop False; augmentation False. Environment: Python 3.11,
NumPy 1.26.4 (np.int set to int, the alias NumPy removed in 1.24), torch 2.14.1, numba 0.68.1, h5py 3.16,
hdf5plugin, opencv-python-headless 4.10.0.84, albumentations 1.3.1. ESS's DDD17 loader fails in its
fixed-duration mode (it reads self.nr_events, set only for event-count windows): the 50 ms figures were
made with that attribute set to None, unused there (Spike-BRGNet's copy of the loader skips it).

Where ESS fails (its DSEC histogram of an empty part), the item is not compared. Where ESS's DDD17
normalisation divides by a zero std (every non-zero count of a part equal to 1), ESS's part is NaN and ours
is zero (docs/data.md). Everything else equals ESS's to float32 rounding: ESS itself sums the DSEC voxel
weights with parallel atomic adds (torch's put_), in no fixed order.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from data.events.common import EmptyWindowWarning, EventSettings
from data.events.ddd17_events import DDD17Events
from data.events.dsec import DSECSemantic
from tests.event_fixtures import write_ess_ddd17_root, write_ess_dsec_root

REFERENCE = json.loads((Path(__file__).parent / "ess_reference.json").read_text())
# name: (ESS's settings, ours, our dataset's keyword arguments)
ESS_SETTINGS = {
    "dsec-published": (dict(), dict(window_events=100000), {}),
    "dsec-no-norm": (dict(normalize_event=False), dict(window_events=100000, normalize="none"), {}),
    "dsec-50ms": (dict(fixed_duration=True), dict(window_ms=50), {}),
    "dsec-50ms-no-norm": (dict(fixed_duration=True, normalize_event=False), dict(window_ms=50, normalize="none"), {}),
    # ESS's DSEC loader never normalises histograms (only its voxel grid): ours with event_norm none
    "dsec-histogram-1": (
        dict(fixed_duration=True, event_representation="histogram"),
        dict(window_ms=50, representation="histogram", bins=1, normalize="none"),
        {},
    ),
    "dsec-histogram-5": (
        dict(fixed_duration=True, event_representation="histogram", nr_events_data=5, delta_t_per_data=10),
        dict(window_ms=50, representation="histogram", bins=5, normalize="none"),
        {},
    ),
    "dsec-19": (dict(semseg_num_classes=19), dict(window_events=100000), dict(classes=19)),
    "dsec-resize": (dict(resize=True), dict(window_events=100000), dict(img_size=[448, 640])),
    "ddd17-published": (dict(), dict(window_events=32000), {}),
    "ddd17-no-norm": (dict(normalize_event=False), dict(window_events=32000, normalize="none"), {}),
    "ddd17-50ms": (dict(fixed_duration=True), dict(window_ms=50), {}),
    "ddd17-50ms-no-norm": (dict(fixed_duration=True, normalize_event=False), dict(window_ms=50, normalize="none"), {}),
    # ESS's window of nr_events_data parts holds nr_events_data * nr_events_per_data events: 3 * 6000
    "ddd17-histogram-count": (
        dict(event_representation="histogram", nr_events_data=3, nr_events_per_data=6000, normalize_event=False),
        dict(window_events=18000, representation="histogram", bins=3, normalize="none"),
        {},
    ),
    "ddd17-histogram-50ms": (
        dict(event_representation="histogram", nr_events_data=5, delta_t_per_data=10, fixed_duration=True),
        dict(window_ms=50, representation="histogram", bins=5),
        {},
    ),
    "ddd17-separate": (dict(separate_pol=True), dict(window_events=32000, separate_polarity=True), {}),
    "ddd17-native": (dict(resize=False), dict(window_events=32000), dict(img_size=[200, 346])),
}
OUR_SPLIT = {"train": "train", "val": "val", "valid": "val", "test": "test"}
SLICES = ((slice(0, 2), slice(0, 4)), (slice(100, 102), slice(-4, None)), (slice(-2, None), slice(300, 304)))


def digest(x, y):
    """Figures of an item (x [C, H, W], y [H, W]): per-channel sums, a position-weighted sum (so that a
    shift, flip or swap of channels shows), sums of absolute values and squares, counts of non-zero and NaN
    entries (channels that are NaN left out of the sums), and three small slices of every channel (the top
    left corner, the right border, the bottom rows) and of the label."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    nan = np.isnan(x).any(axis=(1, 2))
    finite = np.where(nan[:, None, None], 0.0, x)
    rows, cols = np.mgrid[0 : x.shape[1], 0 : x.shape[2]]
    weights = (rows + 2 * cols) % 13 - 6
    return dict(
        shape=list(x.shape),
        nan_channels=np.flatnonzero(nan).tolist(),
        nonzero=int(np.count_nonzero(finite)),
        channel_sums=finite.sum(axis=(1, 2)).tolist(),
        weighted=float((finite * weights).sum()),
        abs=float(np.abs(finite).sum()),
        sq=float((finite**2).sum()),
        slices=[finite[:, r, c].tolist() for r, c in SLICES],
        label_shape=list(y.shape),
        label_counts=np.bincount(y.ravel(), minlength=256)[np.unique(y)].tolist(),
        label_values=np.unique(y).tolist(),
        label_slices=[y[r, c].tolist() for r, c in SLICES],
    )


def assert_equal_to_ess(ours, ess, key, integer):
    """ours == ess to float32 rounding (every entry within 1e-6 of ESS's, relative to max(|x|, 1)); exactly
    where the item holds counts (integer) and for labels."""
    assert ours["shape"] == ess["shape"] and ours["label_shape"] == ess["label_shape"], key
    assert ours["nonzero"] == ess["nonzero"], (key, ours["nonzero"], ess["nonzero"])
    scale = ess["abs"] + ess["nonzero"]  # bounds the sum of |x| * 1e-6 rounding errors
    tol = 0 if integer else 1e-6
    for a, b in zip(ours["channel_sums"], ess["channel_sums"]):
        assert abs(a - b) <= tol * scale, (key, ours["channel_sums"], ess["channel_sums"])
    assert abs(ours["weighted"] - ess["weighted"]) <= 6 * tol * scale, (key, ours["weighted"], ess["weighted"])
    assert abs(ours["abs"] - ess["abs"]) <= tol * scale, key
    assert abs(ours["sq"] - ess["sq"]) <= 3 * tol * (ess["sq"] + scale), key
    for a, b in zip(ours["slices"], ess["slices"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.abs(a - b) <= tol * np.maximum(np.abs(b), 1)), (key, a, b)
    for name in ("label_values", "label_counts", "label_slices"):
        assert ours[name] == ess[name], (key, name)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("ess")
    write_ess_dsec_root(root / "dsec", burst=True)
    write_ess_ddd17_root(root / "ddd17")
    return root


def our_items(roots, name, split):
    """{(sequence or recording, label file stem): our item} of one configuration and split."""
    _, settings, kwargs = ESS_SETTINGS[name]
    settings = EventSettings(**settings)
    with warnings.catch_warnings():  # the burst sequence's sparse windows are meant (zurich_city_14_c)
        warnings.simplefilter("ignore", EmptyWindowWarning)
        if name.startswith("dsec"):
            ds = DSECSemantic(roots / "dsec", OUR_SPLIT[split], settings=settings, **kwargs)
            keys = [(seq.name, seq.labels[i].stem) for seq, i, _ in map(ds.sample, range(len(ds)))]
        else:
            ds = DDD17Events(roots / "ddd17", OUR_SPLIT[split], settings=settings, **kwargs)
            keys = [(ds.recordings[r].folder.name, path.stem) for r, path in ds.items]
    return ds, keys


@pytest.mark.parametrize("name", list(ESS_SETTINGS))
def test_items_equal_ess(roots, name):
    expected = {k: v for k, v in REFERENCE["items"].items() if k.startswith(name + "/")}
    assert expected, name
    splits = sorted({k.split("/")[1] for k in expected})
    for split in splits:
        ds, keys = our_items(roots, name, split)
        ess_keys = {k for k in expected if k.split("/")[1] == split}
        assert {f"{name}/{split}/{seq}/{stem}" for seq, stem in keys} == ess_keys  # the same labels, ESS's choice
        for index, (seq, stem) in enumerate(keys):
            key = f"{name}/{split}/{seq}/{stem}"
            x, y = ds[index]
            ess = expected[key]
            if "error" in ess:  # ESS fails on this window (its DSEC histogram of an empty part): ours is defined
                assert x.shape[0] == ESS_SETTINGS[name][1].get("bins", 5) * 2 and not x.isnan().any()
                continue
            ours = digest(x.numpy(), y.numpy())
            for c in ess["nan_channels"]:  # ESS's 0/0 std: ours is zero there
                assert not x[c].any(), (key, c)
            ours_nan_free = dict(ours, nonzero=ours["nonzero"])
            assert_equal_to_ess(ours_nan_free, ess, key, integer="histogram" in name and "50ms" not in name)


def test_bins_as_timesteps_layout(roots):
    """thl: bin b of channel c at [b, c] (Spike-BRGNet feeds ESS's 5 bins as 5 timesteps, unsqueeze(1)); the
    two-polarity grid's flat order is ESS's (positive bins, then negative bins)."""
    for name, seq, stem, split in (
        ("dsec-published", "zurich_city_13_a", "000006", "val"),
        ("ddd17-separate", "dir1", "segmentation_00000006", "valid"),
    ):
        _, settings, kwargs = ESS_SETTINGS[name]
        ds, keys = our_items(roots, name, split)
        flat, y = ds[keys.index((seq, stem))]
        ds.settings.as_timesteps = True
        x, _ = ds[keys.index((seq, stem))]
        bins, channels = 5, 2 if settings.get("separate_polarity") else 1
        assert x.shape == (bins, channels, *flat.shape[-2:])
        ess_order = x.transpose(0, 1).reshape(flat.shape)  # [C, B] -> ESS's channel c * B + b
        assert np.array_equal(ess_order.numpy(), flat.numpy())
        assert_equal_to_ess(
            digest(ess_order.numpy(), y.numpy()), REFERENCE["items"][f"{name}/{split}/{seq}/{stem}"], name, False
        )
