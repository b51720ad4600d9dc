"""Parts shared by the published event segmenters (sltnet.py, spike_brgnet.py): each convolution, batch norm and
tensor operation of their forward passes is a layer of its own, so that the layer graph sees what every
convolution receives (models/graph.py) and the state dict keeps the authors' names.

Tensors are time-folded ``[S*N, C, H, W]``: convolutions, pooling and resizes act per timestep and sample,
batch norm takes its statistics over all of them (as SpikingJelly's multi-step layers do).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import protocol
from .. import spikes as spike_protocol


def _sources(inputs):
    return frozenset().union(*(a.sources for a in inputs))


class Conv(protocol.Part, nn.Conv2d):
    """A convolution on its own (its input's activity decides how energy counts it); output analog."""

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self),)


class ConvTranspose(protocol.Part, nn.ConvTranspose2d):
    """A transposed convolution on its own; output analog."""

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self, in_dim=0),)


class SharedConv(protocol.Part):
    """Another part's convolution applied to a second input (SLTNet's classifier and feature-enhancement
    1x1 convolution run twice): a layer of its own for the tools, the weights the other part's (not in
    the state dict twice)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        object.__setattr__(self, "shared", conv)  # not registered: one owner of the weights

    def forward(self, x):
        return self.shared(x)

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self.shared),)


class BatchNorm(protocol.Part, nn.BatchNorm2d):
    """Batch norm on its own (statistics over timesteps, samples and pixels); output analog."""

    def activity(self, inputs):
        return protocol.analog(_sources(inputs))


class Resize(protocol.Part):
    """Bilinear resize of the first input to the size of the second (align_corners False)."""

    def forward(self, x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)


class GlobalAvgPool(protocol.Part):
    """The mean over the pixels, ``[S*N, C, 1, 1]``."""

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)


class Concat(protocol.Part):
    """Channels of its inputs side by side: spikes if every input is (the largest level), else analog."""

    def forward(self, *inputs):
        out = torch.cat(inputs, 1)
        marked = not torch.compiler.is_compiling() and all(map(spike_protocol.holds_spikes, inputs))
        return spike_protocol.mark(out) if marked else out

    def activity(self, inputs):
        if all(a.is_spikes and a.integer for a in inputs):
            return protocol.spikes(max(a.levels for a in inputs), any(a.signed for a in inputs), _sources(inputs))
        return protocol.analog(_sources(inputs))


class Product(protocol.Part):
    """The product of two spike maps (broadcast): binary spikes times binary spikes is binary spikes (their
    AND), not a sum of levels."""

    def forward(self, x, y):
        out = x * y
        marked = not torch.compiler.is_compiling() and spike_protocol.holds_spikes(x) and spike_protocol.holds_spikes(y)
        return spike_protocol.mark(out) if marked else out

    def activity(self, inputs):
        a, b = inputs
        if a.is_spikes and b.is_spikes and a.integer and b.integer:
            return protocol.spikes(a.levels * b.levels, a.signed or b.signed, _sources(inputs))
        return protocol.analog(_sources(inputs))


class Gate(protocol.Part):
    """``x * sigmoid(g)``: a map scaled by an analog gate (broadcast); output analog."""

    def forward(self, x, g):
        return x * torch.sigmoid(g)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)
