"""Loader speed of the raw-event datasets: windows per second in one process (= one DataLoader worker).

    python benchmarks/event_loader.py                     # every representation, DSEC and DDD17 sizes
    python benchmarks/event_loader.py --items 20 --rate 3 --out loader.json

It writes its own data in the exact release formats into a temporary folder (removed afterwards): one
DSEC sequence (events.h5, Blosc-compressed, and a rectify_map.h5 at 640x480; 640x440 labels every 50 ms)
and the seven recordings of the ESS DDD17 release (346x260 events, 346x200 labels), with uniformly
random events at `--rate` million events per second. Each item is read, rectified, represented and
normalised as training does, with the benchmarks' windows (DSEC: 100,000 events; DDD17: 32,000) and a
50 ms window. The last printed line is one JSON object (windows per second per configuration).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.events.common import EventSettings  # noqa: E402
from data.events.ddd17_events import DDD17Events  # noqa: E402
from data.events.dsec import DSECSemantic  # noqa: E402
from data.events.h5 import write_events, write_rectify_map  # noqa: E402

REPRESENTATIONS = {
    "voxel-5": dict(representation="voxel", bins=5),
    "voxel-5-split-polarity": dict(representation="voxel", bins=5, separate_polarity=True),
    "histogram-1": dict(representation="histogram", bins=1),
    "histogram-5": dict(representation="histogram", bins=5),
    "evsegnet-1": dict(representation="evsegnet", bins=1),
}


def write_dsec(root, seconds, rate, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate * 1e6)
    t_offset = 1_000_000_000
    t = np.sort(rng.integers(0, int(seconds * 1e6), n)) + t_offset
    seq = Path(root) / "train" / "zurich_city_00_a"
    write_events(
        seq / "events/left/events.h5",
        rng.integers(0, 640, n),
        rng.integers(0, 480, n),
        t,
        rng.integers(0, 2, n),
        t_offset=t_offset,
    )
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    # a smooth, non-trivial map (a slight rotation and radial stretch), like a real rectification
    cx, cy = 320, 240
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / 320**2
    rx = cx + (xx - cx) * (1 + 0.05 * r2) + 0.02 * (yy - cy)
    ry = cy + (yy - cy) * (1 + 0.05 * r2) - 0.02 * (xx - cx)
    write_rectify_map(seq / "events/left/rectify_map.h5", np.stack([rx, ry], axis=-1))
    stamps = t_offset + np.arange(150_000, int(seconds * 1e6), 50_000)
    label_dir = seq / "semantic/left/11classes/data"
    label_dir.mkdir(parents=True)
    for i in range(len(stamps)):
        Image.fromarray(rng.integers(0, 11, (440, 640)).astype(np.uint8), mode="L").save(label_dir / f"{i:06d}.png")
    (seq / "semantic/timestamps.txt").write_text("".join(f"{s}\n" for s in stamps))


def write_ddd17(root, seconds, rate, seed=0):
    rng = np.random.default_rng(seed)
    for d in range(7):
        folder = Path(root) / f"dir{d}"
        (folder / "index").mkdir(parents=True)
        n = int(seconds * rate * 1e6) if d == 1 else 1000
        t = np.sort(rng.integers(0, int(seconds * 1e9), n)).astype("<i8")
        t.tofile(folder / "events.dat.t")
        xyp = np.stack([rng.integers(0, 346, n), rng.integers(0, 260, n), rng.integers(0, 2, n)], axis=1)
        xyp.astype("<i2").tofile(folder / "events.dat.xyp")
        times = np.arange(150_000_000, int(seconds * 1e9), 50_000_000)
        rows = np.stack([times, np.searchsorted(t, times), np.searchsorted(t, times - 50_000_000)], axis=1)
        np.save(folder / "index/index_50ms.npy", rows.astype(np.int64))
        masks = folder / "segmentation_masks"
        masks.mkdir()
        for j in range(len(times) if d == 1 else 1):
            label = rng.integers(0, 6, (200, 346)).astype(np.uint8)
            Image.fromarray(label, mode="L").save(masks / f"segmentation_{j + 1:08d}.png")


def measure(dataset, items, repeat):
    """Windows per second (best of `repeat` passes over the first `items` items; the first pass warms up)."""
    count = min(items, len(dataset))
    dataset[0]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(count):
            dataset[i]
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10, help="windows per pass")
    parser.add_argument("--repeat", type=int, default=2, help="passes; the best counts")
    parser.add_argument("--rate", type=float, default=3.0, help="million events per second in the written data")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the written recordings")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (a worker has one)")
    parser.add_argument("--out", default=None, help="also write the JSON object to this file (must not exist)")
    args = parser.parse_args(argv)
    if args.out and Path(args.out).exists():
        print(f"error: {args.out} exists; choose another --out", file=sys.stderr)
        return 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="event-loader-") as tmp:
        print(f"writing {args.seconds:g} s of events at {args.rate:g} Mev/s in the DSEC and DDD17 formats ...")
        write_dsec(Path(tmp) / "dsec", args.seconds, args.rate)
        write_ddd17(Path(tmp) / "ddd17", args.seconds, args.rate)
        jobs = []
        for rep_name, rep in REPRESENTATIONS.items():
            for window_name, window in (("events", None), ("50ms", 50.0)):
                jobs.append(("dsec", rep_name, window_name, rep, window))
                jobs.append(("ddd17", rep_name, window_name, rep, window))
        for data_name, rep_name, window_name, rep, window in tqdm(jobs, desc="configurations"):
            count = (100_000 if data_name == "dsec" else 32_000) if window is None else None
            settings = EventSettings(window_ms=window or 50.0, window_events=count, **rep)
            if data_name == "dsec":
                ds = DSECSemantic(Path(tmp) / "dsec", "train", settings=settings, labels="all")
            else:
                ds = DDD17Events(Path(tmp) / "ddd17", "val", settings=settings)
            key = f"{data_name}/{rep_name}/{window_name}"
            results[key] = round(measure(ds, args.items, args.repeat), 2)
            tqdm.write(f"{key:45s} {results[key]:8.2f} windows/s per worker")
    summary = dict(rate_mev_s=args.rate, threads=args.threads, windows_per_second=results)
    line = json.dumps(summary)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
