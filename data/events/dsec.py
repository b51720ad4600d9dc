"""DSEC-Semantic: DSEC's left event camera with the DSEC-Semantic labels (ESS, Sun et al. ECCV 2022).

Per sequence `<root>/<split folder>/<sequence>/`:

    events/left/events.h5        events/{x,y,t,p}, ms_to_idx, t_offset (Blosc; needs hdf5plugin)
    events/left/rectify_map.h5   rectify_map float32 [480, 640, 2]
and the labels in one of these layouts (detected per sequence):
    'ess-readme'  semantic/left/<N>classes/data/NNNNNN.png + semantic/timestamps.txt
    'ess-code'    semantic/<N>classes/data/NNNNNN.png      + semantic/timestamps.txt
    'flat'        <N>classes/NNNNNN.png (or <N>classes/data/) + one *timestamps.txt in <sequence>/

The split folders are `train/` and `test/`; split 'val' reads `test/` (the published numbers are on
the test sequences zurich_city_13_a, 14_c, 15_a). timestamps.txt holds one label timestamp per line
(microseconds, the clock of events/t + t_offset), in the order of the sorted label files.

An item is the label and the events of the window that ends at its timestamp: the last `window_ms`
milliseconds or the last `window_events` events (ESS and Spike-BRGNet: 100,000 events). Events are
rectified (rectify_map[y, x]), turned into the chosen representation on the 640x480 sensor, normalised,
and the bottom rows the labels lack are dropped (480 -> 440: ESS drops the bottom 40 rows).
labels='ess' keeps ESS's label frames: the first 6 of each sequence are dropped and then every second
label is used; labels='all' uses every label.
"""

import warnings
from pathlib import Path

import numpy as np
import torch

from common import files
from common.keys import Key
from data.events import common
from data.events.h5 import EventFile, load_rectify_map
from data.registry import EVENTS, DatasetSpec

NAME = "dsec-semantic"
SPLIT_FOLDERS = {"train": "train", "val": "test", "test": "test"}
SENSOR = (480, 640)  # DSEC's event camera (height, width)
TRAIN_SEQUENCES = tuple(f"zurich_city_{s}" for s in ("00_a", "01_a", "02_a", "04_a", "05_a", "06_a", "07_a", "08_a"))
TEST_SEQUENCES = ("zurich_city_13_a", "zurich_city_14_c", "zurich_city_15_a")
ESS_DROPPED_LABELS = 6  # (remove_time_window 250 ms // 100 + 1) * 2 in ESS's Sequence
ESS_LABEL_STRIDE = 2

CLASSES_11 = (
    "background",
    "building",
    "fence",
    "person",
    "pole",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)
PALETTE_11 = (
    (0, 0, 0),
    (70, 70, 70),
    (190, 153, 153),
    (220, 20, 60),
    (153, 153, 153),
    (128, 64, 128),
    (244, 35, 232),
    (107, 142, 35),
    (0, 0, 142),
    (102, 102, 156),
    (220, 220, 0),
)
# Cityscapes' 19 training classes (train ids 0..18) and colours.
CLASSES_19 = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
PALETTE_19 = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
LAYOUT = (
    "<root>/{train,test}/<sequence>/events/left/{events.h5,rectify_map.h5} and labels as "
    "semantic/left/<N>classes/data/*.png + semantic/timestamps.txt (ESS README), "
    "semantic/<N>classes/data/*.png + semantic/timestamps.txt (ESS code), "
    "or <N>classes/*.png + a *timestamps.txt in the sequence folder"
)


def class_names(classes):
    return CLASSES_11 if int(classes) == 11 else CLASSES_19


def _check_classes(classes):
    if int(classes) not in (11, 19):
        raise ValueError(f"dsec_classes must be 11 or 19, got {classes}")
    return int(classes)


