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
`window_events` events (ESS / Spike-BRGNet: 32,000) or the last `window_ms` milliseconds.
"""

from pathlib import Path

import numpy as np
import torch

from data.events import common
from data.registry import EVENTS, DatasetSpec

NAME = "ddd17-events"
CLASSES = ("flat", "construction+sky", "object", "nature", "human", "vehicle")
PALETTE = ((128, 64, 128), (70, 130, 180), (220, 220, 0), (107, 142, 35), (220, 20, 60), (0, 0, 142))
SENSOR = (260, 346)
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
        index_file = self.folder / "index" / "index_50ms.npy"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: expected {LAYOUT}")
        try:
            self.index = np.load(index_file, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {index_file}: {err}") from None
        if self.index.ndim != 2 or self.index.shape[1] < 2:
            raise ValueError(f"{index_file} has shape {self.index.shape}; expected [images, 3]")
        self.index_file = index_file
        masks = self.folder / "segmentation_masks"
        if not masks.is_dir():
            raise FileNotFoundError(f"{masks} not found (unzip segmentation_masks.zip there): expected {LAYOUT}")
        self.labels = sorted(masks.glob("*.png"), key=lambda p: image_number(p))
        self._t = self._xyp = None

    def __getstate__(self):
        return {**self.__dict__, "_t": None, "_xyp": None}

    def arrays(self):
        if self._t is None:
            self._t = np.memmap(self.t_file, dtype=np.int64, mode="r", shape=(self.num_events,))
            self._xyp = np.memmap(self.xyp_file, dtype=np.int16, mode="r", shape=(self.num_events, 3))
        return self._t, self._xyp

    def window(self, label_path, duration_us=None, count=None):
        j = image_number(label_path) - 1
        if not 0 <= j < len(self.index):
            raise ValueError(f"label {label_path} names image {j + 1}, but {self.index_file} has {len(self.index)}")
        t_img_ns, stop = int(self.index[j, 0]), int(self.index[j, 1])
        if not 0 <= stop <= self.num_events:
            raise ValueError(f"{self.index_file} row {j} points at event {stop} of {self.num_events}")
        t, xyp = self.arrays()
        if count is not None:
            start = max(0, stop - int(count))
        else:
            start = min(int(np.searchsorted(t, t_img_ns - int(duration_us) * 1000, side="left")), stop)
        events = dict(
            x=np.asarray(xyp[start:stop, 0], dtype=np.int64),
            y=np.asarray(xyp[start:stop, 1], dtype=np.int64),
            t=np.asarray(t[start:stop], dtype=np.int64),
            p=np.asarray(xyp[start:stop, 2], dtype=np.int64),
        )
        self.check(events, start)
        return events, t_img_ns

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


def image_number(path):
    try:
        return int(Path(path).stem.split("_")[-1])
    except ValueError:
        raise ValueError(f"label {path}: expected a name ending in _<image number>.png") from None


class DDD17Events(torch.utils.data.Dataset):
    """Items: x float32 [B*C, 200, 346] (or [B, C, 200, 346] as timesteps), y int64 [200, 346]."""

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
        self.size = common.parse_size(img_size)
        self.augment = bool(augment)
        self.recordings = [Recording(folders[i]) for i in SPLITS[split]]
        self.items = [(r, p) for r, rec in enumerate(self.recordings) for p in rec.labels]
        if not self.items:
            raise ValueError(f"no segmentation masks in the {split} recordings of {root}")
        h, w = common.label_size(self.items[0][1])
        if (h, w) != (200, 346):
            raise ValueError(f"label {self.items[0][1]} is {w}x{h}; expected 346x200 (Ev-SegNet's DDD17 labels)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        r, path = self.items[index]
        label = common.read_label(path, len(CLASSES))
        if tuple(label.shape) != (200, 346):
            raise ValueError(f"label {path} is {label.shape[1]}x{label.shape[0]}; expected 346x200")
        events, t_img_ns = self.recordings[r].window(path, **self.settings.window_kwargs())
        window = (t_img_ns - self.settings.window_ms * 1e6, t_img_ns)
        grid = self.settings.tensor(events, *SENSOR, unbiased=False, window=window)[..., :200, :]
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
    keys=common.KEYS,
)
