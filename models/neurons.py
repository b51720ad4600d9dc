"""The leaky integrate-and-fire neuron: the one implementation of the spiking dynamics.

For one neuron layer over timesteps t = 0..T-1 (``u`` starts at 0)::

    u[t] = leak * u[t-1] + I[t]              charge (I is the layer's input current)
    s[t] = H(u[t] / theta - 1)               fire
    u[t] = u[t] - theta * s[t]               reset by subtraction

With an imbalanced (negative) threshold ``theta_neg < 0`` (SNNs converted from leaky-ReLU ANNs) the neuron
also fires a -1 spike when ``u[t] / theta_neg - 1 > 0`` and is reset by ``theta_neg``.

Surrogate-gradient training: the reset is built from a comparison and carries no gradient, so the only
paths back through time are the leak and the spikes. The backward pass is therefore a reverse linear
recurrence that we run ourselves instead of recording T small graphs:

    dL/du[t] = dL/ds[t] * ds/du[t] + leak * dL/du[t+1],      dL/dI[t] = dL/du[t]

with ``ds/du = g(x) / theta`` (``g`` the surrogate, ``x = u / theta - 1``). Only ``ds/du`` is kept for the
backward pass (one tensor the size of the input), not the T per-step graphs of autograd.
"""
from typing import Optional, Union

import torch
import torch.nn as nn

from .surrogates import Surrogate, get_surrogate

Threshold = Union[float, torch.Tensor]


def _lif_scan(currents: torch.Tensor, leak: float, theta: Threshold, theta_neg: Optional[Threshold],
              surrogate: Optional[Surrogate], time_dim: int):
    """Run the recurrence over ``time_dim``; return spikes and, if a surrogate is given, ``ds/du``."""
    spikes = torch.empty_like(currents)
    slopes = torch.empty_like(currents) if surrogate is not None else None
    u = None
    for t in range(currents.shape[time_dim]):
        current = currents.select(time_dim, t)
        u = current.clone() if u is None else u.mul_(leak).add_(current)
        x = u / theta - 1.0
        fired = (x > 0).to(u.dtype)
        if slopes is not None:
            slopes.select(time_dim, t).copy_(surrogate.grad(x) / theta)
        if theta_neg is None:
            spike = fired
            u.sub_(fired * theta)
        else:
            x_neg = u / theta_neg - 1.0
            fired_neg = (x_neg > 0).to(u.dtype)
            spike = fired - fired_neg
            if slopes is not None:
                slopes.select(time_dim, t).sub_(surrogate.grad(x_neg) / theta_neg)
            u.sub_(fired * theta + fired_neg * theta_neg)
        spikes.select(time_dim, t).copy_(spike)
    return spikes, slopes


class _LIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, currents, leak, theta, theta_neg, surrogate, time_dim):
        spikes, slopes = _lif_scan(currents, leak, theta, theta_neg, surrogate, time_dim)
        ctx.save_for_backward(slopes)
        ctx.leak, ctx.time_dim = leak, time_dim
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        slopes, = ctx.saved_tensors
        grad_currents = torch.empty_like(slopes)
        grad_u = None
        for t in reversed(range(slopes.shape[ctx.time_dim])):
            grad_t = grad_spikes.select(ctx.time_dim, t) * slopes.select(ctx.time_dim, t)
            if grad_u is not None:
                grad_t.add_(grad_u, alpha=ctx.leak)
            grad_currents.select(ctx.time_dim, t).copy_(grad_t)
            grad_u = grad_t
        return grad_currents, None, None, None, None, None


def lif_sequence(currents: torch.Tensor, leak: float = 0.99, threshold: Threshold = 1.0,
                 surrogate: Union[str, Surrogate] = 'linear', threshold_neg: Optional[Threshold] = None,
                 time_dim: int = 0, **surrogate_params) -> torch.Tensor:
    """Spikes of a LIF layer driven by ``currents`` (time along ``time_dim``, default ``[T, ...]``).

    ``threshold`` is a float (layer-wise) or a tensor that broadcasts against one timestep
    (``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise). ``threshold_neg`` (negative) turns on
    the imbalanced threshold. The result has the shape of ``currents``, values in {0, 1} (or {-1, 0, 1}),
    and is differentiable through the surrogate when ``currents`` requires a gradient.
    """
    surrogate = get_surrogate(surrogate, **surrogate_params)
    if torch.is_grad_enabled() and currents.requires_grad:
        return _LIFFunction.apply(currents, float(leak), threshold, threshold_neg, surrogate, time_dim)
    spikes, _ = _lif_scan(currents.detach(), float(leak), threshold, threshold_neg, None, time_dim)
    return spikes


class LIF(nn.Module):
    """A layer of LIF neurons for time-folded tensors ``[N*T, C, H, W]`` (sample-major: n, then t).

    ``threshold`` is a buffer so that converted SNNs keep their (layer, channel or neuron-wise)
    thresholds in the ordinary state dict; it may have any shape that broadcasts against ``[C, H, W]``.
    ``alpha`` (the leaky-ReLU slope of the ANN it came from) turns on ``theta_neg = -theta / alpha``.
    """

    def __init__(self, leak: float = 0.99, threshold: float = 1.0, surrogate: str = 'linear',
                 surrogate_params: Optional[dict] = None, alpha: Optional[float] = None, name: str = ''):
        super().__init__()
        self.leak = float(leak)
        self.surrogate = get_surrogate(surrogate, **(surrogate_params or {}))
        self.alpha = alpha
        self.name = name
        self.register_buffer('threshold', torch.tensor(float(threshold)))
        self.recording = False
        self.reset_spike_stats()

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        n = x.shape[0] // steps
        theta_neg = None if self.alpha is None else -self.threshold / self.alpha
        currents = x.view(n, steps, *x.shape[1:])
        spikes = lif_sequence(currents, self.leak, self.threshold, self.surrogate, theta_neg, time_dim=1)
        if self.recording:
            self._record(spikes)
        return spikes.view_as(x)

    def _record(self, spikes):
        self.spike_count += spikes.detach().abs().sum().double()
        self.images += spikes.shape[0]
        self.steps = spikes.shape[1]
        self.neurons = spikes[0, 0].numel()

    def reset_spike_stats(self):
        self.spike_count = torch.zeros((), dtype=torch.float64)
        self.images, self.steps, self.neurons = 0, 0, 0

    def spike_stats(self) -> dict:
        return {'name': self.name, 'neurons': self.neurons, 'spikes': float(self.spike_count),
                'images': self.images, 'steps': self.steps}

    def set_threshold(self, threshold: Threshold):
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32,
                                         device=self.threshold.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Thresholds of converted SNNs are per channel or per neuron: take the stored shape.
        key = prefix + 'threshold'
        if key in state_dict:
            self.threshold = torch.empty_like(state_dict[key], device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        shape = tuple(self.threshold.shape) or float(self.threshold)
        return f'leak={self.leak}, threshold={shape}, surrogate={self.surrogate}, alpha={self.alpha}'
