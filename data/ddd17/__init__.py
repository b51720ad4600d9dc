"""DDD17 event-camera segmentation in the Ev-SegNet preparation, from folders or a packed HDF5 file.

Folder layout (root):

    events/{train,test}/rec<recording>_export_<frame>.npy   float32 (200, 346, 6)
    labels/{train,test}/rec<recording>_export_<frame>.png   8-bit, classes 0..5, 255 ignored
    images/{train,test}/rec<recording>_export_<frame>.png   grayscale frames (not read)

Event channels: 0 positive count, 1 negative count, 2 positive mean timestamp,
3 positive timestamp std, 4 negative mean timestamp, 5 negative timestamp std.

`root` may also be a packed HDF5 file, or a folder holding `<split>.h5` (preferred over
the .npy tree when present: it loads faster). Pack with

    python -m data.ddd17 pack ROOT SPLIT OUT.h5

Frames are ordered by recording, then frame number (numerically). Consecutive frame
numbers of one recording form a sequence; a gap starts a new one. With target history
learning (thl=True) an item is the T frames ending at a target frame; a window never
crosses a gap or a recording change, so the first T-1 frames of every sequence are
history only and are not targets (`dropped_targets` counts them).
"""

import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common import files
from common.keys import Key
from data.event_frames import CHANNELS, NUM_EVENT_CHANNELS, check_channels
from data.palettes import DDD17_PALETTE
from data.registry import EVENTS, DatasetSpec
from data.transforms import ddd17_transform, scale_events
from data.voc2012 import load_mask

CLASSES = ("flat", "construction+sky", "object", "nature", "human", "vehicle")
NUM_CLASSES = len(CLASSES)
FORMAT = "snnseg-ddd17-1"
NPY_MAGIC = b"\x93NUMPY"
NAME = re.compile(r"^rec(\d+)_export_(\d+)$")
LAYOUT = (
    "<root>/events/<split>/rec<recording>_export_<frame>.npy and "
    "<root>/labels/<split>/rec<recording>_export_<frame>.png (Ev-SegNet DDD17), "
    "or <root>/<split>.h5 packed with `python -m data.ddd17 pack`"
)


def frame_key(name):
    """'rec1487417411_export_2650' (or a path to it) -> (1487417411, 2650); None if not that pattern."""
    match = NAME.match(Path(name).stem)
    return (int(match.group(1)), int(match.group(2))) if match else None


def frame_name(key):
    return f"rec{key[0]}_export_{key[1]}"


