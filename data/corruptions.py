"""Input corruptions for robustness tests, applied where the paper applied them.

apply_corruption(x, kind, factor, dataset, seed) takes a dataset item (or a batch) as the
dataset returns it and returns it corrupted, in the same normalisation:

- image datasets (voc2012, synthetic): the normalisation is undone to get the 0-255 RGB
  image, the corruption is applied there, the result is clipped to [0, 255] and
  normalised again; identical to corrupting before normalisation, as the paper did;
- event datasets (ddd17, synthetic-events): each channel, already min-max scaled to
  [-0.5, 0.5], is rescaled to [0, 255], corrupted, clipped, and mapped back.

Doing it as a function on items (rather than inside each dataset) keeps the datasets
unaware of robustness tests and lets test.py corrupt any batch it already has.
Kinds: 'gaussiannoise' (factor = std on the 0-255 scale), 'saltpepper' (factor = the
probability that a pixel becomes black or white, all channels together), 'gaussianblur'
(factor = sigma in pixels). factor 0 returns x itself. Seeded: same seed, same corruption.
"""

import math

import torch
from torchvision.transforms.v2 import functional as F

from data.transforms import denormalize_image, normalize_image

CORRUPTIONS = ("gaussiannoise", "saltpepper", "gaussianblur")
IMAGE_DATASETS = ("voc2012", "synthetic")
EVENT_DATASETS = ("ddd17", "synthetic-events", "dsec-semantic", "ddd17-events")


def _to_255(x, dataset):
    return denormalize_image(x) if dataset in IMAGE_DATASETS else (x.float() + 0.5) * 255.0


def _from_255(v, dataset):
    return normalize_image(v) if dataset in IMAGE_DATASETS else v / 255.0 - 0.5


def gaussian_noise(v, std, generator):
    return v + std * torch.randn(v.shape, generator=generator)


def salt_pepper(v, prob, generator):
    """Each pixel (all channels at once) becomes 0 or 255 with probability prob, half each."""
    spatial = v.shape[:-3] + (1,) + v.shape[-2:]
    hit = torch.rand(spatial, generator=generator) < prob
    white = torch.rand(spatial, generator=generator) < 0.5
    return torch.where(hit, torch.where(white, 255.0, 0.0), v)


def gaussian_blur(v, sigma, generator=None):
    # Kernel covers +-3 sigma; reflect padding needs it below twice the image size.
    radius = min(math.ceil(3 * sigma), min(v.shape[-2:]) - 1)
    return F.gaussian_blur(v, [2 * radius + 1] * 2, [float(sigma)] * 2)


_APPLY = {"gaussiannoise": gaussian_noise, "saltpepper": salt_pepper, "gaussianblur": gaussian_blur}


def apply_corruption(x: torch.Tensor, kind: str, factor: float, dataset: str, seed: int = 0) -> torch.Tensor:
    """Corrupt x ([..., C, H, W], normalised as `dataset` returns it); see the module docstring."""
    if kind not in _APPLY:
        raise ValueError(f"unknown corruption {kind!r}; choices: {list(CORRUPTIONS)}")
    if factor < 0 or (kind == "saltpepper" and factor > 1):
        raise ValueError(
            f"corruption factor for {kind} must be {'in [0, 1]' if kind == 'saltpepper' else '>= 0'}, got {factor}"
        )
    if dataset not in IMAGE_DATASETS + EVENT_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} for corruption; choices: {IMAGE_DATASETS + EVENT_DATASETS}")
    if factor == 0:
        return x
    v = _to_255(x, dataset)
    generator = torch.Generator().manual_seed(int(seed))
    corrupted = _APPLY[kind](v, factor, generator).clamp(0, 255)
    return _from_255(corrupted, dataset).to(x.dtype)
