"""Event representations and DSEC event-file windows against independent references: Tonic's
ToVoxelGrid (a peer library), brute-force loops, torch's std; windows against a full-array selection."""

import h5py
import numpy as np
import pytest
import torch

from data.events import h5 as evh5
from data.events import representations as rep
from tests.event_fixtures import write_dsec_events


def random_events(rng, n, height, width, fractional=False, t_span=50_000):
    x = rng.uniform(-0.7, width - 0.3, n) if fractional else rng.integers(0, width, n)
    y = rng.uniform(-0.7, height - 0.3, n) if fractional else rng.integers(0, height, n)
    t = np.sort(rng.integers(0, t_span, n))
    p = rng.integers(0, 2, n)
    return x, y, t, p


def brute_voxel(x, y, t, p, bins, height, width, separate=False):
    """Every event, every bin, every pixel corner: weight max(0, 1 - distance)."""
    out = np.zeros((bins, 2 if separate else 1, height, width))
    t0, t1 = float(t[0]), float(t[-1])
    for xi, yi, ti, pi in zip(x, y, t, p):
        tn = (bins - 1) * (ti - t0) / (t1 - t0) if t1 > t0 else 0.0
        for b in range(bins):
            wt = max(0.0, 1 - abs(b - tn))
            if wt == 0:
                continue
            for px in range(int(np.floor(xi)), int(np.floor(xi)) + 2):
                for py in range(int(np.floor(yi)), int(np.floor(yi)) + 2):
                    w = wt * max(0.0, 1 - abs(px - xi)) * max(0.0, 1 - abs(py - yi))
                    if w and 0 <= px < width and 0 <= py < height:
                        if separate:
                            out[b, 0 if pi else 1, py, px] += w
                        else:
                            out[b, 0, py, px] += w if pi else -w
    return out


@pytest.mark.parametrize("bins", [1, 3, 5])
def test_voxel_grid_matches_tonic(bins):
    """Tonic scales time by B (Zhu et al.'s event volume); ESS by B-1. One extra event at
    t_first + (t_last - t_first) * B / (B - 1) makes Tonic's scale ESS's, and that event itself lands
    at time B, outside every bin, so both must then agree exactly (integer coordinates)."""
    from tonic.transforms import ToVoxelGrid

    rng = np.random.default_rng(bins)
    height, width = 7, 9
    x, y, t, p = random_events(rng, 400, height, width)
    ours = rep.voxel_grid(x, y, t, p, bins, height, width)
    events = np.zeros(401 if bins > 1 else 400, dtype=[("x", int), ("y", int), ("t", float), ("p", int)])
    events["x"][:400], events["y"][:400], events["t"][:400], events["p"][:400] = x, y, t, p
    if bins > 1:
        events[400] = (0, 0, t[0] + (t[-1] - t[0]) * bins / (bins - 1), 1)
        theirs = ToVoxelGrid(sensor_size=(width, height, 2), n_time_bins=bins)(events)
        assert theirs.shape == (bins, 1, height, width)
        assert np.allclose(ours, theirs, atol=1e-9)
    assert np.allclose(ours, brute_voxel(x, y, t, p, bins, height, width), atol=1e-5)
    # every event's weight is conserved (signed sum = #on - #off) when coordinates are integers
    assert ours.sum() == pytest.approx((2 * p - 1).sum(), abs=1e-3)


@pytest.mark.parametrize("separate", [False, True])
def test_voxel_grid_fractional_coordinates_brute_force(separate):
    rng = np.random.default_rng(7)
    x, y, t, p = random_events(rng, 150, 6, 8, fractional=True)
    ours = rep.voxel_grid(x, y, t, p, 4, 6, 8, separate_polarity=separate)
    assert ours.shape == (4, 2 if separate else 1, 6, 8)
    assert np.allclose(ours, brute_voxel(x, y, t, p, 4, 6, 8, separate), atol=1e-5)


