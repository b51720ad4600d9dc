"""Spiking and analog segmentation networks (DeepLab and FCN on VGG backbones), one implementation.

Tensors flow time-folded, ``[T*N, C, H, W]`` (time-major: each timestep one contiguous block) and
channels-last. A convolution or a pooling layer does not care about time, so it runs over all timesteps
at once; only BNTT (one BN per timestep) and the LIF neurons look at the time axis. The ANN is the same
network with T = 1, ordinary BN and ReLU, so the two variants of an architecture cannot drift apart.

Differences from a per-timestep loop are only in the order of floating-point sums: the network is
feed-forward, so running layer by layer over all timesteps computes the same spikes as running timestep
by timestep over all layers.
"""

import contextlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import spikes as spike_protocol
from .architectures import Conv, Output, Pool, Score, get_architecture, is_fcn
from .convolution import AvgPool2d, Conv2d
from .encoders import IdentityEncoder, build_encoder
from .neurons import Neuron, TimeBN, backend_name, build_neuron, check_backend, time_split, time_sum

BN_EPS, BN_MOMENTUM = 1e-4, 0.1


class _ForwardPass:
    """Per-call state of one forward: ``replaying`` is set while memory-saving mode replays a block of
    timesteps in backward, when BN must not update its running statistics a second time. One object per
    forward call (not a process-wide switch), handed to the blocks it runs."""

    def __init__(self):
        self.replaying = False

    @contextlib.contextmanager
    def replay(self):
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False


def _eager_only(layer, x):
    """``layer(x)``; under torch.compile the plain ``nn.Conv2d`` / ``nn.AvgPool2d`` forward instead of
    models/convolution.py's (same values: those are autograd functions that save memory in eager mode,
    with in-place ``out=`` ops that torch.compile does not trace)."""
    if torch.compiler.is_compiling():
        if isinstance(layer, Conv2d):
            return nn.Conv2d.forward(layer, x)
        if isinstance(layer, AvgPool2d):
            return nn.AvgPool2d.forward(layer, x)
    return layer(x)


class TimeBatchNorm(nn.Module):
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

    def forward(self, x: torch.Tensor, steps: int, t0: int = 0, replaying: bool = False) -> torch.Tensor:
        momentum = self._count_batch(t0, replaying)
        if self.shared:  # all steps of the time-folded block at once: statistics over (S*N, H, W)
            weight = None if self.weight is None else self.weight[0]
            mean, var = self.running_mean[0], self.running_var[0]
            return F.batch_norm(x, mean, var, weight, None, self.training, momentum, BN_EPS)
        n_bn = self.steps_normalised(t0, steps)
        # Each timestep is one contiguous block of the time-major input: one BN call per timestep.
        frames = time_split(x, steps)
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

    def extra_repr(self):
        shared = ", shared" if self.shared else ""
        return f"{self.channels}, timesteps={self.timesteps}, affine={self.weight is not None}{shared}"


class Rectifier(nn.Module):
    """The ANN's activation: ReLU, or leaky ReLU of slope ``alpha``."""

    def __init__(self, alpha=None):
        super().__init__()
        self.alpha = alpha

    def forward(self, x, steps=1, t0=0):
        return F.relu(x) if self.alpha is None else F.leaky_relu(x, self.alpha)


