"""The training losses (config keys ``loss``, ``ohem_*``, ``aux_weight``, ``boundary_*``; setup.build_loss).

    loss = main + aux_weight * aux + boundary_weight * boundary

- main: cross-entropy over the labelled pixels (``loss: ce``), or online hard example mining (``loss: ohem``):
  with p the softmax probability of each labelled pixel's class, sorted ascending, the threshold is
  max(p[min(ohem_min_kept, n - 1)], ohem_thresh) and the loss is the mean cross-entropy of the pixels with
  p < threshold (SLTNet's ProbOhemCrossEntropy2d and Spike-BRGNet's OhemCrossEntropy, which agree).
- aux: the cross-entropy of the auxiliary head (SLTNet's early head, Spike-BRGNet's detail head) summed over
  the labelled pixels and divided by all pixels, ignored ones included, as both published codes average it.
- boundary (Spike-BRGNet): the main loss again (OHEM or CE) on the pixels where sigmoid(boundary head) >
  ``boundary_thresh``, the others ignored. The test is not differentiable: the boundary head gets no gradient.

Where no pixel is left (no labelled pixel, none in the boundary, or none under the threshold) a term is zero
instead of the authors' error or NaN.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.transforms import IGNORE_INDEX

MAIN = "out"


def ohem_cross_entropy(logits, target, thresh: float, min_kept: int, ignore_index: int = IGNORE_INDEX):
    """The mean cross-entropy of the hardest labelled pixels (see the module's doc)."""
    pixel_losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    if not bool(valid.any()):
        return pixel_losses.sum() * 0.0
    index = target.masked_fill(target == ignore_index, 0).unsqueeze(1)
    prob = F.softmax(logits, dim=1).gather(1, index).flatten()[valid]
    k = min(int(min_kept), prob.numel() - 1)
    threshold = max(float(torch.kthvalue(prob.detach(), k + 1).values), float(thresh))
    kept = pixel_losses[valid][prob.detach() < threshold]
    return kept.mean() if kept.numel() else pixel_losses.sum() * 0.0


def mean_over_all_pixels(logits, target, ignore_index: int = IGNORE_INDEX):
    """Cross-entropy summed over the labelled pixels, divided by every pixel (ignored ones count as zero)."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / target.numel()


class SegmentationLoss(nn.Module):
    """``loss(outputs, target)``: ``outputs`` the main logits, or the dict of a model's heads
    (``model(x, heads=True)``) when ``heads`` says the loss needs them."""

    def __init__(
        self,
        loss="ce",
        ohem_thresh=0.7,
        ohem_min_kept=100000,
        aux_weight=0.0,
        boundary_weight=0.0,
        boundary_thresh=0.6,
        ignore_index=IGNORE_INDEX,
    ):
        super().__init__()
        if loss not in ("ce", "ohem"):
            raise ValueError(f"loss must be 'ce' or 'ohem', got {loss!r}")
        self.loss, self.ohem_thresh, self.ohem_min_kept = loss, float(ohem_thresh), int(ohem_min_kept)
        self.aux_weight, self.boundary_weight = float(aux_weight), float(boundary_weight)
        self.boundary_thresh, self.ignore_index = float(boundary_thresh), int(ignore_index)
        self.heads = self.aux_weight > 0 or self.boundary_weight > 0  # whether forward needs every head

    def main_term(self, logits, target):
        if self.loss == "ohem":
            return ohem_cross_entropy(logits, target, self.ohem_thresh, self.ohem_min_kept, self.ignore_index)
        valid = target != self.ignore_index
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    def forward(self, outputs, target):
        heads = outputs if isinstance(outputs, dict) else {MAIN: outputs}
        main = heads[MAIN]
        total = self.main_term(main, target)
        if self.aux_weight > 0:
            total = total + self.aux_weight * mean_over_all_pixels(heads["aux"], target, self.ignore_index)
        if self.boundary_weight > 0:
            edge = torch.sigmoid(heads["boundary"][:, 0].detach()) > self.boundary_thresh
            boundary_target = torch.where(edge, target, torch.full_like(target, self.ignore_index))
            total = total + self.boundary_weight * self.main_term(main, boundary_target)
        return total

    def extra_repr(self):
        return (
            f"loss={self.loss}, ohem_thresh={self.ohem_thresh}, ohem_min_kept={self.ohem_min_kept}, "
            f"aux_weight={self.aux_weight}, boundary_weight={self.boundary_weight}, "
            f"boundary_thresh={self.boundary_thresh}"
        )
