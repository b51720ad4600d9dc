"""The leaky integrate-and-fire family: LIF (the paper's neuron), IF (no leak) and PLIF (learned leak), and
``lif_sequence``, a LIF layer as a function of its input currents."""

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from ..surrogates import Surrogate, get_surrogate
from .base import (
    RESETS,
    LIFParams,
    Neuron,
    Threshold,
    _Call,
    backend_for,
    check_backend,
    register_neuron,
    run_layer,
)


# ------------------------------------------------------------------------------- shipped neurons
@register_neuron
class LIF(Neuron):
    """Leaky integrate-and-fire: u = leak * u + I. Runs on every backend."""

    kind = "lif"
    converts = True

    def charge(self, state, current):
        return (self.leak * state[0] + current,)

    def lif_params(self) -> Optional[LIFParams]:
        # A subclass with dynamics of its own is not what the fused implementations compute, nor is a reset
        # that passes the spike's gradient (their backward detaches it).
        if any(getattr(type(self), m) is not getattr(LIF, m) for m in _DYNAMICS) or not self.detach_reset:
            return None
        theta, theta_neg = self.thresholds()
        return LIFParams(self.leak, theta, theta_neg, self.surrogate, self.hard_reset, self.compile)

    def params(self) -> Optional[LIFParams]:  # the name of earlier versions
        return self.lif_params()

    def nir_leak(self):
        return None if self.lif_params() is None else float(self.leak)


_DYNAMICS = ("initial_state", "charge", "fire", "reset")


@register_neuron
class IF(LIF):
    """Integrate-and-fire: LIF without leak (u = u + I); ``leak`` is ignored (always 1)."""

    kind = "if"
    ignores = {"leak_mem": "an IF neuron has no leak (u = u + I)"}

    def __init__(self, leak: float = 1.0, *args, **kwargs):
        super().__init__(1.0, *args, **kwargs)


@register_neuron
class PLIF(LIF):
    """Parametric LIF (Fang et al. 2021): u = sigmoid(w) * u + I with one learnable ``w`` per layer
    (``leak_logit``), initialised so that sigmoid(w) = ``leak``, which must be in (0, 1) (1 is no leak,
    which a sigmoid does not reach). Runs on the generic path only."""

    kind = "plif"
    converts = False  # its leak is learned: the ANN has nothing to give it

    def __init__(self, leak: float = 0.99, *args, **kwargs):
        leak = float(leak)
        logit = math.log(leak / (1 - leak)) if 0 < leak < 1 else None
        if logit is None or not 0 < torch.sigmoid(torch.tensor(logit)).item() < 1:
            raise ValueError(
                f"neuron 'plif' learns leak = sigmoid(w) and needs leak_mem in (0, 1) that float32 can "
                f"represent that way, got {leak!r}"
            )
        super().__init__(leak, *args, **kwargs)
        self.leak_logit = nn.Parameter(torch.tensor(logit))

    def charge(self, state, current):
        return (torch.sigmoid(self.leak_logit) * state[0] + current,)

    def nir_leak(self):
        if type(self).charge is not PLIF.charge:
            return None
        return float(torch.sigmoid(self.leak_logit.detach().float()))

    def describe(self):
        return {**super().describe(), "leak": f"learned {float(torch.sigmoid(self.leak_logit.detach())):.4g}"}

    def extra_repr(self):
        return f"learned leak={torch.sigmoid(self.leak_logit.detach()).item():.4f}, " + super().extra_repr()


def lif_sequence(
    currents: torch.Tensor,
    leak: float = 0.99,
    threshold: Threshold = 1.0,
    surrogate: Union[str, Surrogate] = "linear",
    threshold_neg: Optional[Threshold] = None,
    time_dim: int = 0,
    backend: str = "torch",
    reset: str = "subtract",
    **surrogate_params,
) -> torch.Tensor:
    """Spikes of a LIF layer driven by ``currents`` (time along ``time_dim``, default ``[T, ...]``).

    ``threshold`` is a float (layer-wise) or a tensor that broadcasts against one timestep
    (``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise). ``threshold_neg`` (negative) turns on
    the imbalanced threshold; ``reset`` is 'subtract' or 'zero'. The result has the shape of ``currents``,
    values in {0, 1} (or {-1, 0, 1}), and is differentiable through the surrogate when ``currents``
    requires a gradient. ``backend`` 'triton' needs ``[T, N, C, H, W]`` currents (the kernels' layout);
    'generic' runs the LIF model's per-step methods through autograd.
    """
    check_backend(backend)
    if reset not in RESETS:
        raise ValueError(f"unknown reset '{reset}'; choose one of {list(RESETS)}")
    surrogate = get_surrogate(surrogate, **surrogate_params)
    x = currents.movedim(time_dim, 0)
    if backend == "generic":
        neuron = LIF(leak, 1.0, surrogate, reset=reset, backend="generic")
        neuron.thresholds = lambda: (threshold, threshold_neg)
        return neuron.run_generic(x, None)[0].movedim(0, time_dim)
    params = LIFParams(float(leak), threshold, threshold_neg, surrogate, reset == "zero")
    call = _Call(backend_for(backend, x.device), params, None, None, x.shape[0])
    return run_layer(x, None, call)[0].movedim(0, time_dim)
