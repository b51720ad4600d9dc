"""DDD17 from raw events, as the ESS release distributes it (Sun et al. ECCV 2022; Binas et al. 2017 recordings,
Ev-SegNet's labels).

    <root>/dir*/                          7 recordings, taken in sorted order
        events.dat.t                      int64 [N] event timestamps, nanoseconds
        events.dat.xyp                    int16 [N, 3] x (0..345), y (0..259), polarity (0/1)
        index/index_50ms.npy              int64 [F, 3] per image j: (t_ns, index of the first event after
                                          the image, index of the first event 50 ms before it)
        segmentation_masks/*_<n>.png      200x346 labels, 6 classes, 255 ignored; image n-1 (1-based n)

Splits (ESS's get_split over the sorted folders): train = recordings 0, 2, 3, 5, 6; 'valid' = 1;
'test' = 4. ESS and Spike-BRGNet report their DDD17 numbers on 'valid', so split 'val' reads it.
The DAVIS346 sensor is 346x260; the labels cover its top 200 rows, so the representation is built on
260 rows and the bottom 60 dropped (as ESS does). The window ends at the label's image: the last
`window_events` events (ESS / Spike-BRGNet: 32,000) or the last `window_ms` milliseconds (for 10, 50 and
250 ms, as ESS, from index/index_<w>ms.npy when the file is there). Items are 200x352, as ESS resizes
them (the width, bilinear with align_corners=True; labels nearest); img_size [200, 346] keeps the width.
"""

import warnings
from pathlib import Path

import numpy as np
import torch

from data.events import common
from data.registry import EVENTS, DatasetSpec

NAME = "ddd17-events"
CLASSES = ("flat", "construction+sky", "object", "nature", "human", "vehicle")
PALETTE = ((128, 64, 128), (70, 130, 180), (220, 220, 0), (107, 142, 35), (220, 20, 60), (0, 0, 142))
SENSOR = (260, 346)
LABEL_SIZE = (200, 346)
ESS_SIZE = (200, 352)  # ESS resizes every DDD17 item to this (its default resize=True)
INDEX_WINDOWS_MS = (10, 50, 250)  # index/index_<w>ms.npy: where ESS's time windows of these lengths start
NEAR_NS = 1_000_000_000  # an index row's event must lie within a second of its image
SPLITS = {"train": (0, 2, 3, 5, 6), "valid": (1,), "test": (4,), "val": (1,)}
NUM_RECORDINGS = 7
LAYOUT = (
    "<root>/dir*/ (7 recordings) each with events.dat.t, events.dat.xyp, index/index_50ms.npy and "
    "segmentation_masks/*.png (the ESS DDD17 release)"
)


