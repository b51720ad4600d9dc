"""The evaluation loop shared by train.py (validation each epoch) and test.py."""

import torch
from tqdm import tqdm

from data.transforms import IGNORE_INDEX
from utils.metrics import ConfusionMatrix


def autocast(device, cfg: dict):
    """bfloat16 autocast when the config asks for mixed precision (``amp``), else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(cfg.get("amp")))


def to_model_input(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Loader batches with target history learning are [N, T, C, H, W]; the model wants [T, N, C, H, W]."""
    if cfg.get("thl"):
        if x.dim() != 5:
            raise ValueError(f"thl batches must be [N, T, C, H, W], got shape {tuple(x.shape)}")
        return x.transpose(0, 1)
    return x


@torch.no_grad()
def evaluate(model, loader, cfg: dict, device, show_bar: bool = True, desc: str = "val", input_transform=None) -> dict:
    """Confusion matrix over the whole loader (all-reduced across processes) -> miou, pixel_acc, mean_acc,
    fwiou, per_class_iou, num_pixels. `input_transform(x, y)` (optional) changes each input batch before
    the model sees it, e.g. a corruption for robustness tests."""
    model.eval()
    matrix = ConfusionMatrix(cfg["num_classes"], ignore_index=IGNORE_INDEX)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not show_bar, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if input_transform is not None:
            x = input_transform(x, y)
        with autocast(device, cfg):
            logits = model(to_model_input(x, cfg))
        matrix.update(logits.argmax(dim=1), y)
    matrix.all_reduce()
    metrics = matrix.compute()
    metrics["num_pixels"] = int(matrix.mat.sum())
    return metrics
