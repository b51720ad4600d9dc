"""Spiking neuron models: one class per model (one file each in this package: ``base.py`` holds the base
class and the registry, ``lif.py`` the LIF family), defined by its per-timestep dynamics; a registry by name.

A neuron layer keeps a state (a tuple of tensors, the membrane first) and, at each timestep t of its
input currents ``I[t]``, runs three small methods (docs/neurons.md shows how to add a model)::

    state = charge(state, I[t])                 e.g. u = leak * u + I
    s[t]  = fire(state)                         s = H(u / theta - 1), with a surrogate gradient
    state = reset(state, s[t].detach())         u = u - theta * s  (subtract)  or  u * (1 - |s|)  (zero)

The generic path runs any model this way over ``[S, N, C, H, W]`` through ordinary autograd: the spike
is an autograd function whose backward is the surrogate (``spike_fn``), the reset sees the detached
spike, and nothing else is written by hand. Shipped models (``NEURONS``):

- ``lif``:  u = leak * u + I (leak = ``leak_mem``); the paper's neuron.
- ``if``:   u = u + I (no leak: ``leak_mem`` is ignored).
- ``plif``: u = sigmoid(w) * u + I with one learnable ``w`` per layer (``leak_logit`` in the state
  dict), initialised so that sigmoid(w) = ``leak_mem``.
- ``lifact``: LIF with the reset's spike not detached: SLTNet's and Spike-BRGNet's neuron (``lifact.py``).

Every model has a threshold ``theta`` (a buffer: a float, or per channel / per neuron for converted
SNNs), the imbalanced negative threshold ``theta_neg = -theta / alpha`` when built with ``alpha`` (a
-1 spike when ``u / theta_neg - 1 > 0``), and a reset by subtraction or to zero (``reset``).

Accelerators (``models/fused.py``): the torch loops and the Triton kernels run LIF and IF (both
resets) as one fused autograd function per layer; ``neuron_backend`` picks one: ``auto`` (the fastest
that supports the model on its device), ``generic``, ``torch`` or ``triton``. The backend is an
execution choice, not part of the model: the state dict is the same whichever runs it.
"""

from .base import (  # noqa: F401  (the base class, the registry and the accelerators' API)
    ACCELERATORS,
    BACKENDS,
    NEURONS,
    RESETS,
    LIFParams,
    Neuron,
    Threshold,
    TimeBN,
    _Call,
    _SpikingLayer,
    _triton_backend,
    _warn_triton_fallback,
    backend_for,
    backend_name,
    build_neuron,
    check_backend,
    conversion_neurons,
    get_neuron,
    ignored_key_problem,
    level_fn,
    neuron_arguments,
    register_neuron,
    run_layer,
    spike_fn,
    state_dict_neuron_errors,
    supports,
    time_split,
    time_sum,
)
from .clif import CLIF  # noqa: F401, E402
from .glif import GLIF  # noqa: F401, E402
from .ilif import ILIF  # noqa: F401, E402
from .lif import IF, LIF, PLIF, lif_sequence  # noqa: F401  (the shipped models register on import)
from .lifact import LIFAct  # noqa: F401  (SLTNet's and Spike-BRGNet's neuron)