class Recording:
    def __init__(self, folder):
        self.folder = Path(folder)
        t_file, xyp_file = self.folder / "events.dat.t", self.folder / "events.dat.xyp"
        for f in (t_file, xyp_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: expected {LAYOUT}")
        n, rest = divmod(t_file.stat().st_size, 8)
        n_xyp, rest_xyp = divmod(xyp_file.stat().st_size, 6)
        if rest or rest_xyp or n != n_xyp:
            raise ValueError(
                f"{t_file} ({t_file.stat().st_size} bytes) and {xyp_file} ({xyp_file.stat().st_size} bytes) "
                "do not hold the same number of events (8 bytes int64 t, 3 x int16 x/y/p each): truncated?"
            )
        self.num_events = n
        self.t_file, self.xyp_file = t_file, xyp_file
        self.index_file = self.folder / "index" / "index_50ms.npy"
        if not self.index_file.is_file():
            raise FileNotFoundError(f"{self.index_file} not found: expected {LAYOUT}")
        self.index = load_index(self.index_file)
        self._indices = {50_000: self.index}
        masks = self.folder / "segmentation_masks"
        if not masks.is_dir():
            raise FileNotFoundError(f"{masks} not found (unzip segmentation_masks.zip there): expected {LAYOUT}")
        self.labels = sorted(masks.glob("*.png"), key=lambda p: image_number(p))
        self._t = self._xyp = None
        t, _ = self.arrays()
        self.first_t, self.last_t = (int(t[0]), int(t[-1])) if n else (0, 0)

    def __getstate__(self):
        return {**self.__dict__, "_t": None, "_xyp": None}

    def arrays(self):
        if self._t is None:
            self._t = np.memmap(self.t_file, dtype=np.int64, mode="r", shape=(self.num_events,))
            self._xyp = np.memmap(self.xyp_file, dtype=np.int16, mode="r", shape=(self.num_events, 3))
        return self._t, self._xyp

    def index_of(self, duration_us):
        """(index rows, its file) ESS reads a time window of duration_us from (index_10ms, _50ms or _250ms), or
        (None, None) when there is no such file (the window's start is then searched in events.dat.t)."""
        if duration_us not in self._indices:
            path = self.folder / "index" / f"index_{duration_us // 1000}ms.npy"
            known = duration_us % 1000 == 0 and duration_us // 1000 in INDEX_WINDOWS_MS and path.is_file()
            self._indices[duration_us] = load_index(path) if known else None
        index = self._indices[duration_us]
        return index, (self.index_file.with_name(f"index_{duration_us // 1000}ms.npy") if index is not None else None)

    def bounds(self, label_path, duration_us=None, count=None):
        """(start, stop, image time in ns) of a label's window: the last `count` events before its image
        (ESS: stop from index_50ms.npy), or the last duration_us (ESS: start and stop from the index file of
        that length, else searched)."""
        index, index_file = (self.index, self.index_file) if count is not None else self.index_of(duration_us)
        j = image_number(label_path) - 1
        rows = index if index is not None else self.index
        if not 0 <= j < len(rows):
            raise ValueError(
                f"label {label_path} names image {j + 1}, but {index_file or self.index_file} has {len(rows)}"
            )
        t_img, stop = int(rows[j, 0]), int(rows[j, 1])
        if not 0 <= stop <= self.num_events:
            raise ValueError(
                f"{index_file or self.index_file} row {j} points at event {stop}; {self.t_file} has {self.num_events}"
            )
        if count is not None:
            start = max(0, stop - int(count))
        elif index is not None:
            start = max(int(index[j, 2]), 0)
            if start > stop:
                raise ValueError(f"{index_file} row {j}: window start {start} after its end {stop}")
        else:
            t, _ = self.arrays()
            start = min(int(np.searchsorted(t, t_img - int(duration_us) * 1000, side="left")), stop)
        return start, stop, t_img

    def window(self, label_path, duration_us=None, count=None):
        """(events: dict of int64 x, y, t (ns), p; image time in ns) of a label's window."""
        start, stop, t_img = self.bounds(label_path, duration_us, count)
        t, xyp = self.arrays()
        events = dict(
            x=np.asarray(xyp[start:stop, 0], dtype=np.int64),
            y=np.asarray(xyp[start:stop, 1], dtype=np.int64),
            t=np.asarray(t[start:stop], dtype=np.int64),
            p=np.asarray(xyp[start:stop, 2], dtype=np.int64),
        )
        self.check(events, start)
        return events, t_img

    def check_windows(self, settings):
        """Before any item is read, from the index and a few timestamps: each label's index row must point
        at the events around its image (within a second); windows that hold no event, or whose image lies
        outside the events' time range (at or before the first event, or later than the last one by more than
        the window's length and common.LATE_US), are counted. All of them: an error naming the recording;
        some: a warning with their share."""
        kwargs = settings.window_kwargs()
        duration = kwargs.get("duration_us")
        t, _ = self.arrays()
        bad = 0
        for path in self.labels:
            start, stop, t_img = self.bounds(path, **kwargs)
            near = (stop == 0 or t[stop - 1] <= t_img + NEAR_NS) and (
                stop == self.num_events or t[stop] >= t_img - NEAR_NS
            )
            if self.num_events and not near:
                raise ValueError(
                    f"{self.index_file}: the row of image {image_number(path)} (label {path.name}) says t = {t_img} ns "
                    f"and event {stop}, but {self.t_file} has t = {int(t[min(stop, self.num_events - 1)])} ns there: "
                    "the index does not belong to these events"
                )
            after = self.last_t + max(duration or 0, common.LATE_US) * 1000
            bad += start == stop or not self.first_t < t_img <= after
        if not bad:
            return
        what = (
            f"{bad} of its {len(self.labels)} windows hold no event or lie outside the events' time range "
            f"({self.first_t}..{self.last_t} ns)"
        )
        if bad == len(self.labels):
            raise ValueError(f"recording {self.folder}: {what}: check {self.index_file} and {self.t_file}")
        warnings.warn(
            f"recording {self.folder}: {what.replace('windows', f'windows ({bad / len(self.labels):.0%})', 1)}; "
            "their inputs are empty or of another time",
            common.EmptyWindowWarning,
            stacklevel=3,
        )

    def check(self, events, start):
        height, width = SENSOR
        x, y, t, p = (events[k] for k in ("x", "y", "t", "p"))
        bad = np.flatnonzero((x < 0) | (x >= width) | (y < 0) | (y >= height))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"{self.xyp_file}: event {start + i} at (x={x[i]}, y={y[i]}) is outside the 346x260 sensor"
            )
        back = np.flatnonzero(np.diff(t) < 0)
        if back.size:
            raise ValueError(f"{self.t_file}: timestamps go backwards at event {start + back[0] + 1}")
        if ((p != 0) & (p != 1)).any():
            raise ValueError(f"{self.xyp_file}: polarities must be 0 or 1")


