"""DSEC event files: `events.h5` (Blosc-compressed, read through hdf5plugin) and `rectify_map.h5`.

events.h5 (one per sequence and camera, e.g. <sequence>/events/left/events.h5):

    events/x   uint16 [N]   column, 0..639
    events/y   uint16 [N]   row, 0..479
    events/t   uint32 [N]   microseconds since t_offset, non-decreasing
    events/p   uint8  [N]   polarity, 0 (off) or 1 (on)
    ms_to_idx  uint64 [M]   t[ms_to_idx[ms]] >= 1000 ms and t[ms_to_idx[ms] - 1] < 1000 ms
    t_offset   int64  []    add to t to get the clock of the labels' timestamps.txt

rectify_map.h5: `rectify_map` float32 [480, 640, 2]; rectify_map[y, x] = (x, y) of the event in the
rectified image, the frame the labels are drawn in.

Only the events of a requested window are read: `ms_to_idx` bounds the rows, then the timestamps of
those rows place the window exactly. Each DataLoader worker opens its own handle (lazily).
"""

import os
from pathlib import Path

import h5py
import numpy as np

EVENT_FIELDS = ("x", "y", "t", "p")
DTYPES = dict(x=np.uint16, y=np.uint16, t=np.uint32, p=np.uint8)


def require_hdf5plugin():
    """Import hdf5plugin (registers the Blosc filter of DSEC's events.h5) or fail in one line."""
    try:
        import hdf5plugin
    except ImportError:
        raise ImportError(
            "reading DSEC events.h5 (Blosc-compressed) needs the hdf5plugin package: pip install hdf5plugin"
        ) from None
    return hdf5plugin


def _open(path):
    require_hdf5plugin()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:  # truncated, not HDF5 at all
        raise ValueError(f"cannot read HDF5 file {path}: {err}") from None


