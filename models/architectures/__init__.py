"""Architectures by name (config key ``arch``): each one file, a ``SegmentationNet`` subclass registered with
``@register_architecture(name, **options)``; ``options`` reach its ``build`` (one class can serve several
names, as the VGG tables do). docs/architectures.md shows how to add one.
"""

from ..network import SegmentationNet

ARCHITECTURES = {}  # name -> (class, build options)


def register_architecture(name: str, **options):
    """Class decorator: make a SegmentationNet subclass buildable as ``arch: name``."""

    def register(cls):
        if not name or name in ARCHITECTURES:
            raise ValueError(f"architecture {cls.__name__} needs a new, non-empty name, got {name!r}")
        ARCHITECTURES[name] = (cls, dict(options))
        return cls

    return register


def get_architecture(name: str):
    """(class, build options) of architecture ``name``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def min_input_size(name: str) -> int:
    """The smallest input side architecture ``name`` takes: its total downsampling (``min_input_size`` of its
    class, from its build options)."""
    cls, options = get_architecture(name)
    return int(cls.min_input_size(**options))


def takes_pretrained(name: str) -> bool:
    """Whether architecture ``name`` can start from pretrained weights (its class has ``load_pretrained``)."""
    return get_architecture(name)[0].load_pretrained is not SegmentationNet.load_pretrained


def build_architecture(cfg: dict):
    """A fresh model of ``cfg['arch']`` built from the (resolved) model config ``cfg``."""
    cls, options = get_architecture(cfg["arch"])
    return cls(cfg, **options)


# The shipped architectures register themselves on import.
from . import sew_resnet, sltnet, spike_brgnet, vgg  # noqa: E402, F401
