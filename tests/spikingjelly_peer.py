"""dl-vgg9 and fcn-vgg9 written with SpikingJelly's modules, for tests/test_spikingjelly_peer.py and
benchmarks/peer_spikingjelly.py: the same networks as models/ (docs/design.md), built independently.

SpikingJelly (2.0) pieces, all in multi-step mode (``step_mode='m'``, tensors ``[T, N, C, H, W]``):
``layer.Conv2d``, ``layer.BatchNormThroughTime2d`` (BNTT: one BatchNorm2d per timestep, no shift),
``neuron.LIFNode`` and ``layer.AvgPool2d`` / ``layer.ConvTranspose2d``. The LIF node with
``decay_input=False`` charges ``H = V - (V - V_reset) / tau + X``; with ``v_reset=None`` (reset by
subtraction) ``V_reset`` counts as 0, so ``H = (1 - 1/tau) V + X``: the leak 0.99 is ``tau = 100``. It fires
when ``H - threshold >= 0`` and subtracts the threshold; ``detach_reset=True`` keeps the reset out of the
gradient, as the paper's code (and ours) do. ``surrogate.PiecewiseQuadratic(alpha=1)`` has the derivative
``max(0, 1 - |H - 1|)``: our ``linear`` surrogate with ``gamma = 1`` at threshold 1.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate

LEAK, THRESHOLD, BN_EPS = 0.99, 1.0, 1e-4
# The settings our model must be built with to be this network (models.build_model's config keys).
OUR_CONFIG = dict(leak_mem=LEAK, def_threshold=THRESHOLD, surrogate="linear", surrogate_params={"gamma": 1.0})


def lif(surrogate_function=None):
    return neuron.LIFNode(
        tau=1.0 / (1.0 - LEAK),
        decay_input=False,
        v_threshold=THRESHOLD,
        v_reset=None,
        surrogate_function=surrogate_function or surrogate.PiecewiseQuadratic(alpha=1.0),
        detach_reset=True,
        step_mode="m",
    )


class Unit(nn.Sequential):
    """conv (no bias) -> BNTT -> LIF."""

    def __init__(self, cin, cout, timesteps, dilation=1, kernel=3, surrogate_function=None):
        super().__init__(
            layer.Conv2d(
                cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False, step_mode="m"
            ),
            layer.BatchNormThroughTime2d(timesteps, cout, eps=BN_EPS, momentum=0.1, step_mode="m"),
            lif(surrogate_function),
        )


def pool():
    return layer.AvgPool2d(3, stride=2, padding=1, step_mode="m")


class DeepLabVGG9(nn.Module):
    """conv64 x2, pool, conv128 x2, pool, conv256, conv256 (dilation 2) x2, conv1024 (dilation 12), then a
    1x1 output convolution of the last spikes averaged over time, bilinearly resized to the input."""

    def __init__(self, in_channels, classes, timesteps, surrogate_function=None):
        super().__init__()
        u = lambda cin, cout, d=1: Unit(cin, cout, timesteps, d, surrogate_function=surrogate_function)  # noqa: E731
        self.timesteps = timesteps
        self.body = nn.Sequential(
            u(in_channels, 64), u(64, 64), pool(),
            u(64, 128), u(128, 128), pool(),
            u(128, 256), u(256, 256, 2), u(256, 256, 2),
            u(256, 1024, 12),
        )  # fmt: skip
        self.output = nn.Conv2d(1024, classes, 1, bias=False)

    def forward(self, x_seq, size):
        functional.reset_net(self)
        rate = self.body(x_seq).sum(0) / self.timesteps
        return F.interpolate(self.output(rate), size=size, mode="bilinear", align_corners=True)


class FCNVGG9(nn.Module):
    """conv64 x2 [score], pool, conv128 x2 [score], pool, conv256 x3 [score], pool, conv1024 x2 [score];
    the decoder from the coarsest score up: transposed conv (k3, s2), bilinear resize to the next score,
    add it, LIF (not after the last addition); the output is that sum over time / T, resized to the input."""

    def __init__(self, in_channels, classes, timesteps, surrogate_function=None):
        super().__init__()
        u = lambda cin, cout: Unit(cin, cout, timesteps, surrogate_function=surrogate_function)  # noqa: E731
        score = lambda cin: layer.Conv2d(cin, classes, 1, step_mode="m")  # noqa: E731
        self.timesteps = timesteps
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(u(in_channels, 64), u(64, 64)),
                nn.Sequential(pool(), u(64, 128), u(128, 128)),
                nn.Sequential(pool(), u(128, 256), u(256, 256), u(256, 256)),
                nn.Sequential(pool(), u(256, 1024), u(1024, 1024)),
            ]
        )
        self.scores = nn.ModuleList([score(64), score(128), score(256), score(1024)])
        self.ups = nn.ModuleList(
            [layer.ConvTranspose2d(classes, classes, 3, stride=2, bias=False, step_mode="m") for _ in range(3)]
        )
        self.lifs = nn.ModuleList([lif(surrogate_function), lif(surrogate_function)])

    def forward(self, x_seq, size):
        functional.reset_net(self)
        h, scores = x_seq, []
        for block, score in zip(self.blocks, self.scores):
            h = block(h)
            scores.append(score(h))
        h = scores[-1]
        for k, (up, skip) in enumerate(zip(self.ups, reversed(scores[:-1]))):
            y = up(h)
            t, n = y.shape[:2]
            y = F.interpolate(y.flatten(0, 1), size=skip.shape[-2:], mode="bilinear", align_corners=True)
            h = y.view(t, n, *y.shape[1:]) + skip
            if k < len(self.lifs):
                h = self.lifs[k](h)
        return F.interpolate(h.sum(0) / self.timesteps, size=size, mode="bilinear", align_corners=True)


PEERS = {"dl-vgg9": DeepLabVGG9, "fcn-vgg9": FCNVGG9}


def copy_weights(ours, peer):
    """Our model's parameters and BN statistics into the peer (the layers in order of appearance)."""
    our_units = ours.conv_units()
    peer_units = [m for m in peer.modules() if isinstance(m, Unit)]
    assert len(our_units) == len(peer_units), (len(our_units), len(peer_units))
    with torch.no_grad():
        for a, b in zip(our_units, peer_units):
            conv, bntt = b[0], b[1]
            conv.weight.copy_(a.conv.weight)
            for t, bn in enumerate(bntt.bn_list):
                bn.weight.copy_(a.norm.weight[t])
                bn.running_mean.copy_(a.norm.running_mean[t])
                bn.running_var.copy_(a.norm.running_var[t])
        if isinstance(peer, DeepLabVGG9):
            peer.output.weight.copy_(ours.output.weight)
        else:
            from models.network import SkipScore

            for a, b in zip([m for m in ours.body if isinstance(m, SkipScore)], peer.scores):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            for stage, up in zip(ours.decoder, peer.ups):
                up.weight.copy_(stage.up.weight)


def matching_parameters(ours, peer):
    """(our parameter, peer parameter) pairs: conv weights, BNTT scales (ours [T, C], the peer's T BNs)."""
    pairs = []
    peer_units = [m for m in peer.modules() if isinstance(m, Unit)]
    for a, b in zip(ours.conv_units(), peer_units):
        pairs.append((a.conv.weight, b[0].weight))
        pairs.append((a.norm.weight, [bn.weight for bn in b[1].bn_list]))
    if isinstance(peer, DeepLabVGG9):
        pairs.append((ours.output.weight, peer.output.weight))
    else:
        from models.network import SkipScore

        for a, b in zip([m for m in ours.body if isinstance(m, SkipScore)], peer.scores):
            pairs += [(a.weight, b.weight), (a.bias, b.bias)]
        for stage, up in zip(ours.decoder, peer.ups):
            pairs.append((stage.up.weight, up.weight))
    return pairs