def load_events(path) -> np.ndarray:
    """float32 (H, W, 6) event frame; names the file when unreadable, not a .npy array, of the wrong
    shape or holding NaN/inf (which min-max scaling would silently turn into a blank channel)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        array = np.load(path, allow_pickle=False) if magic == NPY_MAGIC else None
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read event file {path}: {err}") from err
    if array is None:  # np.load takes any other content for a pickle and would advise allow_pickle
        raise ValueError(f"event file {path} is not a NumPy .npy array (it does not start with the .npy header)")
    check_event_shape(array, path)
    check_finite(array, path)
    return array.astype(np.float32, copy=False)


def check_finite(array, source):
    """Non-finite event values are corrupt data: an error naming the frame and the channels."""
    finite = np.isfinite(array)
    if not finite.all():
        channels = sorted(set(np.nonzero(~finite)[-1].tolist()))
        raise ValueError(
            f"event file {source} holds {int((~finite).sum())} NaN/inf values (channels "
            f"{channels}); re-export the frame or leave it out with a datalist"
        )


def check_event_shape(array, path):
    if array.ndim != 3 or array.shape[2] != NUM_EVENT_CHANNELS:
        raise ValueError(f"event file {path} has shape {array.shape}; expected (H, W, 6), e.g. (200, 346, 6)")


def check_same_size(events, label, path):
    """Events (H, W, C) and label (H, W) must cover the same pixels."""
    if events.shape[:2] != tuple(label.shape):
        raise ValueError(f"event file {path} is {events.shape[:2]} but its label is {tuple(label.shape)}")


class FolderFrames:
    """Frames of one split in the Ev-SegNet folder tree."""

    def __init__(self, root: Path, split: str):
        self.events_dir = root / "events" / split
        self.labels_dir = root / "labels" / split
        if not self.events_dir.is_dir() or not self.labels_dir.is_dir():
            raise FileNotFoundError(f"DDD17 split {split!r} not found under {root}: expected {LAYOUT}")
        files.check_readable_folder(self.events_dir, "event folder")
        files.check_readable_folder(self.labels_dir, "label folder")
        keys = sorted(k for k in map(frame_key, os.listdir(self.events_dir)) if k is not None)
        if not keys:
            raise FileNotFoundError(f"no rec<recording>_export_<frame>.npy files in {self.events_dir}")
        unlabeled = [frame_name(k) for k in keys if not (self.labels_dir / f"{frame_name(k)}.png").is_file()]
        if unlabeled:
            raise FileNotFoundError(
                f"{len(unlabeled)} event frames in {self.events_dir} have no label png in "
                f"{self.labels_dir}; first: {unlabeled[:5]}"
            )
        self.keys = keys

    def source(self, i):
        return self.events_dir / f"{frame_name(self.keys[i])}.npy"

    def events(self, i, channels=None):
        array = load_events(self.source(i))
        return array if channels is None else array[:, :, channels]

    def label(self, i):
        return load_mask(self.labels_dir / f"{frame_name(self.keys[i])}.png", NUM_CLASSES)


class HDF5Frames:
    """Frames of one split packed by `pack`; the file is opened lazily so DataLoader workers each own one."""

    def __init__(self, path: Path, split: str):
        self.path = path
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not a packed DDD17 file (format {f.attrs.get('format')!r}, expected {FORMAT!r})"
                    )
                packed_split = f.attrs["split"]
                self.keys = list(zip(f["recording"][:].tolist(), f["frame"][:].tolist()))
        except OSError as err:
            raise ValueError(f"cannot read HDF5 file {path}: {err}") from err
        if packed_split != split:
            raise ValueError(f"{path} holds split {packed_split!r}, not {split!r}")
        self.file = None

    def _open(self):
        if self.file is None:
            self.file = h5py.File(self.path, "r")
        return self.file

    def source(self, i):
        return f"{self.path}[{i}] ({frame_name(self.keys[i])})"

    def events(self, i, channels=None):
        data = self._open()["events"]
        if channels is None:
            array = data[i]
        else:  # channel by channel: chunks hold one channel, so unchosen channels are never decompressed
            array = np.stack([data[i, :, :, c] for c in channels], axis=-1)
        check_finite(array, self.source(i))  # files packed before packing checked them
        return array

    def label(self, i):
        return torch.from_numpy(self._open()["labels"][i].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "file": None}


def open_frames(root, split):
    root = Path(root)
    if root.is_file():
        return HDF5Frames(root, split)
    if (root / f"{split}.h5").is_file():
        return HDF5Frames(root / f"{split}.h5", split)
    if not root.is_dir():
        raise FileNotFoundError(f"DDD17 root {root} does not exist: expected {LAYOUT}")
    return FolderFrames(root, split)


def read_datalist(path, known):
    """Frame keys listed in a datalist (one frame name or path per line), all present in `known`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found")
    lines = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if frame_key(line) is None]
    if bad:
        raise ValueError(f"datalist {path}: entries not named rec<recording>_export_<frame>: {bad[:5]}")
    keys = [frame_key(line) for line in lines]
    missing = [frame_name(k) for k in keys if k not in known]
    if missing:
        raise FileNotFoundError(
            f"datalist {path}: {len(missing)} entries have no frame in the split; first: {missing[:5]}"
        )
    return keys


