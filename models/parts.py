"""The parts architectures are built from, each answering the layer protocol (models/protocol.py).

Tensors are time-folded ``[S*N, C, H, W]`` (time-major); parts that care about time (BNTT, the neurons)
read the network's clock (models/clock.py). ``Parts(cfg)`` builds each part in the variant the config asks
for: an SNN's conv unit is conv -> BNTT -> neuron, its ANN twin's conv -> BN -> ReLU, from the same call,
so the two variants of an architecture cannot drift apart.

- ``ConvUnit``: convolution -> batch norm -> activation (neuron or ReLU), the backbone's layer.
- ``NeuronLayer`` (any ``models.neurons.Neuron``): a spiking layer on its own.
- ``AvgPool`` / ``MaxPool``: pooling; ``Add``: the sum of its inputs (a residual connection);
  ``Upsample``: bilinear resize to another tensor's size.
- ``SkipScore``: FCN skip (1x1 convolution to class scores); ``DecoderStage``: FCN decoder step;
  ``Readout``: DeepLab's output convolution on the time-mean.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import protocol
from . import spikes as spike_protocol
from .clock import Timed
from .convolution import AvgPool2d, Conv2d
from .neurons import Neuron, TimeBN, build_neuron, neuron_arguments

BN_EPS, BN_MOMENTUM = 1e-4, 0.1


def plain_ops(clock) -> bool:
    """Whether to run the plain ``nn.Conv2d`` / ``nn.AvgPool2d`` forward instead of models/convolution.py's:
    under torch.compile (those are autograd functions that save memory in eager mode, with in-place ``out=``
    ops that torch.compile does not trace; same values) and in the per-timestep reference execution."""
    return torch.compiler.is_compiling() or (clock is not None and clock.per_step)


class TimeBatchNorm(Timed, nn.Module):
    """BatchNorm2d per timestep (BNTT); with T = 1 and no affine, the ANN's BN.

    The statistics of timestep t are taken over (N, H, W) of that timestep only, exactly as T separate
    BatchNorm2d layers would. Only the learnable scale exists (the shift is off, as in the paper).
    Steps beyond ``timesteps`` (full propagation's zero-input tail) are passed through unnormalised.

    ``shared`` (model key ``bntt: false``): one BN for all timesteps, its statistics taken over
    (T, N, H, W) together, applied to every step (the zero-input tail too). In eval mode it is one affine
    map per channel, which folds into the convolution in front of it (the deployable recipe). Parameters
    and statistics then have one row, ``[1, C]``; memory-saving mode takes the training statistics per
    replayed block of timesteps.
    """

    def __init__(self, channels: int, timesteps: int, affine: bool, shared: bool = False):
        super().__init__()
        self.channels, self.timesteps, self.shared = channels, timesteps, shared
        rows = 1 if shared else timesteps
        self.weight = nn.Parameter(torch.ones(rows, channels)) if affine else None
        self.register_buffer("running_mean", torch.zeros(rows, channels))
        self.register_buffer("running_var", torch.ones(rows, channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def steps_normalised(self, t0: int, steps: int) -> int:
        """How many of the timesteps t0 .. t0+steps-1 get BN (those before T; full propagation's do not)."""
        return max(0, min(steps, self.timesteps - t0))

    def time_bn(self, t0: int, steps: int, replaying: bool = False):
        """The TimeBN of timesteps t0 .. t0+steps-1 for the fused BN + LIF, or None when none of them is
        normalised. The running statistics are views: training-mode BN updates them in place.
        ``replaying``: memory-saving mode's replay of a block whose statistics are already updated."""
        n_bn = self.steps_normalised(t0, steps)
        if n_bn == 0:
            return None
        rows = slice(t0, t0 + n_bn)
        momentum = self._count_batch(t0, replaying)
        return TimeBN(
            self.weight[rows].reshape(-1),
            self.running_mean[rows].view(-1),
            self.running_var[rows].view(-1),
            self.training,
            momentum,
            BN_EPS,
            n_bn,
        )

    def _count_batch(self, t0, replaying):
        """Count a training batch once (at its first timestep); return the momentum to use: none
        while memory-saving mode replays a forward that already updated the statistics."""
        if replaying:
            return 0.0
        if self.training and t0 == 0:
            self.num_batches_tracked.add_(1)
        return BN_MOMENTUM

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, t0: int = 0, replaying: bool = False):
        """BN of time-folded ``x``; the block's timing from the clock, or from the arguments when given."""
        if steps is None:
            clock = self.clock_for(None)
            steps, t0, replaying = clock.steps, clock.t0, clock.replaying
        momentum = self._count_batch(t0, replaying)
        if self.shared:  # all steps of the time-folded block at once: statistics over (S*N, H, W)
            weight = None if self.weight is None else self.weight[0]
            mean, var = self.running_mean[0], self.running_var[0]
            return F.batch_norm(x, mean, var, weight, None, self.training, momentum, BN_EPS)
        n_bn = self.steps_normalised(t0, steps)
        # Each timestep is one contiguous block of the time-major input: one BN call per timestep. Slices, not
        # a view of time_split: with one sample per step that view's batch stride is C, and PyTorch 2.14's CPU
        # batch_norm backward then returns wrong gradients (its forward is right).
        n = x.shape[0] // steps
        frames = [x[t * n : (t + 1) * n] for t in range(steps)]
        out = [
            F.batch_norm(
                frames[t],
                self.running_mean[t0 + t],
                self.running_var[t0 + t],
                None if self.weight is None else self.weight[t0 + t],
                None,
                self.training,
                momentum,
                BN_EPS,
            )
            for t in range(n_bn)
        ]
        parts = out + list(frames[n_bn:])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def folded(self):
        """(scale, shift) float64 ``[rows, C]`` of the eval-mode BN: BN(y) = y * scale + shift."""
        scale = (self.running_var.detach().double() + BN_EPS).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
        return scale, -self.running_mean.detach().double() * scale

    def extra_repr(self):
        shared = ", shared" if self.shared else ""
        return f"{self.channels}, timesteps={self.timesteps}, affine={self.weight is not None}{shared}"


class Rectifier(nn.Module):
    """The ANN's activation: ReLU, or leaky ReLU of slope ``alpha``."""

    def __init__(self, alpha=None):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return F.relu(x) if self.alpha is None else F.leaky_relu(x, self.alpha)


class ConvUnit(protocol.Part, Timed):
    """conv -> (BN | BNTT) -> (ReLU | neuron): one layer of a backbone.

    ``recompute``: a spiking unit keeps only its input (spikes, one byte) for backward and recomputes
    its convolution there, instead of keeping the convolution's output (4 bytes per neuron and step).
    Architectures set it on their full-resolution units, whose outputs are the largest and whose
    convolutions (few input channels) the cheapest; memory-saving mode recomputes every unit.
    """

    def __init__(self, conv: nn.Conv2d, norm, act):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act
        self.recompute = False

    @property
    def spiking(self) -> bool:
        return isinstance(self.act, Neuron)

    def forward(self, x):
        clock = self.clock
        conv = (lambda h: nn.Conv2d.forward(self.conv, h)) if plain_ops(clock) else self.conv
        if self.spiking and self.norm is not None and self.norm.shared:
            # One BN for all timesteps: an ordinary layer between the convolution and the neurons.
            return self.act(self.norm(conv(x)))
        if self.spiking:
            # BNTT is fused into an accelerator's backward; the neurons decide whether the convolution is too.
            wanted = (clock.recompute or self.recompute) and not plain_ops(clock)
            if self.act.recomputes_conv(x, self.norm, wanted):
                return self.act(x, norm=self.norm, conv=self.conv)
            return self.act(conv(x), norm=self.norm)
        x = conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x)

    # ---- the layer protocol ----
    def activity(self, inputs):
        return self.act.emits() if self.spiking else protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self.conv, local="conv"),)

    def conversion_problem(self):
        return None

    def folded(self):
        """(weight, bias) float64 of conv -> eval-mode BN (BN statistics of several timesteps averaged)."""
        weight = self.conv.weight.detach().double()
        bias = self.conv.bias.detach().double() if self.conv.bias is not None else weight.new_zeros(weight.shape[0])
        if self.norm is None:
            return weight, bias
        scale, shift = self.norm.folded()
        scale, shift = scale.mean(0), shift.mean(0)  # one row unless BNTT
        return weight * scale.view(-1, 1, 1, 1), bias * scale + shift

    def conversion_state(self, prefix):
        if self.norm is not None and self.norm.running_mean.shape[0] != 1:
            raise protocol.NotSupported(
                f"BN folding needs the ANN's single-step BN, got statistics for "
                f"{self.norm.running_mean.shape[0]} timesteps (is this an SNN?)"
            )
        weight, bias = self.folded()
        return {f"{prefix}conv.weight": weight.float(), f"{prefix}conv.bias": bias.float()}

    def nir_layers(self):
        if not self.spiking:
            raise protocol.NotSupported("an ANN layer has no spiking dynamics")
        weight, bias = self.folded()
        return (nir_conv(self.conv, weight, bias), self.act.nir_neuron())

    def nir_problems(self):
        problems = list(self.act.nir_problems()) if self.spiking else []
        if self.norm is not None and not self.norm.shared and self.norm.timesteps > 1:
            problems.insert(
                0,
                protocol.NirProblem(
                    "BNTT (one batch norm per timestep) has no NIR form",
                    "bntt: false (one BN over all timesteps, folded into the conv)",
                    "BN folded with its statistics and scale averaged over the timesteps",
                ),
            )
        return problems