def load_index(path):
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if index.ndim != 2 or index.shape[1] < 3:
        raise ValueError(f"{path} has shape {index.shape}; expected [images, 3] (t in ns, window end, 50 ms before)")
    return index.astype(np.int64)


def image_number(path):
    try:
        return int(Path(path).stem.split("_")[-1])
    except ValueError:
        raise ValueError(f"label {path}: expected a name ending in _<image number>.png") from None


class DDD17Events(torch.utils.data.Dataset):
    """Items: x float32 [B*C, 200, 352] (or [B, C, 200, 352] as timesteps), y int64 [200, 352]."""

    def __init__(self, root, split="train", settings=None, img_size=None, augment=False):
        if split not in SPLITS:
            raise ValueError(f"ddd17-events has splits {sorted(SPLITS)}, got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"DDD17 events root {root} does not exist: expected {LAYOUT}")
        folders = sorted(d for d in root.glob("dir*") if d.is_dir())
        if len(folders) != NUM_RECORDINGS:
            raise FileNotFoundError(f"{root} holds {len(folders)} dir* recordings; expected {LAYOUT}")
        self.settings = settings or common.EventSettings(window_events=32000)
        self.size = common.parse_size(img_size) or list(ESS_SIZE)
        self.augment = bool(augment)
        self.recordings = [Recording(folders[i]) for i in SPLITS[split]]
        self.items = [(r, p) for r, rec in enumerate(self.recordings) for p in rec.labels]
        if not self.items:
            raise ValueError(f"no segmentation masks in the {split} recordings of {root}")
        h, w = common.label_size(self.items[0][1])
        if (h, w) != LABEL_SIZE:
            raise ValueError(f"label {self.items[0][1]} is {w}x{h}; expected 346x200 (Ev-SegNet's DDD17 labels)")
        for rec in self.recordings:
            if rec.labels:
                rec.check_windows(self.settings)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        r, path = self.items[index]
        label = common.read_label(path, len(CLASSES))
        if tuple(label.shape) != LABEL_SIZE:
            raise ValueError(f"label {path} is {label.shape[1]}x{label.shape[0]}; expected 346x200")
        kwargs = self.settings.window_kwargs()
        events, t_img_ns = self.recordings[r].window(path, **kwargs)
        window = (t_img_ns - kwargs["duration_us"] * 1000, t_img_ns) if "duration_us" in kwargs else None
        grid = self.settings.tensor(events, *SENSOR, "ddd17", window)[..., : LABEL_SIZE[0], :]
        x, label = common.resize_pair(self.settings.shape_item(grid), label, self.size)
        return common.flip_pair(x, label, self.augment)


def build(cfg, split):
    return DDD17Events(
        cfg["data_root"],
        split,
        settings=common.settings_from_cfg(cfg),
        img_size=cfg.get("img_size"),
        augment=bool(cfg["augment"]) and split == "train",
    )


SPEC = DatasetSpec(
    name=NAME,
    build=build,
    classes=CLASSES,
    palette=PALETTE,
    modality=EVENTS,
    in_channels=common.in_channels_of,
    needs_root=True,
    check=common.check,
    keys=common.KEYS,
)
