"""The spike protocol: how a tensor says that it holds spikes, and how spikes are kept for backward.

Spikes are integers (binary {0, 1}, signed {-1, 0, 1}, or levels 0..D), exact in one byte up to 127. A layer
marks its output with ``mark`` only when it declares integer spikes (``Neuron.emits``), with the declared
largest level: a neuron that declares analog values is not marked, and its output is kept as it is, and so is a
sum of spikes whose declared levels exceed 127 (residual ADDs of multi-level neurons). A layer that produces
spikes marks it;
layers that save their input for backward (convolutions) then keep its one-byte copy instead of the
float tensor (``storable`` / ``restored``), and the readout sums a neuron layer's ``[S, N, ...]`` output
directly (``per_step``).

The mark is one attribute holding a ``SpikeInfo``, set and read only here. A tensor op returns a new,
unmarked tensor: code that copies or slices spikes and wants to keep the mark says so with ``like``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

SPIKE_STORAGE = torch.int8
_ATTRIBUTE = "_spike_info"


@dataclass(frozen=True)
class SpikeInfo:
    """What is known about a spike tensor: its one-byte copy if one exists already (the neurons keep one
    for their own backward, and the next layer then shares it), the ``[S, N, ...]`` tensor it is the
    time-folded view of (a neuron layer's output), and the largest |value| its producer declares (``levels``:
    1 for binary spikes, D for a multi-level neuron, the sum of the terms' at a residual ADD)."""

    compact: Optional[torch.Tensor] = None
    per_step: Optional[torch.Tensor] = None
    levels: int = 1


MAX_STORED_LEVEL = torch.iinfo(SPIKE_STORAGE).max  # 127: larger levels are kept as they are


def mark(
    tensor: torch.Tensor,
    compact: Optional[torch.Tensor] = None,
    per_step: Optional[torch.Tensor] = None,
    levels: int = 1,
) -> torch.Tensor:
    """Tag ``tensor`` (integer values up to ``levels``, as its producer declares) as spikes; returns it."""
    setattr(tensor, _ATTRIBUTE, SpikeInfo(compact, per_step, int(levels)))
    return tensor


def info(tensor: torch.Tensor) -> Optional[SpikeInfo]:
    """The tensor's SpikeInfo, or None when it is not marked as spikes."""
    return getattr(tensor, _ATTRIBUTE, None)


def holds_spikes(tensor: torch.Tensor) -> bool:
    return info(tensor) is not None


def like(source: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` marked as spikes if ``source`` was (a copy or a slice of spikes is spikes), with its levels."""
    source_info = info(source)
    return tensor if source_info is None else mark(tensor, levels=source_info.levels)


def levels(tensor: torch.Tensor) -> int:
    """The declared largest |value| of a spike tensor (0 when it is not marked)."""
    spike_info = info(tensor)
    return 0 if spike_info is None else spike_info.levels


def storable(tensor: torch.Tensor):
    """(what to keep of ``tensor`` for backward, its dtype if that is a one-byte spikes copy else None).

    Autograd functions that save a convolution's input call this themselves rather than rely on
    ``compact_spikes``: memory-saving mode's replay stores what it recomputes through checkpoint's own
    hooks, which would keep float spikes (4 bytes) there.
    """
    spike_info = info(tensor)
    if spike_info is None or spike_info.levels > MAX_STORED_LEVEL:  # sums of many levels: not exact in a byte
        return tensor, None
    compact = spike_info.compact if spike_info.compact is not None else tensor.to(SPIKE_STORAGE)
    return compact, tensor.dtype


def restored(stored: torch.Tensor, dtype) -> torch.Tensor:
    """The tensor ``storable`` was given back."""
    return stored if dtype is None else stored.to(dtype)


def _pack(tensor):
    stored, dtype = storable(tensor)
    # Not the tensor itself: autograd restores its graph metadata on unpacking, and a tensor that an op saved
    # of its own output (sigmoid, exp, tanh) would otherwise hold its grad_fn, which holds it: a reference
    # cycle through C++ that the garbage collector cannot see, so a graph that backward never reaches (a
    # neuron's final state) was never freed.
    return stored.detach() if dtype is None else (stored, dtype)


def _unpack(packed):
    return restored(*packed) if isinstance(packed, tuple) else packed


def compact_spikes():
    """Context in which autograd stores marked spike tensors (e.g. a conv's input) in one byte."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