class AvgPool(protocol.Part, Timed, AvgPool2d):
    """Average pooling (zero padding counted): a linear map, so spikes pooled stay events for energy and
    conversion (their amplitude passes through)."""

    def forward(self, x):
        return nn.AvgPool2d.forward(self, x) if plain_ops(self.clock) else AvgPool2d.forward(self, x)

    def activity(self, inputs):
        return protocol.pooled(inputs[0])

    def events(self):
        return "pool"

    def conversion_problem(self):
        return None

    def nir_layers(self):
        if not self.count_include_pad or self.ceil_mode or self.divisor_override is not None:
            raise protocol.NotSupported("only average pooling that counts the padding exports")
        return (protocol.NirAvgPool(_pair(self.kernel_size), _pair(self.stride), _pair(self.padding)),)


class MaxPool(protocol.Part, nn.MaxPool2d):
    """Max pooling. Of binary spikes it is their OR (spikes stay spikes); in a converted SNN the OR of the
    inputs' spikes fires at least as often as the busiest input, an approximation of the ANN's max."""

    def forward(self, x):
        out = super().forward(x)
        return out if torch.compiler.is_compiling() else spike_protocol.like(x, out)

    def nir_layers(self):
        raise protocol.NotSupported("max pooling has no NIR node", "average pooling in the architecture")

    def activity(self, inputs):
        return inputs[0] if inputs[0].integer else protocol.analog(inputs[0].sources)

    def conversion_problem(self):
        return None