class DDD17(torch.utils.data.Dataset):
    """Items: x float32 [C, H, W] ([T, C, H, W] with thl), y int64 [H, W] in 0..5 or 255.

    Each chosen channel of each frame is min-max scaled to [-0.5, 0.5]. img_size: None/-1
    native (200 x 346), int or (h, w) resize (bilinear events, nearest labels). augment:
    the paper's flip/scale/translate/rotate, on raw events before scaling (fill 0 = no
    events, label fill 255).
    """

    def __init__(
        self, root, split="train", img_size=None, channels=(0, 1), thl=False, timesteps=20, datalist=None, augment=False
    ):
        self.frames = open_frames(root, split)
        self.channels = list(check_channels(channels))
        self.thl = bool(thl)
        self.timesteps = int(timesteps) if self.thl else 1
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        position = {key: i for i, key in enumerate(self.frames.keys)}
        targets = read_datalist(datalist, position) if datalist else self.frames.keys
        self.windows = []
        for rec, frame in targets:
            window = [position.get((rec, f)) for f in range(frame - self.timesteps + 1, frame + 1)]
            if None not in window:
                self.windows.append(window)
        self.dropped_targets = len(targets) - len(self.windows)
        if not self.windows:
            raise ValueError(
                f"no DDD17 targets in {root} ({split}) have {self.timesteps - 1} consecutive preceding frames"
            )
        self.transform = ddd17_transform(img_size, augment)

    def __len__(self):
        return len(self.windows)

    def frame_keys(self, index):
        """(recording, frame) of each frame of item `index`, oldest first."""
        return [self.frames.keys[i] for i in self.windows[index]]

    def __getitem__(self, index):
        window = self.windows[index]
        label = self.frames.label(window[-1])
        stack = []
        for i in window:
            events = self.frames.events(i, self.channels)
            check_same_size(events, label, self.frames.source(i))
            stack.append(torch.from_numpy(np.ascontiguousarray(events)).permute(2, 0, 1))
        x = torch.stack(stack)
        if self.transform is not None:
            x, label = self.transform(x, label)
        x = scale_events(x)
        return (x if self.thl else x[0]), label


def is_packed(path) -> bool:
    """Whether `path` is a packed DDD17 file (the only kind `pack` replaces). Never raises."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except Exception:
        return False


def pack(root, split, out, compression="gzip"):
    """Pack a split of the folder tree into one chunked, compressed HDF5 file (written atomically); an
    existing `out` is replaced only if it is a packed DDD17 file."""
    files.check_output(out, "output file")  # before reading a single frame
    files.check_replace(out, "output file", "a packed DDD17 file", is_packed)
    frames = FolderFrames(Path(root), split)
    with files.atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        _write_frames(f, frames, split, compression)
    return len(frames.keys)


def _write_frames(f, frames, split, compression):
    first = frames.events(0)
    height, width = first.shape[:2]
    n = len(frames.keys)
    f.attrs.update(format=FORMAT, split=split)
    f["recording"] = np.array([k[0] for k in frames.keys], dtype=np.int64)
    f["frame"] = np.array([k[1] for k in frames.keys], dtype=np.int64)
    # One chunk per frame and channel: reading channels 0-1 touches a third of the data.
    events = f.create_dataset(
        "events",
        (n, height, width, NUM_EVENT_CHANNELS),
        dtype="float32",
        chunks=(1, height, width, 1),
        compression=compression,
        shuffle=compression is not None,
    )
    labels = f.create_dataset(
        "labels", (n, height, width), dtype="uint8", chunks=(1, height, width), compression=compression
    )
    for i in tqdm(range(n), desc=f"packing {split}", unit="frame"):
        label = frames.label(i)
        array = frames.events(i)
        check_same_size(array, label, frames.source(i))
        events[i] = array
        labels[i] = label.numpy().astype(np.uint8)


def build(cfg, split):
    training = split == "train"
    return DDD17(
        cfg["data_root"],
        "train" if training else "test",
        img_size=cfg.get("img_size"),
        channels=cfg["channels"],
        thl=bool(cfg["thl"]),
        timesteps=int(cfg.get("timesteps", 1)),
        datalist=cfg["datalist"] if training else None,
        augment=bool(cfg["augment"]) and training,
    )


SPEC = DatasetSpec(
    name="ddd17",
    build=build,
    classes=CLASSES,
    palette=tuple(DDD17_PALETTE),
    modality=EVENTS,
    in_channels=lambda cfg: len(cfg["channels"]),
    needs_root=True,
    keys=(
        CHANNELS,
        Key("datalist", "data", None, str, "ddd17 training: a list of the frames to train on", optional=True),
    ),
    check=lambda cfg: check_channels(cfg["channels"]),
)
