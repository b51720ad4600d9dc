"""I-LIF, the integer leaky integrate-and-fire neuron (Luo et al., "Integer-Valued Training and Spike-Driven
Inference Spiking Neural Network for High-performance and Energy-efficient Object Detection", ECCV 2024,
SpikeYOLO; SpikingJelly 2.0's ``neuron.ILIFNode`` with ``surrogate.MultiLevelSpikeCount(D)``, whose equations
this follows).

It fires integer spikes 0..D (D = ``spike_levels``) in one timestep and subtracts D thresholds at most::

    h[t] = v[t-1] - v[t-1] / tau + I[t]                 tau = 1 / (1 - leak_mem) (the paper: leak_mem 0.25)
    s[t] = round(clamp(h[t] / theta, 0, D))             backward: 1 / theta where 0 <= h[t] / theta <= D
    v[t] = h[t] - theta * s[t]                          (reset: zero -> v[t] = 0 after any spike)

The straight-through gradient is the published one, and so is a gradient through the reset
(``detach_reset: false``, SpikingJelly's default for this node). A spike of level k is k events: energy counts
k synaptic operations for it, as the paper does on hardware that unrolls it into k binary spikes.
"""

import math

from .. import protocol
from .base import Neuron, level_fn, register_neuron


@register_neuron
class ILIF(Neuron):
    """Integer LIF: spikes 0..D in one step (D = ``spike_levels``), soft reset by theta per level."""

    kind = "ilif"
    options = ("spike_levels",)
    ignores = {
        "surrogate": "its gradient is the straight-through rectangle of the multi-level papers",
        "surrogate_params": "its gradient is the straight-through rectangle of the multi-level papers",
    }

    def __init__(self, leak: float = 0.25, *args, spike_levels: int = 4, **kwargs):
        super().__init__(leak, *args, **kwargs)
        if self.alpha is not None:
            raise ValueError("neuron 'ilif' has no negative threshold (leaky: true); leave leaky out")
        if isinstance(spike_levels, bool) or int(spike_levels) != spike_levels or not 1 <= spike_levels <= 127:
            raise ValueError(
                f"spike_levels must be an integer in [1, 127] (spikes kept in one byte), got {spike_levels!r}"
            )
        self.levels = int(spike_levels)
        self.tau = math.inf if self.leak == 1 else 1 / (1 - self.leak)

    def charge(self, state, current):
        v = state[0]
        return (v - v / self.tau + current,)

    def fire(self, state):
        return level_fn(state[0] / self.thresholds()[0], self.levels)

    def emits(self):
        return protocol.spikes(self.levels, sources=(self,))

    def describe(self):
        return {**super().describe(), "leak": f"{self.leak:g} (tau {self.tau:g}), levels 0..{self.levels}"}