class Add(protocol.Part):
    """The sum of its inputs: a residual (ADD) connection. Of spikes, integer levels up to the sum of the
    inputs' levels; in a converted SNN the spikes that meet here share one amplitude."""

    def forward(self, *inputs):
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        if torch.compiler.is_compiling() or not all(map(spike_protocol.holds_spikes, inputs)):
            return out
        # integer levels up to the sum of the terms': kept in one byte for backward like spikes (up to 127)
        return spike_protocol.mark(out, levels=sum(map(spike_protocol.levels, inputs)))

    def activity(self, inputs):
        return protocol.summed(inputs)

    def events(self):
        return "sum"

    def conversion_problem(self):
        return None

    def nir_layers(self):
        return ()  # NIR adds the edges that meet at a node


class Upsample(protocol.Part):
    """Bilinear resize of the first input to the second input's size (align_corners=True)."""

    def forward(self, x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)

    def conversion_problem(self):
        return None


class SkipScore(protocol.Part, nn.Conv2d):
    """FCN skip: 1x1 convolution (with bias) from the activations at this depth to class scores."""

    def nir_layers(self):
        raise FCN_NIR

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self),)

    def conversion_problem(self):
        return None


class DecoderStage(protocol.Part, Timed):
    """FCN decoder step: transposed conv (k3, s2), bilinear resize to the skip, add the skip score.

    In the SNN the sum drives neurons (``act``); the last stage and every ANN stage have none.
    """

    def __init__(self, classes: int, act=None):
        super().__init__()
        self.up = nn.ConvTranspose2d(classes, classes, kernel_size=3, stride=2, bias=False)
        self.act = act

    def forward(self, x, skip):
        x = F.interpolate(self.up(x), size=skip.shape[-2:], mode="bilinear", align_corners=True) + skip
        return x if self.act is None else self.act(x)

    def activity(self, inputs):
        return protocol.analog() if self.act is None else self.act.emits()

    def nir_layers(self):
        raise FCN_NIR

    def synapses(self):
        return (protocol.Synapse(self.up, in_dim=0, local="up"),)

    def conversion_problem(self):
        return None


