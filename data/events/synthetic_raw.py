"""The embedded `synthetic-events` set as raw events in the DSEC layout (`raw_events: true`).

Each sequence of SyntheticEvents is simulated as raw events (x, y, t, p) and written, with a
non-trivial rectification map and one label per frame, as a DSEC-Semantic folder in a temporary
directory (removed at exit); DSECSemantic then reads it through the same window, rectification,
representation and cropping code as the real data. The sensor has 8 rows more than the labels (as
DSEC's 480 vs 440), and the raw coordinates are the rectified ones shifted circularly by a third of the
width and mirrored vertically, so that events read without rectification miss their labels.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.events.common import EventSettings
from data.events.dsec import DSECSemantic
from data.events.h5 import write_events, write_rectify_map

FRAME_US = 50_000  # one frame every 50 ms: the default 50 ms window holds one frame interval of events
ROWS_BELOW = 8
T_OFFSET = 1_500_000_000  # an offset as large as DSEC's, so that forgetting t_offset finds no events
_ROOTS = {}


def rectify_map(height, width):
    """float32 [H + ROWS_BELOW, W, 2]: raw (x, y) -> rectified ((x + W//3) mod W, H_s - 1 - y)."""
    sensor_h = height + ROWS_BELOW
    yy, xx = np.mgrid[0:sensor_h, 0:width]
    return np.stack([(xx + width // 3) % width, sensor_h - 1 - yy], axis=-1).astype(np.float32)


def raw_coordinates(x_rect, y_rect, height, width):
    """Inverse of rectify_map for integer rectified coordinates."""
    sensor_h = height + ROWS_BELOW
    return (x_rect - width // 3) % width, sensor_h - 1 - y_rect


def write_root(root, split, dataset):
    """Write every sequence of `dataset` (a SyntheticEvents) under root/<train|test>/seq_NNN/."""
    folder = Path(root) / ("train" if split == "train" else "test")
    rmap = rectify_map(dataset.height, dataset.width)
    for seq in range(dataset.num_sequences):
        events, labels = dataset.raw_events(seq, FRAME_US, rows_below=ROWS_BELOW)
        x, y = raw_coordinates(events["x"], events["y"], dataset.height, dataset.width)
        seq_dir = folder / f"seq_{seq:03d}"
        write_events(seq_dir / "events/left/events.h5", x, y, events["t"] + T_OFFSET, events["p"], t_offset=T_OFFSET)
        write_rectify_map(seq_dir / "events/left/rectify_map.h5", rmap)
        label_dir = seq_dir / "semantic/left" / f"{dataset.num_classes}classes" / "data"
        label_dir.mkdir(parents=True)
        for f in range(1, len(labels)):  # frame 0 has no events before it
            Image.fromarray(labels[f].astype(np.uint8), mode="L").save(label_dir / f"{f - 1:06d}.png")
        stamps = T_OFFSET + np.arange(1, len(labels)) * FRAME_US
        (seq_dir / "semantic/timestamps.txt").write_text("".join(f"{s}\n" for s in stamps))
    return folder


def _cleanup():
    for path in _ROOTS.values():
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup)


def build(generator, split, settings):
    """DSECSemantic over a temporary DSEC-format copy of ``generator``'s sequences (a SyntheticEvents;
    written once per process and settings of the generator)."""
    key = (generator.seed, split, generator.num_sequences, generator.height, generator.width, generator.seq_len)
    if key not in _ROOTS:
        root = tempfile.mkdtemp(prefix="snnseg-synthetic-dsec-")
        write_root(root, split, generator)
        _ROOTS[key] = root
    return DSECSemantic(
        _ROOTS[key],
        split,
        classes=generator.num_classes,
        settings=settings or EventSettings(),
        labels="all",
        sensor=(generator.height + ROWS_BELOW, generator.width),
    )
