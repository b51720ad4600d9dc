"""Segmentation metrics from one confusion matrix accumulated over the whole split.

Rows of the matrix are the true class, columns the predicted class. Pixels whose label is
`ignore_index` are not counted. Every metric is derived from the matrix at the end, so
accumulating per batch (or per process, then all-reducing) gives exactly the split's metrics.
"""

import math

import torch

from utils.distributed import sum_over_processes


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        """pred: class indices [N, H, W] or logits [N, K, H, W]; target: labels [N, H, W]."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to("cpu", torch.int64)
        target = target.reshape(-1).to("cpu", torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        # Labels outside 0..n-1 would silently corrupt the matrix: refuse them instead.
        bad_target = (target < 0) | (target >= n)
        if bad_target.any():
            values = sorted(set(target[bad_target].unique().tolist()))[:10]
            raise ValueError(
                f"label values {values} are outside 0..{n - 1} and not the ignore index {self.ignore_index}"
            )
        bad_pred = (pred < 0) | (pred >= n)
        if bad_pred.any():
            values = sorted(set(pred[bad_pred].unique().tolist()))[:10]
            raise ValueError(f"predicted class values {values} are outside 0..{n - 1}")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def all_reduce(self):
        """Sum the matrices of all processes (no-op outside torch.distributed)."""
        self.mat = sum_over_processes(self.mat)

    def compute(self) -> dict:
        """miou, pixel_acc, mean_acc, fwiou (floats) and per_class_iou (list, NaN for absent classes)."""
        mat = self.mat.double()
        true_pos = mat.diag()
        per_true = mat.sum(dim=1)  # pixels of each true class
        per_pred = mat.sum(dim=0)  # pixels predicted as each class
        total = mat.sum()
        union = per_true + per_pred - true_pos
        present = union > 0  # class occurs in the truth or in the prediction
        iou = torch.where(present, true_pos / union.clamp(min=1), torch.full_like(true_pos, math.nan))
        in_truth = per_true > 0
        nan = math.nan
        return {
            "miou": iou[present].mean().item() if present.any() else nan,
            "pixel_acc": (true_pos.sum() / total).item() if total > 0 else nan,
            "mean_acc": (true_pos[in_truth] / per_true[in_truth]).mean().item() if in_truth.any() else nan,
            "fwiou": ((per_true[in_truth] / total) * iou[in_truth]).sum().item() if total > 0 else nan,
            "per_class_iou": iou.tolist(),
        }
