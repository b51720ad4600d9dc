"""Datasets for SNN semantic segmentation: one registered specification per dataset.

    build_dataset(cfg, split) -> torch Dataset of (x float32 [C, H, W] or [T, C, H, W], y int64 [H, W])
    dataset_info(name, cfg=None) -> dict(num_classes, in_channels, class_names, ignore_index, palette)
    collate(batch) -> (x, y): stacks items, padding those of different sizes (see collate)

``cfg`` is the flat run config: the data keys (``data/registry.py``: the common ones, and each dataset's
own, listed in its spec) plus ``img_size``, ``timesteps`` and ``seed`` as the run sets them; a data key
missing from ``cfg`` takes its default. ``split`` is 'train' or 'val' (ddd17 'val' reads its 'test'
folder; voc2012 'train' reads cfg['train_split'], e.g. 'train_aug').

A new dataset is a module with a ``DatasetSpec`` (see ``data/registry.py``), registered below.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from data import ddd17, synthetic, voc2012
from data.events import ddd17_events, dsec
from data.registry import DATASETS, EVENTS, IMAGES, build_dataset, dataset_info, register
from data.transforms import IGNORE_INDEX

register(voc2012.SPEC, ddd17.SPEC, synthetic.SHAPES_SPEC, synthetic.EVENTS_SPEC, dsec.SPEC, ddd17_events.SPEC)


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


__all__ = ["DATASETS", "EVENTS", "IMAGES", "build_dataset", "collate", "dataset_info", "register"]
