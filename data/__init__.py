"""Datasets for SNN semantic segmentation: a registry from name to builder.

    build_dataset(cfg, split) -> torch Dataset of (x float32 [C, H, W] or [T, C, H, W], y int64 [H, W])
    dataset_info(name, cfg=None) -> dict(num_classes, in_channels, class_names, ignore_index, palette)

    collate(batch) -> (x, y): stacks items, padding those of different sizes (see collate)

cfg is the flat run config; keys read here: dataset, data_root, img_size, augment, thl, timesteps,
channels, seed, num_train, num_val, seq_len, train_split, void_to_background, datalist, and for the
raw-event datasets (data/events/) representation, bins, separate_polarity, window_ms, window_events,
event_norm, dsec_classes, dsec_labels, raw_events; a key
missing from cfg takes its default from the configuration schema (utils/config.py).
split is 'train' or 'val' (ddd17 'val' reads its 'test' folder; voc2012 'train' reads
cfg['train_split'], e.g. 'train_aug').
"""

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from data.events import common as _event_common
from data.events import ddd17_events as _ddd17_events
from data.events import dsec as _dsec
from data.palettes import DDD17_PALETTE, SYNTHETIC_PALETTE, VOC_PALETTE
from data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from data.synthetic import SyntheticEvents, SyntheticShapes
from data.transforms import IGNORE_INDEX
from utils import config as config_schema

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
DDD17_CLASSES = ("flat", "construction+sky", "object", "nature", "human", "vehicle")


def _resolved(cfg):
    return {**config_schema.defaults(), **(cfg or {})}


def _check_split(split):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _require_root(cfg, name):
    if not cfg["data_root"]:
        raise ValueError(
            f"dataset {name!r} needs data_root (a local folder); see README.md, section Data, for the layout"
        )
    return cfg["data_root"]


def _build_voc(cfg, split):
    root = _require_root(cfg, "voc2012")
    from data.voc2012 import VOC2012

    training = split == "train"
    return VOC2012(
        root,
        cfg["train_split"] if training else "val",
        img_size=cfg["img_size"],
        augment=bool(cfg["augment"]) and training,
        void_to_background=bool(cfg["void_to_background"]) and training,
    )


def _build_ddd17(cfg, split):
    root = _require_root(cfg, "ddd17")
    from data.ddd17 import DDD17

    training = split == "train"
    return DDD17(
        root,
        "train" if training else "test",
        img_size=cfg["img_size"],
        channels=cfg["channels"],
        thl=bool(cfg["thl"]),
        timesteps=int(cfg["timesteps"]),
        datalist=cfg["datalist"] if training else None,
        augment=bool(cfg["augment"]) and training,
    )


def _build_synthetic(cfg, split):
    return SyntheticShapes(
        split,
        num_samples=cfg["num_train" if split == "train" else "num_val"],
        img_size=cfg["img_size"],
        seed=int(cfg["seed"]),
    )


def _build_synthetic_events(cfg, split):
    if cfg["raw_events"]:  # the same shapes as raw events in the DSEC layout, read by the dsec-semantic code
        from data.events import synthetic_raw

        return synthetic_raw.build(cfg, split, _event_common.settings_from_cfg(cfg))
    return SyntheticEvents(
        split,
        num_samples=cfg["num_train" if split == "train" else "num_val"],
        img_size=cfg["img_size"],
        seed=int(cfg["seed"]),
        channels=cfg["channels"],
        thl=bool(cfg["thl"]),
        timesteps=int(cfg["timesteps"]),
        seq_len=int(cfg["seq_len"]),
    )


DATASETS = {
    "voc2012": _build_voc,
    "ddd17": _build_ddd17,
    "synthetic": _build_synthetic,
    "synthetic-events": _build_synthetic_events,
    _dsec.NAME: _dsec.build,
    _ddd17_events.NAME: _ddd17_events.build,
}
# Raw-event datasets, each one specification (name, classes, palette, in_channels, build, keys).
_SPECS = {spec["name"]: spec for spec in (_dsec.SPEC, _ddd17_events.SPEC)}

_INFO = {
    "voc2012": (VOC_CLASSES, 3, VOC_PALETTE[: len(VOC_CLASSES)]),
    "ddd17": (DDD17_CLASSES, None, DDD17_PALETTE),
    "synthetic": (SYNTHETIC_CLASSES, 3, SYNTHETIC_PALETTE),
    "synthetic-events": (SYNTHETIC_CLASSES, None, SYNTHETIC_PALETTE),
}


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choices: {sorted(DATASETS)}")


def build_dataset(cfg: dict, split: str):
    """The dataset named by cfg['dataset'] for split 'train' or 'val'."""
    cfg = _resolved(cfg)
    _check_name(cfg["dataset"])
    _check_split(split)
    return DATASETS[cfg["dataset"]](cfg, split)


def dataset_info(name: str, cfg: dict = None) -> dict:
    """num_classes, in_channels, class_names, ignore_index, palette of a dataset.

    For event datasets in_channels is the number of chosen channels (cfg['channels'],
    default [0, 1]).
    """
    _check_name(name)
    if name in _SPECS:
        spec, resolved = _SPECS[name], _resolved(cfg)
        class_names, palette = spec["classes"], spec["palette"]
        class_names = class_names(resolved) if callable(class_names) else class_names
        palette = palette(resolved) if callable(palette) else palette
        in_channels = spec["in_channels"](resolved)
    else:
        class_names, in_channels, palette = _INFO[name]
    if name == "synthetic-events" and _resolved(cfg)["raw_events"]:
        in_channels = _event_common.in_channels_of(_resolved(cfg))
    if in_channels is None:
        in_channels = len(_resolved(cfg)["channels"])
    return dict(
        num_classes=len(class_names),
        in_channels=in_channels,
        class_names=list(class_names),
        ignore_index=IGNORE_INDEX,
        palette=[tuple(c) for c in palette],
    )


def collate(batch):
    """Stack (x, y) items into a batch. Items of different sizes (VOC2012 at its native size) are padded
    at the bottom and right to the batch's largest height and width: inputs with 0 (the mean colour /
    no events), labels with IGNORE_INDEX, so padding counts in neither the loss nor the metrics."""
    sizes = {tuple(y.shape[-2:]) for _, y in batch}
    if len(sizes) == 1:
        return default_collate(batch)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)

    def pad(tensor, value):
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    return (torch.stack([pad(x, 0.0) for x, _ in batch]), torch.stack([pad(y, IGNORE_INDEX) for _, y in batch]))