class Readout(protocol.Part, nn.Conv2d):
    """DeepLab's output: a bias-free 1x1 convolution to the classes, without BN or activation. Being linear,
    conv(sum_t s_t) == sum_t conv(s_t): the network applies it once, to the time-mean of its input."""

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self, on_time_mean=True),)

    def conversion_problem(self):
        return None

    def nir_layers(self):
        weight = self.weight.detach().double()
        bias = weight.new_zeros(weight.shape[0]) if self.bias is None else self.bias.detach().double()
        return (nir_conv(self, weight, bias),)


# ------------------------------------------------------------------------------------------- NIR helpers
def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def nir_conv(conv, weight, bias) -> protocol.NirConv:
    if isinstance(conv.padding, str):
        raise protocol.NotSupported(f"padding={conv.padding!r} has no NIR form; give it in pixels")
    return protocol.NirConv(
        weight, bias, _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), int(conv.groups)
    )


FCN_NIR = protocol.NotSupported(
    "the FCN decoder upsamples (bilinear) between spiking stages, which NIR cannot express",
    "a DeepLab architecture (e.g. dl-vgg9, dl-sew-resnet18)",
)


# ------------------------------------------------------------------------------------------ the factory
class Parts:
    """Builds parts in the variant ``cfg`` asks for (SNN or its ANN twin, neuron model, batch norm)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.spiking = cfg["model_type"] == "snn"
        self.timesteps = int(cfg["timesteps"]) if self.spiking else 1

    def neuron(self, name: str = "") -> Neuron:
        cfg = self.cfg
        neuron = build_neuron(cfg.get("neuron", "lif"), **neuron_arguments(cfg, name))
        neuron.compile = bool(cfg.get("compile", False))
        return neuron

    def activation(self):
        """The SNN's neuron layer, or the ANN's (leaky) ReLU."""
        if self.spiking:
            return self.neuron()
        return Rectifier(float(self.cfg["alpha"]) if self.cfg.get("leaky") else None)

    def norm(self, channels: int) -> Optional[TimeBatchNorm]:
        """BNTT (or one BN over all timesteps with ``bntt: false``) in the SNN, affine-free BN in the ANN;
        None with ``bn: false`` (converted SNNs carry the folded BN in the convolution's bias)."""
        if not self.cfg["bn"]:
            return None
        shared = self.spiking and not self.cfg.get("bntt", True)
        return TimeBatchNorm(channels, self.timesteps, affine=self.spiking, shared=shared)

    def conv(self, in_channels, out_channels, kernel=3, stride=1, padding=None, dilation=1, groups=1) -> Conv2d:
        """A convolution ('same' padding by default) with the config's bias setting."""
        padding = dilation * (kernel - 1) // 2 if padding is None else padding
        conv = Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bool(self.cfg.get("conv_bias", False)),
        )
        conv.dense = self.cfg.get("dilated_as_dense", "auto")
        return conv

    def conv_unit(self, in_channels, out_channels, kernel=3, stride=1, padding=None, dilation=1, groups=1):
        """conv -> BN -> neuron (SNN) or ReLU (ANN)."""
        conv = self.conv(in_channels, out_channels, kernel, stride, padding, dilation, groups)
        return ConvUnit(conv, self.norm(out_channels), self.activation())

    def avg_pool(self, kernel=3, stride=2, padding=1) -> AvgPool:
        return AvgPool(kernel, stride=stride, padding=padding)

    def max_pool(self, kernel=3, stride=2, padding=1) -> MaxPool:
        return MaxPool(kernel, stride=stride, padding=padding)

    def add(self) -> Add:
        return Add()

    def skip_score(self, in_channels, classes) -> SkipScore:
        return SkipScore(in_channels, classes, kernel_size=1)

    def decoder_stage(self, classes, spiking: bool) -> DecoderStage:
        """An FCN decoder stage; ``spiking``: its sum drives neurons (in the SNN only)."""
        return DecoderStage(classes, self.neuron() if (spiking and self.spiking) else None)

    def readout(self, in_channels, classes) -> Readout:
        return Readout(in_channels, classes, kernel_size=1, bias=False)
