"""Normalisation and paired (input, mask) transforms.

Images follow the paper's convention: channels in BGR order, minus the Caffe VGG
mean, divided by 255, so values lie roughly in [-0.5, 0.5] and signed Poisson rate
coding can use |x| as a firing probability. Events are min-max scaled per channel
to [-0.5, 0.5] for the same reason.

Paired geometric transforms use torchvision.transforms.v2: wrapping the input as
tv_tensors.Image and the label as tv_tensors.Mask makes v2 apply the same random
parameters to both, with nearest interpolation for the mask.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.keys import parse_size  # the one reader of img_size; re-exported for the datasets

# Caffe VGG mean in BGR order on the 0-255 scale (the paper's code uses these).
MEAN_BGR = (104.00699, 116.66877, 122.67892)
IGNORE_INDEX = 255  # the label of pixels counted in neither the loss nor the metrics (VOC's void)


def normalize_image(rgb: torch.Tensor) -> torch.Tensor:
    """RGB [..., 3, H, W] on the 0-255 scale -> float32 BGR, minus mean, / 255."""
    bgr = rgb.float().flip(-3)
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    return (bgr - mean) / 255.0


def denormalize_image(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize_image: float RGB [..., 3, H, W] on the 0-255 scale (not clipped)."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    return (x.float() * 255.0 + mean).flip(-3)


def scale_events(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each channel of [..., C, H, W] to [-0.5, 0.5] (the paper's DDD17 scaling).

    Scaling is per sample and per channel (over H, W). A constant channel carries no
    information and would divide by zero: it becomes all zeros instead of NaN.
    """
    x = x.float()
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    scaled = (x - lo) / torch.where(span > 0, span, torch.ones_like(span)) - 0.5
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


class PairedTransform:
    """Apply a v2 transform to (input tensor, label tensor) with shared random parameters."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        x, y = self.transform(tv_tensors.Image(x), tv_tensors.Mask(y))
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


def _fill():
    # Padding outside the input: 0 for the input (mean colour / no events), 255 (ignored) for the label.
    return {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def resize_transform(img_size):
    """Bilinear (antialiased) for the input, nearest for the mask; None keeps the native size."""
    size = parse_size(img_size)
    return PairedTransform(v2.Resize(size, antialias=True)) if size else None


def voc_transform(img_size, augment: bool):
    """VOC: resize, and for training a random horizontal flip + random resized crop."""
    size = parse_size(img_size)
    steps = []
    if augment:
        steps.append(v2.RandomHorizontalFlip())
        if size:
            steps.append(v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True))
    elif size:
        steps.append(v2.Resize(size, antialias=True))
    return PairedTransform(v2.Compose(steps)) if steps else None


def ddd17_transform(img_size, augment: bool):
    """DDD17: the paper's augmentation (hflip, scale 0.5-2, translate +-25%, rotate +-15 deg), then resize.

    Applied to raw event counts, before min-max scaling, so the fill value 0 means "no events".
    """
    steps = []
    if augment:
        steps += [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(
                degrees=15,
                translate=(0.25, 0.25),
                scale=(0.5, 2.0),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=_fill(),
            ),
        ]
    size = parse_size(img_size)
    if size:
        steps.append(v2.Resize(size, antialias=True))
    return PairedTransform(v2.Compose(steps)) if steps else None