def test_histogram_and_evsegnet_brute_force():
    rng = np.random.default_rng(3)
    height, width, bins = 5, 6, 3
    x, y, t, p = random_events(rng, 300, height, width)
    counts = np.zeros((bins, 2, height, width))
    stamps = {}
    t0, t1 = t[0], t[-1]
    for xi, yi, ti, pi in zip(x, y, t, p):
        s = min(int(bins * (ti - t0) / (t1 - t0)), bins - 1)
        counts[s, 0 if pi else 1, yi, xi] += 1
        stamps.setdefault((s, 0 if pi else 1, yi, xi), []).append((ti - t0) / (t1 - t0))
    assert np.array_equal(rep.histogram(x, y, t, p, bins, height, width), counts)
    ev = rep.evsegnet(x, y, t, p, bins, height, width)
    assert np.array_equal(ev[:, :2], counts)
    for (s, k, yi, xi), values in stamps.items():
        assert ev[s, 2 + 2 * k, yi, xi] == pytest.approx(np.mean(values), abs=1e-5)
        assert ev[s, 3 + 2 * k, yi, xi] == pytest.approx(np.std(values), abs=1e-4)
    assert np.array_equal(rep.evsegnet(x, y, t, p, bins, height, width, channels=[4, 0]), ev[:, [4, 0]])
    # fractional coordinates count at their floor pixel; those that floor outside are dropped
    assert rep.histogram([1.9, -0.2], [0.5, 0.5], [0, 1], [1, 1], 1, 2, 3)[0, 0].tolist() == [[0, 1, 0], [0, 0, 0]]


def test_empty_window_and_single_instant():
    for f in (rep.voxel_grid, rep.histogram, rep.evsegnet):
        out = f(np.array([]), np.array([]), np.array([]), np.array([]), 3, 4, 5)
        assert out.shape[0] == 3 and out.shape[-2:] == (4, 5) and not out.any()
    same = rep.voxel_grid([1, 2], [0, 0], [10, 10], [1, 0], 3, 2, 3)
    assert same[0, 0, 0].tolist() == [0, 1, -1] and not same[1:].any()  # all events at one instant: bin 0
    assert not np.isnan(rep.normalize(np.zeros((2, 1, 3, 3), np.float32), "nonzero")).any()


def test_nonzero_normalisation_matches_torch():
    rng = np.random.default_rng(0)
    grid = np.where(rng.random((5, 1, 6, 7)) < 0.3, rng.normal(2, 3, (5, 1, 6, 7)), 0).astype(np.float32)
    t = torch.from_numpy(grid)
    mask = t != 0
    for unbiased in (True, False):
        expected = t.clone()
        expected[mask] = (t[mask] - t[mask].mean()) / t[mask].std(unbiased=unbiased)
        out = rep.normalize(grid, "nonzero", unbiased=unbiased)
        assert np.allclose(out, expected.numpy(), atol=1e-5) and (out[~mask.numpy()] == 0).all()
    mm = rep.normalize(grid, "minmax")
    assert mm.min() == pytest.approx(-0.5) and mm.max() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="event_norm must be one of nonzero, minmax, none, got 'zscore'"):
        rep.normalize(grid, "zscore")


