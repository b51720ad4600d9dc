"""How spikes are kept for backward: in one byte.

Spikes are {-1, 0, 1}, exact in int8: a tensor tagged as spikes (``neurons.mark_spikes``) is stored as
its one-byte copy and turned back into its float dtype when backward needs it.
"""
import torch

SPIKE_STORAGE = torch.int8


def storable(tensor):
    """(what to keep of ``tensor`` for backward, its dtype if that is a one-byte spikes copy else None).

    Autograd functions that save a convolution's input call this themselves rather than rely on
    ``compact_spikes``: memory-saving mode's replay stores what it recomputes through checkpoint's own
    hooks, which would keep float spikes (4 bytes) there.
    """
    if getattr(tensor, 'holds_spikes', False):
        compact = tensor.compact if tensor.compact is not None else tensor.to(SPIKE_STORAGE)
        return compact, tensor.dtype
    return tensor, None


def restored(stored, dtype):
    """The tensor ``storable`` was given back."""
    return stored if dtype is None else stored.to(dtype)