class EventFile:
    """Windowed access to one DSEC events.h5. `sensor` = (height, width) the coordinates must fit."""

    def __init__(self, path, sensor=(480, 640)):
        self.path = Path(path)
        self.sensor = tuple(int(s) for s in sensor)
        with _open(self.path) as f:
            missing = [f"events/{k}" for k in EVENT_FIELDS if f"events/{k}" not in f] + [
                k for k in ("ms_to_idx",) if k not in f
            ]
            if missing:
                raise ValueError(
                    f"{self.path} is not a DSEC events file: missing {', '.join(missing)} "
                    "(expected events/{x,y,t,p}, ms_to_idx and t_offset)"
                )
            lengths = {k: f[f"events/{k}"].shape[0] for k in EVENT_FIELDS}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{self.path}: events/x, y, t, p differ in length: {lengths}")
            self.num_events = lengths["t"]
            self.ms_to_idx = np.asarray(f["ms_to_idx"][()], dtype=np.int64)
            self.t_offset = int(f["t_offset"][()]) if "t_offset" in f else 0
            try:
                self.first_t = int(f["events/t"][0]) if self.num_events else 0
                self.last_t = int(f["events/t"][-1]) if self.num_events else 0
                if self.ms_to_idx.ndim != 1 or (np.diff(self.ms_to_idx) < 0).any():
                    raise ValueError(f"{self.path}: ms_to_idx must be a non-decreasing 1-D index")
                if self.ms_to_idx.size and (self.ms_to_idx[-1] > self.num_events or self.ms_to_idx[0] < 0):
                    raise ValueError(f"{self.path}: ms_to_idx points outside the {self.num_events} events")
                self._check_index(f["events/t"])
            except OSError as err:  # a filter that is not registered, or truncated chunks
                raise ValueError(f"cannot read events/t of {self.path}: {err}") from None
        self._file = None
        self._pid = None

    def _check_index(self, t, samples=16):
        """ms_to_idx against events/t at a few entries (two single-event reads each), so that an index that
        does not describe the events (e.g. all zeros) is found when the file is opened."""
        if not self.num_events or not self.ms_to_idx.size:
            return
        last = min(self.ms_to_idx.size - 1, self.last_t // 1000 + 1)
        for ms in np.unique(np.linspace(0, last, samples).astype(np.int64)).tolist():
            i = int(self.ms_to_idx[ms])
            at = int(t[i]) if i < self.num_events else None
            before = int(t[i - 1]) if i > 0 else None
            if (at is not None and at < 1000 * ms) or (before is not None and before >= 1000 * ms):
                raise ValueError(
                    f"{self.path}: ms_to_idx does not index events/t: entry {ms} is {i}, but events/t"
                    f"[{i - 1}:{i + 1}] = {before}, {at} us (expected the first event at or after {ms} ms)"
                )

    def event_bounds(self, t_end, duration_us=None):
        """An upper bound, from ms_to_idx alone (no event read), of the number of events in the window that
        ends at t_end (the labels' clock): before it (duration_us None), or in its last duration_us."""
        end_local = int(t_end) - self.t_offset
        stop = self._index_at_ms(-(-end_local // 1000))
        if duration_us is None:
            return stop
        return stop - self._index_at_ms((end_local - int(duration_us)) // 1000)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _h5(self):
        # One handle per process: a handle inherited through fork (a DataLoader worker started after the
        # main process read an item) must not be shared, so a new process opens its own.
        if self._file is None or self._pid != os.getpid():
            self._file = _open(self.path)
            self._pid = os.getpid()
        return self._file

    def _index_at_ms(self, ms):
        """First event index with t >= 1000 * ms (ms clipped to the index)."""
        if ms <= 0:
            return 0
        if ms >= self.ms_to_idx.size:
            return self.num_events
        return int(self.ms_to_idx[ms])

    def _first_at_or_after(self, t_us):
        """Index of the first event with t >= t_us (t on the file's clock, before t_offset)."""
        lo = self._index_at_ms(int(np.floor(t_us / 1000)))
        hi = self._index_at_ms(int(np.ceil(t_us / 1000)))
        hi = max(hi, lo)
        times = self._read("t", lo, hi)
        return lo + int(np.searchsorted(times, t_us, side="left"))

    def _read(self, name, lo, hi):
        try:
            return self._h5()[f"events/{name}"][lo:hi]
        except OSError as err:
            raise ValueError(f"cannot read events/{name}[{lo}:{hi}] of {self.path}: {err}") from None

    def window(self, t_end, duration_us=None, count=None):
        """Events (dict of int64/float arrays x, y, t, p; t on the labels' clock, in microseconds) of the
        window that ends at t_end (exclusive): the last `duration_us` microseconds, or the last `count`
        events. An empty window gives empty arrays."""
        end_local = int(t_end) - self.t_offset
        stop = self._first_at_or_after(end_local)
        if count is not None:
            start = max(0, stop - int(count))
        else:
            start = min(self._first_at_or_after(end_local - int(duration_us)), stop)
        return self.read(start, stop)

    def read(self, start, stop):
        events = {k: self._read(k, start, stop).astype(np.int64) for k in EVENT_FIELDS}
        self.check(events, start)
        events["t"] = events["t"] + self.t_offset
        return events

    def check(self, events, start=0):
        height, width = self.sensor
        x, y, t, p = (events[k] for k in EVENT_FIELDS)
        if x.size:
            bad = np.flatnonzero((x >= width) | (y >= height) | (x < 0) | (y < 0))
            if bad.size:
                i = bad[0]
                raise ValueError(
                    f"{self.path}: event {start + i} at (x={x[i]}, y={y[i]}) is outside the "
                    f"{width}x{height} sensor (expected 0 <= x < {width}, 0 <= y < {height})"
                )
            back = np.flatnonzero(np.diff(t) < 0)
            if back.size:
                i = back[0]
                raise ValueError(
                    f"{self.path}: timestamps go backwards at event {start + i + 1} "
                    f"({t[i]} -> {t[i + 1]} us); expected non-decreasing events/t"
                )
            if ((p != 0) & (p != 1)).any():
                raise ValueError(f"{self.path}: polarities must be 0 or 1, found {sorted(set(p.tolist()))[:5]}")


def load_rectify_map(path, sensor=(480, 640)):
    """float32 [H, W, 2] map from raw (x, y) to rectified (x, y), for a sensor of (H, W) = `sensor`; a
    negative H means any height of at least -H."""
    path = Path(path)
    height, width = int(sensor[0]), int(sensor[1])
    expected = f"[{height}, {width}, 2]" if height > 0 else f"[H >= {-height}, {width}, 2]"
    with _open(path) as f:
        if "rectify_map" not in f:
            raise ValueError(f"{path} has no dataset 'rectify_map' (expected float32 {expected})")
        rmap = np.asarray(f["rectify_map"][()], dtype=np.float32)
    shape = list(rmap.shape)
    if len(shape) != 3 or shape[1:] != [width, 2] or (shape[0] != height if height > 0 else shape[0] < -height):
        why = f"the {width}x{height} sensor" if height > 0 else f"labels {width} wide and {-height} high"
        raise ValueError(
            f"{path}: rectify_map has shape {shape}, expected {expected} (a rectified (x, y) per pixel of {why})"
        )
    if not np.isfinite(rmap).all():
        raise ValueError(f"{path}: rectify_map holds NaN/inf values")
    x, y = rmap[..., 0], rmap[..., 1]
    if not ((x > -1) & (x < width) & (y > -1) & (y < shape[0])).any():
        raise ValueError(f"{path}: rectify_map sends every pixel outside the {width}x{shape[0]} frame")
    return rmap


def ms_to_idx_of(t):
    """The DSEC ms_to_idx of sorted timestamps t (microseconds): entry ms = first index with t >= 1000 ms."""
    t = np.asarray(t, dtype=np.int64)
    last_ms = int(t[-1]) // 1000 + 1 if t.size else 0
    return np.searchsorted(t, np.arange(last_ms + 1, dtype=np.int64) * 1000, side="left").astype(np.uint64)


def _replace_into(path, write):
    """write(tmp_path) then os.replace onto path (atomic); the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_events(path, x, y, t, p, t_offset=0, overwrite=False):
    """Write a DSEC-format events.h5 (Blosc/zstd via hdf5plugin, the release's dtypes), atomically.
    t: microseconds on the labels' clock; stored as t - t_offset."""
    plugin = require_hdf5plugin()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    t_local = np.asarray(t, dtype=np.int64) - int(t_offset)
    compression = plugin.Blosc(cname="zstd", clevel=1, shuffle=plugin.Blosc.SHUFFLE)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for name, values in dict(x=x, y=y, t=t_local, p=p).items():
                values = np.asarray(values).astype(DTYPES[name])
                f.create_dataset(
                    f"events/{name}", data=values, chunks=(max(1, min(values.size, 16384)),), **compression
                )
            f.create_dataset("ms_to_idx", data=ms_to_idx_of(t_local))
            f.create_dataset("t_offset", data=np.int64(t_offset))

    _replace_into(path, write)


def write_rectify_map(path, rectify_map, overwrite=False):
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("rectify_map", data=np.asarray(rectify_map, dtype=np.float32))

    _replace_into(path, write)