def find_labels(seq_dir, classes):
    """(layout name, sorted label paths, timestamps file) of one sequence, or an error naming what is missing."""
    sub = f"{classes}classes"
    candidates = [
        ("ess-readme", seq_dir / "semantic" / "left" / sub / "data", seq_dir / "semantic" / "timestamps.txt"),
        ("ess-code", seq_dir / "semantic" / sub / "data", seq_dir / "semantic" / "timestamps.txt"),
    ]
    for flat in (seq_dir / sub / "data", seq_dir / sub):
        stamps = sorted(seq_dir.glob("*timestamps.txt"))
        candidates.append(("flat", flat, stamps[0] if len(stamps) == 1 else seq_dir / "timestamps.txt"))
    for layout, label_dir, stamps in candidates:
        if label_dir.is_dir():
            files.check_readable_folder(label_dir, "label folder")
            labels = sorted(label_dir.glob("*.png"))
            if not labels:
                raise FileNotFoundError(f"no .png labels in {label_dir}")
            if not stamps.is_file():
                raise FileNotFoundError(f"{label_dir} has labels but {stamps} is missing (one timestamp per label)")
            return layout, labels, stamps
    raise FileNotFoundError(f"no {classes}-class labels for sequence {seq_dir}: expected {LAYOUT}")


def read_timestamps(path, count):
    try:
        stamps = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as err:
        raise ValueError(f"{path}: expected one integer timestamp (microseconds) per line: {err}") from None
    if stamps.size != count:
        raise ValueError(f"{path} holds {stamps.size} timestamps for {count} label files")
    if (np.diff(stamps) < 0).any():
        raise ValueError(f"{path}: label timestamps go backwards")
    return stamps