class ConvUnit(nn.Module):
    """conv -> (BN | BNTT) -> (ReLU | LIF): one layer of the backbone.

    ``recompute``: a spiking unit keeps only its input (spikes, one byte) for backward and recomputes
    its convolution there, instead of keeping the convolution's output (4 bytes per neuron and step).
    The network sets it on its full-resolution units, whose outputs are the largest and whose
    convolutions (few input channels) the cheapest; memory-saving mode recomputes every unit.
    """

    def __init__(self, conv: nn.Conv2d, norm, act):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act
        self.recompute = False

    def forward(self, x, steps, t0=0, membranes=None, recompute=False, replaying=False):
        if isinstance(self.act, Neuron) and self.norm is not None and self.norm.shared:
            # One BN for all timesteps: an ordinary layer between the convolution and the neurons.
            x = self.norm(self.conv(x), steps, t0, replaying)
            return self.act(x, steps, None, t0, membranes, replaying=replaying)
        if isinstance(self.act, Neuron):
            # BNTT is fused into an accelerator's backward; the neurons decide whether the convolution is too.
            if self.act.recomputes_conv(x, self.norm, recompute or self.recompute):
                return self.act(x, steps, self.norm, t0, membranes, conv=self.conv, replaying=replaying)
            return self.act(_eager_only(self.conv, x), steps, self.norm, t0, membranes, replaying=replaying)
        x = _eager_only(self.conv, x)
        if self.norm is not None:
            x = self.norm(x, steps, t0, replaying)
        return self.act(x, steps)


class SkipScore(nn.Conv2d):
    """FCN skip: 1x1 convolution (with bias) from the activations at this depth to class scores."""


class DecoderStage(nn.Module):
    """FCN decoder step: transposed conv (k3, s2), bilinear resize to the skip, add the skip score.

    In the SNN the sum drives LIF neurons (``act``); the last stage and every ANN stage have none.
    """

    def __init__(self, classes: int, act=None):
        super().__init__()
        self.up = nn.ConvTranspose2d(classes, classes, kernel_size=3, stride=2, bias=False)
        self.act = act

    def forward(self, x, skip, steps, t0=0, membranes=None, replaying=False):
        x = F.interpolate(self.up(x), size=skip.shape[-2:], mode="bilinear", align_corners=True) + skip
        return x if self.act is None else self.act(x, steps, None, t0, membranes, replaying=replaying)


def _time_slice(h, steps, t0, k):
    """Timesteps t0 .. t0+k-1 of a time-folded tensor, time-folded again (a view: time-major)."""
    n = h.shape[0] // steps
    return spike_protocol.like(h, h[t0 * n : (t0 + k) * n])


class SegmentationNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        self.arch = cfg["arch"]
        self.spiking = cfg["model_type"] == "snn"
        self.timesteps = int(cfg["timesteps"]) if self.spiking else 1
        self.fcn = is_fcn(self.arch)
        self.readout_sum = cfg.get("readout") == "sum"
        self.memory_saving = bool(cfg.get("memory_saving", False))
        self.memory_block = int(cfg.get("memory_block", 4))
        self.encoder = build_encoder(cfg["encoder"]) if self.spiking else IdentityEncoder()
        self._build(cfg)
        self._init_weights()

    # ----------------------------------------------------------------------------------------- build
    def _build(self, cfg):
        table = get_architecture(self.arch)
        classes, channels = int(cfg["num_classes"]), int(cfg["in_channels"])
        self.body = nn.ModuleList()
        self.output = None
        # Body positions of each part's conv units: the paper's 'features.<i>' / 'classifier.<i>'.
        self.part_units = {"features": [], "classifier": []}
        conv_layers = 0
        for part in ("features", "classifier"):
            for token in table[part]:
                if isinstance(token, Conv):
                    name = f"{part}.{len(self.part_units[part])}"
                    self.part_units[part].append(len(self.body))
                    self.body.append(self._conv_unit(cfg, channels, token, name))
                    channels = token.channels
                    conv_layers += 1
                elif isinstance(token, Pool):
                    self.body.append(AvgPool2d(3, stride=token.stride, padding=1))
                elif isinstance(token, Score):
                    self.body.append(SkipScore(channels, classes, kernel_size=1))
                elif isinstance(token, Output):
                    self.output = nn.Conv2d(channels, classes, kernel_size=1, bias=False)
                    conv_layers += 1
        for unit in self._full_resolution_units():
            unit.recompute = True
        self.decoder = nn.ModuleList()
        if self.fcn:
            stages = sum(isinstance(m, SkipScore) for m in self.body) - 1
            for k in range(stages):
                act = self._neuron(cfg, f"decoder.{k}") if self.spiking and k < stages - 1 else None
                self.decoder.append(DecoderStage(classes, act))
        # Full propagation: after the T input steps, one zero-input step per layer of the main chain,
        # so that the last input reaches the output (counted as in the paper's code).
        self.extra_steps = conv_layers if (self.spiking and cfg.get("full_prop")) else 0

    def _full_resolution_units(self):
        """The conv units before the first pooling."""
        units = []
        for layer in self.body:
            if isinstance(layer, nn.AvgPool2d):
                break
            if isinstance(layer, ConvUnit):
                units.append(layer)
        return units

    def _part(self, part):
        return [self.body[i] for i in self.part_units[part]]

    def _conv_unit(self, cfg, in_channels, token: Conv, name):
        conv = Conv2d(
            in_channels,
            token.channels,
            token.kernel,
            padding=token.padding,
            dilation=token.dilation,
            bias=bool(cfg.get("conv_bias", False)),
        )
        conv.dense = cfg.get("dilated_as_dense", "auto")
        norm = None
        if cfg["bn"]:
            shared = self.spiking and not cfg.get("bntt", True)
            norm = TimeBatchNorm(token.channels, self.timesteps, affine=self.spiking, shared=shared)
        if self.spiking:
            act = self._neuron(cfg, name)
        else:
            act = Rectifier(float(cfg["alpha"]) if cfg.get("leaky") else None)
        return ConvUnit(conv, norm, act)

    def _neuron(self, cfg, name):
        alpha = float(cfg["alpha"]) if cfg.get("leaky") else None
        neuron = build_neuron(
            cfg.get("neuron", "lif"),
            leak=cfg["leak_mem"],
            threshold=cfg["def_threshold"],
            surrogate=cfg["surrogate"],
            surrogate_params=cfg.get("surrogate_params"),
            alpha=alpha,
            reset=cfg.get("reset", "subtract"),
            name=name,
            backend=cfg.get("neuron_backend", "auto"),
        )
        neuron.compile = bool(cfg.get("compile", False))
        return neuron

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight, gain=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # spikes are kept by the custom ops' own saved tensors
            return self._forward(x)
        with spike_protocol.compact_spikes():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = x.shape[-2:]
        h = self.encoder(x, self.timesteps)
        steps = self.timesteps + self.extra_steps
        if self.extra_steps:
            n = h.shape[0] // self.timesteps
            h = spike_protocol.like(h, torch.cat([h, h.new_zeros((self.extra_steps * n, *h.shape[1:]))]))
        # Channels-last: oneDNN's (and cuDNN's) native layout, which saves the convolutions ~20 % of
        # their time and the reorders' temporary copies; each timestep's BN uses the channels-last kernel.
        h = spike_protocol.like(h, h.contiguous(memory_format=torch.channels_last))
        replay = self.memory_saving and self.training and torch.is_grad_enabled()
        block = min(self.memory_block, steps) if replay else steps
        neurons = self.neuron_layers()
        carries, total = [None] * len(neurons), 0
        this_pass = _ForwardPass()
        for t0 in range(0, steps, block):
            k = min(block, steps - t0)
            part = h if k == steps else _time_slice(h, steps, t0, k)
            if replay:
                # Memory-saving mode: keep only the block's input and the membranes at its start;
                # backward replays the block (BN statistics are not updated twice).
                out = torch.utils.checkpoint.checkpoint(
                    self._run_block,
                    part,
                    t0,
                    k,
                    *carries,
                    recompute=True,
                    spikes_in=spike_protocol.holds_spikes(part),
                    this_pass=this_pass,
                    use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), this_pass.replay()),
                )
            else:
                out = self._run_block(part, t0, k, *carries)
            total, carries = total + out[0], list(out[1:])
        # The readout integrates without leak over all steps, divided by T (or not: paper's FCN code).
        readout = total if (self.readout_sum or steps == 1) else total / self.timesteps
        # DeepLab: the output conv is linear and bias-free: conv(sum_t s_t) == sum_t conv(s_t), done once.
        out = readout if self.fcn else self.output(readout)
        if out.shape[-2:] != out_size:
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=True)
        return out

    def _run_block(self, h, t0, steps, *carries, recompute=False, spikes_in=False, this_pass=None):
        """Timesteps t0 .. t0+steps-1 through every layer; returns the sum over these steps of what
        feeds the readout, and each neuron layer's final state (a tuple of tensors). ``recompute``:
        spiking conv units keep only their input and recompute their convolution in backward.
        ``spikes_in``: ``h`` holds spikes (checkpoint's replay passes a copy of ``h`` that has lost the
        mark, and must store what the first pass stored). ``this_pass``: the forward call's state
        (whether memory-saving mode is replaying this block now)."""
        if spikes_in:
            h = spike_protocol.mark(h)
        replaying = this_pass is not None and this_pass.replaying
        neurons = self.neuron_layers()
        # Each layer's state, carried in and out. A local dict, not module state: memory-saving mode's
        # replay in backward may stop early, and state left on the modules would keep its graph alive.
        membranes = dict(zip(neurons, carries))
        skips = []
        for layer in self.body:
            if isinstance(layer, ConvUnit):
                h = layer(h, steps, t0, membranes, recompute, replaying)
            elif isinstance(layer, SkipScore):
                skips.append(layer(h))
            else:
                h = _eager_only(layer, h)
        if self.fcn:
            h = skips[-1]
            for stage, skip in zip(self.decoder, reversed(skips[:-1])):
                h = stage(h, skip, steps, t0, membranes, replaying)
        total = h if steps == 1 else time_sum(h, steps)
        return (total, *[membranes[neuron] for neuron in neurons])

    # -------------------------------------------------------------------------------------- analysis
    def neuron_layers(self):
        """The neuron layers in the order the signal reaches them."""
        return [m for m in self.modules() if isinstance(m, Neuron)]

    def set_neuron_backend(self, name: str):
        """Run the neurons on backend ``name`` (auto, generic, torch or triton); the weights are unchanged.
        A backend that does not support the model's neuron is a ValueError."""
        check_backend(name)
        for neuron in self.neuron_layers():
            check_backend(name, neuron)  # all of them before any changes
        for neuron in self.neuron_layers():
            neuron.set_backend(name)
        self.config["neuron_backend"] = name

    @property
    def neuron_backend(self) -> str:
        """The backend the neurons run on, on the device the model is on now ('generic', 'torch' or
        'triton'; '' for an ANN)."""
        layers = self.neuron_layers()
        if not layers:
            return ""
        device = next(self.parameters()).device
        return backend_name(layers[0].accelerator(device))

    def conv_units(self):
        return [m for m in self.body if isinstance(m, ConvUnit)]

    def record_spikes(self, on: bool = True):
        for lif in self.neuron_layers():
            lif.recording = on

    def reset_spike_stats(self):
        for lif in self.neuron_layers():
            lif.reset_spike_stats()

    def spike_stats(self):
        return [lif.spike_stats() for lif in self.neuron_layers()]

    def load_vgg_weights(self, path: str):
        """Start the backbone from torchvision ImageNet VGG weights in a local file (no download).

        Conv weights are copied in order where shapes agree (a first layer for event input is kept);
        the VGG biases are dropped since the paper's convs have none.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"pretrained weights file '{path}' does not exist") from None
        except Exception as exc:  # one line: not PyTorch's advice to load it with weights_only=False
            text = str(exc)
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            reason = reason.group(1).strip() if reason else (text.splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"pretrained weights '{path}' are not a weights-only PyTorch file (torch.load with weights_only=True: "
                f"{reason}; nothing in it was run)"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"pretrained weights '{path}' hold a {type(state).__name__}, not a dict of weights")
        vgg = [v for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
        if not vgg:
            raise ValueError(f"'{path}' holds no torchvision VGG 'features.<i>.weight' conv weights")
        copied = 0
        for unit, weight in zip(self._part("features"), vgg):
            if unit.conv.weight.shape == weight.shape:
                with torch.no_grad():
                    unit.conv.weight.copy_(weight)
                copied += 1
        return copied
