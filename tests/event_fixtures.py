"""Writers of raw-event fixtures in the exact on-disk formats (DSEC-Semantic, DDD17 as ESS releases it),
written here with h5py/hdf5plugin/numpy directly (not with the code under test)."""

from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
from PIL import Image


def write_dsec_events(path, x, y, t_abs, p, t_offset):
    """events.h5 as DSEC releases it: Blosc-compressed events/{x,y,t,p}, ms_to_idx, t_offset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t_local = np.asarray(t_abs, dtype=np.int64) - t_offset
    # ms_to_idx by its definition, one millisecond at a time: t[idx[ms]] >= 1000 ms > t[idx[ms] - 1]
    ms_to_idx = []
    last_ms = int(t_local[-1]) // 1000 + 1 if t_local.size else 0
    for ms in range(last_ms + 1):
        ms_to_idx.append(int((t_local < 1000 * ms).sum()))
    blosc = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    with h5py.File(path, "w") as f:
        for name, values, dtype in (("x", x, "u2"), ("y", y, "u2"), ("t", t_local, "u4"), ("p", p, "u1")):
            f.create_dataset(
                f"events/{name}", data=np.asarray(values).astype(dtype), chunks=True, maxshape=(None,), **blosc
            )
        f.create_dataset("ms_to_idx", data=np.asarray(ms_to_idx, dtype=np.uint64))
        f.create_dataset("t_offset", data=np.int64(t_offset))


def write_rectify_map(path, rmap):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("rectify_map", data=np.asarray(rmap, dtype=np.float32))


def write_png(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)


def label_paths(seq_dir, layout, classes, count):
    """Label files and the timestamps file of a sequence in one of the accepted layouts."""
    seq_dir = Path(seq_dir)
    if layout == "ess-readme":
        label_dir, stamps = seq_dir / "semantic/left" / f"{classes}classes/data", seq_dir / "semantic/timestamps.txt"
    elif layout == "ess-code":
        label_dir, stamps = seq_dir / "semantic" / f"{classes}classes/data", seq_dir / "semantic/timestamps.txt"
    else:
        label_dir, stamps = seq_dir / f"{classes}classes", seq_dir / f"{seq_dir.name}_semantic_timestamps.txt"
    return [label_dir / f"{i:06d}.png" for i in range(count)], stamps


def write_dsec_sequence(seq_dir, events, rmap, labels, stamps, layout="ess-readme", classes=11, t_offset=0):
    """events: dict x, y (raw sensor), t (labels' clock, us), p. labels: list of [h, w] arrays."""
    seq_dir = Path(seq_dir)
    write_dsec_events(seq_dir / "events/left/events.h5", events["x"], events["y"], events["t"], events["p"], t_offset)
    write_rectify_map(seq_dir / "events/left/rectify_map.h5", rmap)
    paths, stamps_file = label_paths(seq_dir, layout, classes, len(labels))
    for path, label in zip(paths, labels):
        write_png(path, label)
    stamps_file.write_text("".join(f"{int(s)}\n" for s in stamps))


def write_ddd17_recording(folder, x, y, t_ns, p, image_times_ns, labels, label_numbers):
    """One ESS DDD17 recording: events.dat.t (int64 ns), events.dat.xyp (int16 x, y, p),
    index/index_50ms.npy rows (t_ns, first event index at/after the image, first index 50 ms before),
    segmentation_masks/segmentation_<n>.png for image n-1."""
    folder = Path(folder)
    (folder / "index").mkdir(parents=True, exist_ok=True)
    t_ns = np.asarray(t_ns, dtype=np.int64)
    np.asarray(t_ns, dtype="<i8").tofile(folder / "events.dat.t")
    np.stack([x, y, p], axis=1).astype("<i2").tofile(folder / "events.dat.xyp")
    rows = [(int(ti), int((t_ns < ti).sum()), int((t_ns < ti - 50_000_000).sum())) for ti in np.asarray(image_times_ns)]
    np.save(folder / "index/index_50ms.npy", np.asarray(rows, dtype=np.int64))
    for n, label in zip(label_numbers, labels):
        write_png(folder / "segmentation_masks" / f"segmentation_{n:08d}.png", label)


# ----------------------------------------------------------------------------- ESS cross-check fixtures
# Written in the formats ESS's loaders read (github uzh-rpg/ess: its DSEC loader reads semantic/<N>classes/data),
# from a generator of our own (SplitMix64 in NumPy integer arithmetic), so that every NumPy version writes
# the same files. Events sit on the edges that decide what a loader includes: window ends, the first event
# of a count window splitting a group of equal timestamps, voxel-bin edges, histogram slice edges.
ESS_T_OFFSET = 1_634_567_890_123_457  # us: beyond 2**32, as large as DSEC's own
DSEC_SENSOR = (480, 640)
DSEC_LABELS_US = 20_321 + 15_000 * np.arange(10)  # label times on the events' local clock
DDD17_SENSOR = (260, 346)
DDD17_T0_NS = 1_487_339_175_000_000_123  # Unix clock in nanoseconds (beyond 2**53: float64 cannot hold it)
DDD17_IMAGES = 8  # images per recording, 50 ms apart; labels for images 5 and 7 (files _6 and _8)


def splitmix64(seed, n):
    """n pseudo-random uint64 (SplitMix64): the same numbers under every NumPy version."""
    z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed, n, low, high):
    """n int64 in [low, high) from splitmix64."""
    return int(low) + (splitmix64(seed, n) % np.uint64(int(high) - int(low))).astype(np.int64)