@pytest.fixture
def event_file(tmp_path):
    rng = np.random.default_rng(11)
    n = 5000
    t_offset = 1_700_000_000
    # bursts and silent gaps of several milliseconds, repeated timestamps
    t = np.sort(np.concatenate([rng.integers(0, 40_000, n // 2), rng.integers(120_000, 160_000, n - n // 2)]))
    x, y, p = rng.integers(0, 640, n), rng.integers(0, 480, n), rng.integers(0, 2, n)
    path = tmp_path / "events.h5"
    write_dsec_events(path, x, y, t + t_offset, p, t_offset)
    return path, dict(x=x, y=y, t=t + t_offset, p=p)


def test_windows_match_full_array_selection_and_read_only_the_window(event_file, monkeypatch):
    path, ev = event_file
    f = evh5.EventFile(path)
    reads = []
    original = f._read

    def spy(name, lo, hi):
        reads.append(hi - lo)
        return original(name, lo, hi)

    monkeypatch.setattr(f, "_read", spy)
    for t_end in ev["t"][[0, 17, 2499, 2500, 4999]].tolist() + [ev["t"][0] - 5, ev["t"][-1] + 10, ev["t"][2600] + 1]:
        for duration in (1, 999, 2_000, 50_000, 200_000):
            sel = (ev["t"] >= t_end - duration) & (ev["t"] < t_end)
            got = f.window(t_end, duration_us=duration)
            for k in "xytp":
                assert np.array_equal(got[k], ev[k][sel]), (t_end, duration, k)
        for count in (1, 10, 100_000):
            idx = np.flatnonzero(ev["t"] < t_end)[-count:]
            got = f.window(t_end, count=count)
            assert np.array_equal(got["t"], ev["t"][idx]) and np.array_equal(got["x"], ev["x"][idx])
    reads.clear()
    f.window(int(ev["t"][100]), duration_us=500)
    assert max(reads) < 1000  # a 0.5 ms window reads a few milliseconds of events, not the 5000


def test_silent_window_is_empty_not_an_error(event_file):
    path, ev = event_file
    got = evh5.EventFile(path).window(int(ev["t"][0]) + 110_000, duration_us=50_000)  # inside the gap
    assert all(got[k].size == 0 for k in "xytp")


def test_event_file_errors(tmp_path, event_file):
    path, ev = event_file
    with pytest.raises(FileNotFoundError, match="nope.h5 not found"):
        evh5.EventFile(tmp_path / "nope.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"cannot read HDF5 file {truncated}"):
        evh5.EventFile(truncated)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"foreign.h5 is not a DSEC events file: missing events/x, events/y"):
        evh5.EventFile(foreign)
    bounds = tmp_path / "bounds.h5"
    x = ev["x"].copy()
    x[10] = 640
    write_dsec_events(bounds, x, ev["y"], ev["t"], ev["p"], 1_700_000_000)
    with pytest.raises(ValueError, match=r"bounds.h5: event 10 at \(x=640, y=\d+\) is outside the 640x480 sensor"):
        evh5.EventFile(bounds).window(int(ev["t"][20]), duration_us=10**7)
    backwards = tmp_path / "backwards.h5"
    t = ev["t"].copy()
    t[30] = t[29] - 5
    write_dsec_events(backwards, ev["x"], ev["y"], t, ev["p"], 1_700_000_000)
    with pytest.raises(ValueError, match="backwards.h5: timestamps go backwards at event 30"):
        evh5.EventFile(backwards).window(int(ev["t"][40]), duration_us=10**7)


def test_missing_hdf5plugin_is_one_line(monkeypatch, event_file):
    import builtins

    real_import = builtins.__import__

    def no_plugin(name, *args, **kwargs):
        if name == "hdf5plugin":
            raise ImportError("No module named 'hdf5plugin'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plugin)
    with pytest.raises(
        ImportError,
        match=r"^reading DSEC events.h5 \(Blosc-compressed\) needs the hdf5plugin package: "
        r"pip install hdf5plugin$",
    ):
        evh5.EventFile(event_file[0])


def test_writer_round_trip_and_refuses_to_overwrite(tmp_path):
    rng = np.random.default_rng(5)
    x, y, t, p = random_events(rng, 300, 480, 640, t_span=9_000)
    path = tmp_path / "w.h5"
    evh5.write_events(path, x, y, t + 77, p, t_offset=77)
    with h5py.File(path, "r") as f:
        assert f["events/t"].dtype == np.uint32 and f["events/x"].dtype == np.uint16 and f["events/p"].dtype == np.uint8
        idx = f["ms_to_idx"][()]
        t_local = f["events/t"][()]
    for ms, i in enumerate(idx):  # the definition of ms_to_idx
        assert (i == len(t_local) or t_local[i] >= 1000 * ms) and (i == 0 or t_local[i - 1] < 1000 * ms)
    assert np.array_equal(evh5.EventFile(path).window(10**9, count=300)["t"], t + 77)
    with pytest.raises(FileExistsError, match="w.h5 exists; refusing to overwrite it"):
        evh5.write_events(path, x, y, t, p)
    assert [q.name for q in tmp_path.iterdir()] == ["w.h5"]  # no temp file left
