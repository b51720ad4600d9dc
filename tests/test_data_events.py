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
    at time B, outside every bin, so both must then agree to float32 rounding (integer coordinates), in
    the arithmetic of either of ESS's loaders."""
    from tonic.transforms import ToVoxelGrid

    rng = np.random.default_rng(bins)
    height, width = 7, 9
    x, y, t, p = random_events(rng, 400, height, width)
    for loader in rep.LOADERS:
        ours = rep.voxel_grid(x, y, t, p, bins, height, width, loader=loader)
        events = np.zeros(401 if bins > 1 else 400, dtype=[("x", int), ("y", int), ("t", float), ("p", int)])
        events["x"][:400], events["y"][:400], events["t"][:400], events["p"][:400] = x, y, t, p
        if bins > 1:
            events[400] = (0, 0, t[0] + (t[-1] - t[0]) * bins / (bins - 1), 1)
            theirs = ToVoxelGrid(sensor_size=(width, height, 2), n_time_bins=bins)(events)
            assert theirs.shape == (bins, 1, height, width)
            assert np.allclose(ours, theirs, rtol=1e-6, atol=1e-6), loader
        assert np.allclose(ours, brute_voxel(x, y, t, p, bins, height, width), rtol=1e-6, atol=1e-6)
        # every event's weight is conserved (signed sum = #on - #off) when coordinates are integers
        assert ours.sum() == pytest.approx((2 * p - 1).sum(), abs=1e-3)


@pytest.mark.parametrize("separate", [False, True])
def test_voxel_grid_fractional_coordinates_brute_force(separate):
    """Corrected (ess_exact false): bilinear over the 4 nearest pixels. ESS's truncation differs only for
    coordinates in (-2, 0) (the next test)."""
    rng = np.random.default_rng(7)
    x, y, t, p = random_events(rng, 150, 6, 8, fractional=True)
    ours = rep.voxel_grid(x, y, t, p, 4, 6, 8, separate_polarity=separate, exact=False)
    assert ours.shape == (4, 2 if separate else 1, 6, 8)
    assert np.allclose(ours, brute_voxel(x, y, t, p, 4, 6, 8, separate), atol=1e-5)
    inside = (x >= 0) & (y >= 0)
    exact = rep.voxel_grid(x[inside], y[inside], t[inside], p[inside], 4, 6, 8, separate_polarity=separate)
    assert np.allclose(exact, brute_voxel(x[inside], y[inside], t[inside], p[inside], 4, 6, 8, separate), atol=1e-5)


def test_voxel_grid_negative_coordinates_as_ess_truncates():
    """Worked by hand: an on event at x = -0.25 (y = 0.5, one bin; a second event, off the 3x2 frame, gives
    the window a duration). ESS truncates -0.25 to 0 and weighs columns 0 and 1 by 1 - |0 - x| = 0.75 and
    1 - |1 - x| = -0.25 (times 0.5 per row); corrected, the floor -1 leaves column 0 with 0.75. An off event
    at x = -1.5: ESS puts -(1 - 1.5) = 0.5 on column 0; corrected: nothing."""
    exact = rep.voxel_grid([-0.25, 9], [0.5, 9], [10, 20], [1, 1], 1, 2, 3)
    assert exact[0, 0].tolist() == [[0.375, -0.125, 0.0], [0.375, -0.125, 0.0]]
    fixed = rep.voxel_grid([-0.25, 9], [0.5, 9], [10, 20], [1, 1], 1, 2, 3, exact=False)
    assert fixed[0, 0].tolist() == [[0.375, 0.0, 0.0], [0.375, 0.0, 0.0]]
    assert rep.voxel_grid([-1.5, 9], [0.0, 9], [10, 20], [0, 0], 1, 2, 3)[0, 0, 0].tolist() == [0.5, 0.0, 0.0]
    assert not rep.voxel_grid([-1.5, 9], [0.0, 9], [10, 20], [0, 0], 1, 2, 3, exact=False).any()


