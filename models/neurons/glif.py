"""GLIF, the gated leaky integrate-and-fire neuron (Yao et al., "GLIF: A Unified Gated Leaky Integrate-and-Fire
Neuron for Spiking Neural Networks", NeurIPS 2022; SpikingJelly 2.0's ``neuron.GatedLIFNode``, layer-wise
(``inplane=None``), whose equations, parameters and initial values this follows).

Three learned gates mix the membrane's dual behaviours: exponential or linear leak (``a``), conductance-scaled
input or not (``b``), soft reset by the previous membrane or by a constant (``g``). Every parameter is learned
through a sigmoid, and the conductance has one value per timestep (hence ``timesteps``)::

    c = 1 - a * (1 - tau)                                          leak factor (a, b, g, tau, ... = sigmoid(w))
    u[t] = c * u[t-1] - (1 - a) * d + I[t] * (1 - b * (1 - k[t]))
                - c * u[t-1] * g * s[t-1] - (1 - g) * r * s[t-1]     reset by the previous step's spike
    s[t] = H(u[t] - theta)                                         backward: g_surrogate(u[t] - theta)

with the linear decay ``d``, the subtractive reset ``r``, the conductance ``k[t]`` and the threshold ``theta``
all learned. Initial values are SpikingJelly's: tau 0.25, theta 0.5, k 0.5, d = theta / (2 T), r = theta, the
gates' logits uniform in [-0.1, 0.1]. The reset applies the previous spike with its gradient in the
published model (``detach_reset: false``).
"""

import math

import torch
import torch.nn as nn

from .base import Neuron, register_neuron, spike_fn


def _logit(p: float) -> float:
    return -math.log(1 / p - 1)


@register_neuron
class GLIF(Neuron):
    """Gated LIF: learned gates between leak, integration and reset behaviours (layer-wise parameters)."""

    kind = "glif"
    options = ("timesteps", "full_prop")
    ignores = {
        "leak_mem": "its leak is learned (tau and the gate a, initialised as SpikingJelly's GatedLIFNode)",
        "def_threshold": "its threshold is learned (sigmoid of act.threshold_logit, initially 0.5)",
        "reset": "its reset is its own gated mix of reset by the membrane and by a learned constant",
    }

    def __init__(self, *args, timesteps: int = 1, full_prop: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hard_reset:
            raise ValueError("neuron 'glif' has its own gated reset; leave reset out")
        if self.alpha is not None:
            raise ValueError("neuron 'glif' has no negative threshold (leaky: true); leave leaky out")
        if full_prop:
            raise ValueError(
                "neuron 'glif' learns one conductance per timestep and has none for full_prop's extra steps; "
                "leave full_prop out"
            )
        if isinstance(timesteps, bool) or int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"neuron 'glif' needs timesteps >= 1, got {timesteps!r}")
        self.timesteps = int(timesteps)
        init_threshold, init_tau, init_conduct = 0.5, 0.25, 0.5
        self.gate_alpha, self.gate_beta, self.gate_gamma = (
            nn.Parameter(0.2 * (torch.rand(()) - 0.5)) for _ in range(3)
        )
        self.tau_logit = nn.Parameter(torch.tensor(_logit(init_tau)))
        self.threshold_logit = nn.Parameter(torch.tensor(_logit(init_threshold)))
        self.decay_logit = nn.Parameter(torch.tensor(_logit(init_threshold / (self.timesteps * 2))))
        self.subreset_logit = nn.Parameter(torch.tensor(_logit(init_threshold)))
        self.conduct_logit = nn.Parameter(torch.full((self.timesteps,), _logit(init_conduct)))

    def initial_state(self, current):
        (u,) = super().initial_state(current)
        return (u, torch.zeros_like(u), 0)  # membrane, the previous step's spike, the timestep

    def charge(self, state, current):
        u, spike, t = state
        if t >= self.timesteps:
            raise ValueError(f"neuron 'glif' was built for {self.timesteps} timesteps and cannot run step {t + 1}")
        a, b, g = self.gate_alpha.sigmoid(), self.gate_beta.sigmoid(), self.gate_gamma.sigmoid()
        tau, decay, subreset = self.tau_logit.sigmoid(), self.decay_logit.sigmoid(), self.subreset_logit.sigmoid()
        conduct = self.conduct_logit[t].sigmoid()
        leak = 1 - a * (1 - tau)
        u_next = (leak * u - (1 - a) * decay) + current * (1 - b * (1 - conduct))
        u_next = u_next - leak * u * g * spike - (1 - g) * subreset * spike
        return (u_next, spike, t + 1)

    def fire(self, state):
        return spike_fn(state[0] - self.threshold_logit.sigmoid(), self.surrogate)

    def reset(self, state, spike):
        return (state[0], spike, state[2])  # the spike resets the next step's charge

    def thresholds(self):
        return float(self.threshold_logit.detach().sigmoid()), None

    def describe(self):
        gates = ", ".join(
            f"{n} {float(getattr(self, f'gate_{n}').detach().sigmoid()):.3g}" for n in ("alpha", "beta", "gamma")
        )
        return {
            "reset": f"gated (previous membrane and {float(self.subreset_logit.detach().sigmoid()):.3g})",
            "leak": f"learned: tau {float(self.tau_logit.detach().sigmoid()):.3g}, gates {gates}",
            "threshold": f"learned {self.thresholds()[0]:.4g}",
        }
