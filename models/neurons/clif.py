"""CLIF, the complementary leaky integrate-and-fire neuron (Huang et al., "CLIF: Complementary Leaky
Integrate-and-Fire Neuron for Spiking Neural Networks", ICML 2024; SpikingJelly 2.0's
``neuron.ComplementaryLIFNode``, whose equations, order of operations and surrogate this follows).

A second state, the complementary potential ``m``, integrates the spikes and decays with the membrane's own
drive; each spike then also removes ``sigmoid(m)``: a neuron that fired recently resets further::

    h[t] = v[t-1] - v[t-1] / tau + I[t]                 tau = 1 / (1 - leak_mem)
    s[t] = H(h[t] - theta)                              backward: g(h[t] - theta)
    m[t] = m[t-1] * sigmoid(h[t] / tau) + s[t]
    v[t] = h[t] - s[t] * (theta + sigmoid(m[t]))

The published gradient flows through the reset (``detach_reset: false``); with the default ``true`` the
spike enters ``m`` and ``v`` detached, as the other neurons' resets do.
"""

import math

import torch

from .base import Neuron, register_neuron, spike_fn


@register_neuron
class CLIF(Neuron):
    """Complementary LIF: membrane ``v`` and complementary potential ``m``; soft reset by theta + sigmoid(m)."""

    kind = "clif"

    def __init__(self, leak: float = 0.5, *args, **kwargs):
        leak = float(leak)
        if not 0 < leak <= 1:
            raise ValueError(f"neuron 'clif' has tau = 1 / (1 - leak_mem) and needs leak_mem in (0, 1], got {leak!r}")
        super().__init__(leak, *args, **kwargs)
        if self.hard_reset:
            raise ValueError("neuron 'clif' resets by subtraction only (its reset is theta + sigmoid(m)); reset: zero")
        if self.alpha is not None:
            raise ValueError("neuron 'clif' has no negative threshold (leaky: true); leave leaky out")
        self.tau = math.inf if leak == 1 else 1 / (1 - leak)

    def initial_state(self, current):
        (v,) = super().initial_state(current)
        return (v, torch.zeros_like(v))  # membrane, complementary potential

    def charge(self, state, current):
        v, m = state
        h = v - v / self.tau + current
        return (h, m * torch.sigmoid(h / self.tau))  # m decayed; the spike is added in reset

    def fire(self, state):
        return spike_fn(state[0] - self.thresholds()[0], self.surrogate)

    def reset(self, state, spike):
        h, m = state
        m = m + spike
        return (h - spike * (self.thresholds()[0] + torch.sigmoid(m)), m)

    def describe(self):
        return {
            **super().describe(),
            "reset": "subtract theta + sigmoid(m)",
            "leak": f"{self.leak:g} (tau {self.tau:g})",
        }