def test_histogram_parts_and_evsegnet_brute_force():
    rng = np.random.default_rng(3)
    height, width, bins = 5, 6, 3
    x, y, t, p = random_events(rng, 300, height, width)
    counts = np.zeros((2, height, width))
    for xi, yi, pi in zip(x, y, p):
        counts[1 if pi else 0, yi, xi] += 1  # ESS's order: negative, then positive
    assert np.array_equal(rep.histogram(x, y, p, height, width), counts)
    # ESS's parts, by hand: 300 events in 3 runs of 100 (count); 7 in 3 runs of 2, the newest dropped
    assert rep.parts(t, 3, "count") == [(0, 100), (100, 200), (200, 300)]
    assert rep.parts(np.arange(7), 3, "count") == [(0, 2), (2, 4), (4, 6)]
    assert rep.parts(np.arange(7), 3, "count", exact=False) == [(0, 2), (2, 4), (4, 7)]
    # DDD17 span: t = 0..10, d = int(10 / 3) = 3: [0, 3), [3, 6), [6, 9); 9 and 10 dropped
    assert rep.parts(np.arange(11), 3, "span") == [(0, 3), (3, 6), (6, 9)]
    assert rep.parts(np.arange(11), 3, "span", exact=False) == [(0, 3), (3, 6), (6, 11)]
    assert rep.parts([5, 7, 7, 9, 9], 1, "span") == [(0, 3)]  # a voxel grid's one part: the last instant dropped
    # DSEC window (100, 130) in 3: edges 100, 110, 120, 130
    assert rep.parts([100, 109, 110, 119, 120, 129], 3, "window", (100, 130)) == [(0, 2), (2, 4), (4, 6)]
    stamps = {}
    t0, t1 = t[0], t[-1]
    slices = np.zeros((bins, 2, height, width))
    for xi, yi, ti, pi in zip(x, y, t, p):
        s = min(int(bins * (ti - t0) / (t1 - t0)), bins - 1)
        slices[s, 0 if pi else 1, yi, xi] += 1
        stamps.setdefault((s, 0 if pi else 1, yi, xi), []).append((ti - t0) / (t1 - t0))
    ev = rep.evsegnet(x, y, t, p, bins, height, width)
    assert np.array_equal(ev[:, :2], slices)
    for (s, k, yi, xi), values in stamps.items():
        assert ev[s, 2 + 2 * k, yi, xi] == pytest.approx(np.mean(values), abs=1e-5)
        assert ev[s, 3 + 2 * k, yi, xi] == pytest.approx(np.std(values), abs=1e-4)
    assert np.array_equal(rep.evsegnet(x, y, t, p, bins, height, width, channels=[4, 0]), ev[:, [4, 0]])
    # fractional coordinates: floored and dropped off the frame (corrected); ESS's DSEC truncation wraps the
    # flat index: x = -1.5 (truncated to -1) on row 1 counts at the end of row 0
    assert rep.histogram([1.9, -0.2], [0.5, 0.5], [1, 1], 2, 3)[1].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert rep.histogram([-1.5], [1.2], [1], 2, 3, truncate=True)[1].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert not rep.histogram([-1.5], [1.2], [1], 2, 3).any()


def test_empty_window_and_single_instant():
    for loader in rep.LOADERS:
        out = rep.voxel_grid([], [], [], [], 3, 4, 5, loader=loader)
        assert out.shape == (3, 1, 4, 5) and not out.any()
    assert not rep.histogram([], [], [], 4, 5).any() and not rep.evsegnet([], [], [], [], 3, 4, 5).any()
    # all events at one instant: ESS's DSEC arithmetic divides 0 by 0 and drops them all; corrected (and
    # ESS's DDD17 arithmetic): every event in bin 0
    assert not rep.voxel_grid([1, 2], [0, 0], [10, 10], [1, 0], 3, 2, 3).any()
    for kwargs in (dict(exact=False), dict(loader="ddd17")):
        same = rep.voxel_grid([1, 2], [0, 0], [10, 10], [1, 0], 3, 2, 3, **kwargs)
        assert same[0, 0, 0].tolist() == [0, 1, -1] and not same[1:].any()
    assert not np.isnan(rep.normalize(np.zeros((2, 1, 3, 3), np.float32), "nonzero")).any()


def test_nonzero_normalisation_matches_torch():
    rng = np.random.default_rng(0)
    grid = np.where(rng.random((5, 1, 6, 7)) < 0.3, rng.normal(2, 3, (5, 1, 6, 7)), 0).astype(np.float32)
    t = torch.from_numpy(grid)
    mask = t != 0
    for loader, exact, unbiased in (("dsec", True, True), ("ddd17", True, False), ("ddd17", False, False)):
        expected = t.clone()
        expected[mask] = (t[mask] - t[mask].mean()) / t[mask].std(unbiased=unbiased)
        out = rep.normalize(grid, "nonzero", loader=loader, exact=exact)
        assert np.allclose(out, expected.numpy(), atol=1e-5) and (out[~mask.numpy()] == 0).all()
    # all non-zero entries equal: ESS's DDD17 formula gives std 0 (and ESS NaN); here they become 0
    ones = np.zeros((1, 1, 2, 2), np.float32)
    ones[0, 0, 0] = 1
    assert not rep.normalize(ones, "nonzero", loader="ddd17").any()
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