def _events(t, seed, height, width):
    """Sorted timestamps t (int64) with pseudo-random coordinates and polarities."""
    t = np.sort(np.asarray(t, dtype=np.int64), kind="stable")
    n = t.size
    return dict(x=uniform(seed + 1, n, 0, width), y=uniform(seed + 2, n, 0, height), t=t, p=uniform(seed + 3, n, 0, 2))


def ess_dsec_rectify_map():
    """float32 [480, 640, 2]: a slight magnification and bend that moves border pixels outside the frame:
    columns 0..3 to x < 0 (some into (-2, 0)), the last three beyond 639, row 0 into (-1.5, -0.86), row 1
    around 0; the bottom rows stay inside (ESS's DSEC histogram fails on rows beyond 479)."""
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float64)
    rx = 320 + (xx - 320) * 1.012 + 0.003 * (yy - 240)
    ry = yy - 1.5 + 0.002 * (xx - 320) ** 2 / 320
    return np.stack([rx, ry], axis=-1).astype(np.float32)


def ess_dsec_events(seed, burst=False):
    """Events (t on the labels' clock, us) of one DSEC fixture sequence around label 6 (local time L):
    exactly 100,001 events in [L - 100,004, L), three of them at the first instant (a 100,000-event window
    keeps two), three at L - 4 and one at L (outside every window of label 6); the quarter points of both
    the count window and the 50 ms window; events on the 50 ms window's start and one just before; and on
    the edges of its 2 and 5 slices. burst: instead, sparse events and a 50 ms window holding one burst of
    7 events at a single instant (all-equal timestamps)."""
    L = int(DSEC_LABELS_US[6])
    end, start, w0 = L - 4, L - 100_004, L - 50_000
    if burst:
        t = np.concatenate(
            [uniform(seed, 3000, 0, w0 - 1), np.full(7, L - 20_000), uniform(seed + 7, 20_000, L + 1, L + 50_000)]
        )
        return _events(t + ESS_T_OFFSET, seed, *DSEC_SENSOR)
    fixed = [start] * 3 + [end] * 3 + [L, w0, w0, w0 - 1]
    fixed += [start + 25_000 * k for k in (1, 2, 3)]  # the count window spans 100,000 us
    fixed += [w0 + 12_499 * k for k in (1, 2, 3)]  # the 50 ms window spans 49,996 us
    fixed += [w0 + 10_000 * k for k in (1, 2, 3, 4)] + [w0 + 25_000, w0 + 9_999, w0 + 24_999]
    inside = 100_001 - sum(start <= f < L for f in fixed)
    t = np.concatenate(
        [
            fixed,
            uniform(seed, inside, start + 1, end),
            uniform(seed + 5, 5000, 0, start),
            uniform(seed + 6, 60_000, L + 1, int(DSEC_LABELS_US[-1]) + 5000),
        ]
    )
    return _events(t + ESS_T_OFFSET, seed, *DSEC_SENSOR)