class Sequence:
    def __init__(self, seq_dir, classes, sensor=None):
        self.name = seq_dir.name
        self.layout, self.labels, stamps_file = find_labels(seq_dir, classes)
        self.timestamps = read_timestamps(stamps_file, len(self.labels))
        event_dir = seq_dir / "events" / "left"
        self.rectify_map = load_rectify_map(event_dir / "rectify_map.h5", sensor or self._sensor_of_labels())
        self.sensor = self.rectify_map.shape[:2]
        self.events = EventFile(event_dir / "events.h5", sensor=self.sensor)

    def _sensor_of_labels(self):
        """The sensor the labels imply (the size most of the first, middle and last labels have): DSEC's
        640x480 for 640-wide labels; else (other data in the DSEC layout) as wide as the labels and at
        least as high, (-height, width)."""
        sizes = [common.label_size(self.labels[i]) for i in (-1, len(self.labels) // 2, 0)]
        height, width = max(sizes, key=sizes.count)
        return SENSOR if width == SENSOR[1] else (-height, width)

    def check_windows(self, chosen, settings):
        """Before any item is read, from ms_to_idx and the first and last event alone: the chosen labels whose
        window holds no event or whose timestamp lies outside the events' time range (at or before the first
        event, or later than the last one by more than the window's length and common.LATE_US). All of them:
        an error naming the sequence; some: a warning with their share."""
        f = self.events
        duration = settings.window_kwargs().get("duration_us")
        local = (self.timestamps[list(chosen)] - f.t_offset).tolist()  # on the events' clock
        after = f.last_t + max(duration or 0, common.LATE_US)
        bad = [
            not f.num_events or t <= f.first_t or t > after or f.event_bounds(t + f.t_offset, duration) == 0
            for t in local
        ]
        if not any(bad):
            return
        ranges = (
            f"labels at {min(local)}..{max(local)} us and events at {f.first_t}..{f.last_t} us on the events' "
            f"clock, i.e. timestamps.txt minus t_offset {f.t_offset}"
        )
        if all(bad):
            raise ValueError(
                f"sequence {self.name}: none of its {len(bad)} windows holds events of its label's time ({ranges}): "
                f"wrong t_offset, timestamps.txt or ms_to_idx in {f.path}?"
            )
        share = sum(bad) / len(bad)
        warnings.warn(
            f"sequence {self.name}: {sum(bad)} of its {len(bad)} windows ({share:.0%}) hold no event or lie outside "
            f"the events' time range ({ranges}); their inputs are empty or of another time",
            common.EmptyWindowWarning,
            stacklevel=3,
        )


class DSECSemantic(torch.utils.data.Dataset):
    """Items: x float32 [B*C, H, W] (or [B, C, H, W] with settings.as_timesteps), y int64 [H, W] (255 ignored)."""

    def __init__(
        self, root, split="train", classes=11, settings=None, img_size=None, augment=False, labels="ess", sensor=None
    ):
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"dsec-semantic has splits {sorted(SPLIT_FOLDERS)}, got {split!r}")
        if labels not in ("ess", "all"):
            raise ValueError(f"dsec_labels must be 'ess' or 'all', got {labels!r}")
        self.classes = int(classes)  # 11 or 19 for DSEC-Semantic (checked by build); any count for other data
        self.settings = settings or common.EventSettings()
        self.size = common.parse_size(img_size)
        self.augment = bool(augment)
        root = Path(root)
        split_dir = root / SPLIT_FOLDERS[split]
        if not split_dir.is_dir():
            raise FileNotFoundError(f"DSEC-Semantic split folder {split_dir} not found: expected {LAYOUT}")
        seq_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
        if not seq_dirs:
            raise FileNotFoundError(f"no sequence folders in {split_dir}: expected {LAYOUT}")
        self.sequences = [Sequence(d, self.classes, sensor) for d in seq_dirs]
        self.items = []
        for s, seq in enumerate(self.sequences):
            chosen = range(len(seq.labels))
            if labels == "ess":
                chosen = range(ESS_DROPPED_LABELS, len(seq.labels), ESS_LABEL_STRIDE)
            self.items += [(s, i) for i in chosen]
            self._check_label_size(seq)
            if len(chosen):
                seq.check_windows(chosen, self.settings)
        if not self.items:
            raise ValueError(
                f"no labelled frames in {split_dir} (labels={labels!r} drops the first 6 of each sequence)"
            )

    def _check_label_size(self, seq):
        height, width = seq.sensor
        h, w = common.label_size(seq.labels[0])
        if w != width or h > height:
            raise ValueError(
                f"label {seq.labels[0]} is {w}x{h}; expected {width} wide and at most {height} high "
                f"(the rectified {width}x{height} sensor, bottom rows cropped: 640x440 for DSEC)"
            )

    def __len__(self):
        return len(self.items)

    def sample(self, index):
        """(sequence, label index, label timestamp) of item `index`."""
        s, i = self.items[index]
        return self.sequences[s], i, int(self.sequences[s].timestamps[i])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        seq, i, t_end = self.sample(index)
        label = common.read_label(seq.labels[i], self.classes)
        height, width = seq.sensor
        if label.shape[1] != width or label.shape[0] > height:
            raise ValueError(f"label {seq.labels[i]} is {label.shape[1]}x{label.shape[0]}; expected {width} wide")
        kwargs = self.settings.window_kwargs()
        events = seq.events.window(t_end, **kwargs)
        xy = seq.rectify_map[events["y"], events["x"]]
        rectified = dict(x=xy[:, 0], y=xy[:, 1], t=events["t"], p=events["p"])
        window = (t_end - kwargs["duration_us"], t_end) if "duration_us" in kwargs else None
        grid = self.settings.tensor(rectified, height, width, "dsec", window)
        grid = grid[..., : label.shape[0], :]  # ESS: the bottom rows, which the labels lack, are dropped
        x = self.settings.shape_item(grid)
        x, label = common.resize_pair(x, label, self.size)
        return common.flip_pair(x, label, self.augment)


def build(cfg, split):
    training = split == "train"
    ds = DSECSemantic(
        cfg["data_root"],
        split,
        classes=_check_classes(cfg["dsec_classes"]),
        settings=common.settings_from_cfg(cfg),
        img_size=cfg.get("img_size"),
        augment=bool(cfg["augment"]) and training,
        labels=cfg["dsec_labels"],
    )
    return ds


def _classes_of(cfg):
    return class_names(_check_classes((cfg or {}).get("dsec_classes", 11)))


SPEC = DatasetSpec(
    name=NAME,
    build=build,
    classes=_classes_of,
    palette=lambda cfg: PALETTE_11 if len(_classes_of(cfg)) == 11 else PALETTE_19,
    modality=EVENTS,
    in_channels=common.in_channels_of,
    needs_root=True,
    check=common.check,
    keys=(
        *common.KEYS,
        Key("dsec_classes", "data", 11, int, "dsec-semantic: 11 or 19 classes", (11, 19)),
        Key(
            "dsec_labels",
            "data",
            "ess",
            str,
            "dsec-semantic: ess (drop 6 labels per sequence, then every second) or all",
            ("ess", "all"),
        ),
    ),
)
