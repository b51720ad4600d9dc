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