def dsec_label(seed, classes, height=440, width=640):
    """A label image of 40x40 blocks of pseudo-random classes, with some ignored (255) blocks."""
    blocks = uniform(seed, (height // 40) * (width // 40), 0, classes + 2).reshape(height // 40, width // 40)
    blocks[blocks >= classes] = 255
    return np.kron(blocks, np.ones((40, 40), dtype=np.int64)).astype(np.uint8)


ESS_DSEC_SEQUENCES = (("train", "zurich_city_00_a", 100, False), ("test", "zurich_city_13_a", 200, False))
ESS_DSEC_BURST = ("test", "zurich_city_14_c", 300, True)


def write_ess_dsec_root(root, burst=False):
    """train/zurich_city_00_a and test/zurich_city_13_a (and, with burst, test/zurich_city_14_c) as ESS's
    DSEC loader reads them: events/left/{events.h5, rectify_map.h5}, semantic/{11,19}classes/data/*.png,
    semantic/timestamps.txt. Returns {sequence name: events}."""
    root = Path(root)
    out = {}
    for split, name, seed, sparse in ESS_DSEC_SEQUENCES + ((ESS_DSEC_BURST,) if burst else ()):
        seq = root / split / name
        events = ess_dsec_events(seed, burst=sparse)
        write_dsec_events(
            seq / "events/left/events.h5", events["x"], events["y"], events["t"], events["p"], ESS_T_OFFSET
        )
        write_rectify_map(seq / "events/left/rectify_map.h5", ess_dsec_rectify_map())
        for classes in (11, 19):
            for i in range(len(DSEC_LABELS_US)):
                write_png(
                    seq / "semantic" / f"{classes}classes" / "data" / f"{i:06d}.png", dsec_label(seed + i, classes)
                )
        (seq / "semantic/timestamps.txt").write_text("".join(f"{ESS_T_OFFSET + int(s)}\n" for s in DSEC_LABELS_US))
        out[name] = events
    return out


def ddd17_image_times():
    return DDD17_T0_NS + 50_000_000 * np.arange(1, DDD17_IMAGES + 1, dtype=np.int64)


def ess_ddd17_events(seed):
    """Events of one DDD17 fixture recording (t in ns) around image 5 (time I; label file _6): two events
    at I (outside its windows), three at I - 1000 and two at I - 2000 (nothing else in the last 2 us);
    exactly 32,001 events in [B, I) with three at B = I - 240,001,000 (a 32,000-event window keeps two)
    and its quarter points; events at I - 50 ms (the 50 ms window's start) and 1 ns before it; the quarter
    points of the 50 ms window with and without its last instant, and the edges of ESS's 5 slices of it."""
    image = int(ddd17_image_times()[5])
    start, w0 = image - 240_001_000, image - 50_000_000
    fixed = [image] * 2 + [image - 1000] * 3 + [image - 2000] * 2 + [start] * 3 + [w0, w0, w0 - 1]
    fixed += [start + 60_000_000 * k for k in (1, 2, 3)]
    fixed += [w0 + 12_499_500 * k for k in (1, 2, 3)] + [w0 + 12_499_750 * k for k in (1, 2, 3)]
    fixed += [w0 + 9_999_800 * k for k in (1, 2, 3, 4)]
    inside = 32_001 - sum(start <= f < image for f in fixed)
    last_image = int(ddd17_image_times()[-1])
    t = np.concatenate(
        [
            fixed,
            uniform(seed, inside, start + 1, image - 2000),
            uniform(seed + 5, 6000, DDD17_T0_NS, start),
            uniform(seed + 6, 15_000, image + 1, last_image + 20_000_000),
        ]
    )
    return _events(t, seed, *DDD17_SENSOR)


def ddd17_label(seed):
    """A 346x200 label of 10x10 blocks of pseudo-random classes 0..5, some ignored (255)."""
    blocks = uniform(seed, 20 * 35, 0, 7).reshape(20, 35)
    blocks[blocks == 6] = 255
    return np.kron(blocks, np.ones((10, 10), dtype=np.int64))[:, :346].astype(np.uint8)


def write_ess_ddd17_root(root):
    """dir0 .. dir6 as ESS's DDD17 loader reads them (events.dat.t, events.dat.xyp, index/index_50ms.npy,
    segmentation_masks/segmentation_0000000{6,8}.png). Returns {folder name: events}."""
    out = {}
    for d in range(7):
        events = ess_ddd17_events(1000 + 10 * d)
        labels = [ddd17_label(2000 + 10 * d + k) for k in (6, 8)]
        folder = Path(root) / f"dir{d}"
        write_ddd17_recording(
            folder, events["x"], events["y"], events["t"], events["p"], ddd17_image_times(), labels, [6, 8]
        )
        out[folder.name] = events
    return out
