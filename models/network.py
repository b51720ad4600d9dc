"""The base class of every segmentation network: input encoding, time, memory saving and the readout.

An architecture (models/architectures/) subclasses ``SegmentationNet`` and writes two methods: ``build``
(its layers, made from the parts factory of models/parts.py, so that the SNN and its ANN twin come from one
definition) and ``forward_steps`` (a time-folded input ``[S*N, C, H, W]`` in, the readout's input out, as
ordinary PyTorch). Everything about time lives here and in the clock (models/clock.py):

- the encoder turns the input into T steps (time-major); full propagation appends zero-input steps;
- the steps run as one block, or, in memory-saving mode, as blocks of ``memory_block`` steps, each replayed
  in backward, the neurons' states carried from block to block in the clock;
- the readout integrates without leak over all steps, divided by T (``readout: sum``: not divided), then
  the architecture's ``head`` (a linear map applied to the time-mean, e.g. DeepLab's output convolution)
  and a bilinear resize to the input's size.

The ANN is the same network with T = 1, ordinary BN and ReLU. Running layer by layer over all timesteps
computes the same spikes as running timestep by timestep over all layers (the network is feed-forward in
time); only the order of floating-point sums differs.
"""

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import spikes as spike_protocol
from .clock import Clock, Timed
from .encoders import IdentityEncoder, build_encoder
from .neurons import Neuron, backend_name, check_backend, time_sum
from .parts import ConvUnit, Parts
from .protocol import outer_parts

MAIN = "out"  # the name of the main output among an architecture's outputs


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


def _time_slice(h, steps, t0, k):
    """Timesteps t0 .. t0+k-1 of a time-folded tensor, time-folded again (a view: time-major)."""
    n = h.shape[0] // steps
    return spike_protocol.like(h, h[t0 * n : (t0 + k) * n])


class SegmentationNet(nn.Module):
    """An ANN or SNN segmentation network; subclasses define ``build`` and ``forward_steps``.

    ``readout_head()``: a module applied to the time-mean of the main output (default: the submodule named
    ``head``, if any; None: the main output is the logits). ``forward(x)`` returns the main logits
    ``[N, classes, H, W]``; ``forward_heads(x)`` every output the architecture returns (e.g. an auxiliary
    head for its loss), each resized to the input.
    """

    def __init__(self, cfg: dict, **options):
        super().__init__()
        self.config = dict(cfg)
        self.arch = cfg["arch"]
        self.spiking = cfg["model_type"] == "snn"
        self.timesteps = int(cfg["timesteps"]) if self.spiking else 1
        self.readout_sum = cfg.get("readout") == "sum"
        self.memory_saving = bool(cfg.get("memory_saving", False))
        self.memory_block = int(cfg.get("memory_block", 4))
        self.encoder = build_encoder(cfg["encoder"]) if self.spiking else IdentityEncoder()
        self.clock = Clock()
        self.main_only = True  # while forward_heads runs: whether only the main output is wanted
        self._observers = []  # models.graph.Recorder objects watching the blocks (layer graph, energy)
        self.build(cfg, Parts(cfg), **options)
        for module in self.modules():
            if isinstance(module, Timed):
                module.clock = self.clock
        self._name_neurons()
        self.init_weights()
        # Full propagation: after the T input steps, zero-input steps until the last input reaches the output.
        self.extra_steps = self.full_prop_steps() if (self.spiking and cfg.get("full_prop")) else 0

    # ------------------------------------------------------------------------- what an architecture writes
    def build(self, cfg: dict, parts: Parts, **options):
        """Create the layers (``parts`` builds each in the SNN or ANN variant of ``cfg``; ``options``: those
        the architecture was registered with)."""
        raise NotImplementedError(f"architecture {type(self).__name__} does not define build(cfg, parts)")

    def forward_steps(self, h: torch.Tensor):
        """The readout's input for the time-folded input ``h`` of the running block of timesteps: a tensor,
        or a dict of them (``'out'`` the main one, others e.g. auxiliary heads)."""
        raise NotImplementedError(f"architecture {type(self).__name__} does not define forward_steps(h)")

    @classmethod
    def min_input_size(cls, **options) -> int:
        """The smallest input side this architecture takes (with these build options): its total
        downsampling, below which its deepest feature maps would be under one pixel."""
        return 1

    # What an architecture declares about itself (class attributes, read before it is built):
    heads = (MAIN,)  # the outputs forward_heads returns ('aux': an auxiliary head, 'boundary': a boundary head)
    ann_twin = True  # model_type 'ann' builds its analog twin
    channels_last = True  # the input's memory layout (docs/performance.md)
    config_defaults: dict = {}  # settings that make the architecture what it is, where a run does not give them

    @classmethod
    def check_config(cls, cfg: dict, **options):
        """Refuse settings this architecture cannot run with (``cfg``: the resolved model config and, in a run,
        the other keys), with a ValueError naming them; called before it is built."""
        if not cls.ann_twin and cfg.get("model_type") == "ann":
            raise ValueError(f"architecture {cfg['arch']!r} is spiking only (no ANN twin); use model_type snn")

    def readout_head(self) -> Optional[nn.Module]:
        """The linear map from the time-mean of the main output to the logits, or None."""
        return self._modules.get("head")

    def full_prop_steps(self) -> int:
        """How many zero-input steps full propagation appends (the layers on the longest path)."""
        raise ValueError(f"full_prop: architecture {self.arch!r} does not say how deep it is (full_prop_steps)")

    def load_pretrained(self, path: str):
        """Start from ImageNet weights in a local file; architectures that can override this."""
        raise ValueError(f"pretrained: architecture {self.arch!r} cannot start from pretrained weights")

    def init_weights(self):
        """Xavier uniform with gain 2 for every convolution (the paper's initialisation), biases zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight, gain=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def resize(self, logits: torch.Tensor, size) -> torch.Tensor:
        """The logits at the input's size: bilinear, align_corners=True."""
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, heads: bool = False):
        """The main logits; with ``heads``, the dict of every output (``forward_heads``): the way a loss of
        auxiliary heads asks for them, also through DistributedDataParallel."""
        if heads:
            return self.forward_heads(x)
        return self.forward_heads(x, main_only=True)[MAIN]

    def forward_heads(self, x: torch.Tensor, main_only: bool = False) -> dict:
        """Every output of the architecture, each at the input's size (``main_only``: the main one).
        ``self.main_only`` tells ``forward_steps`` which: an architecture may skip auxiliary heads then
        (outside training, where their batch norms update)."""
        self.main_only = main_only
        try:
            if torch.compiler.is_compiling():  # spikes are kept by the custom ops' own saved tensors
                return self._forward(x, main_only)
            with spike_protocol.compact_spikes():
                return self._forward(x, main_only)
        finally:
            self.main_only = True

    def _forward(self, x: torch.Tensor, main_only: bool) -> dict:
        out_size = x.shape[-2:]
        h = self.encoder(x, self.timesteps)
        steps = self.timesteps + self.extra_steps
        if self.extra_steps:
            n = h.shape[0] // self.timesteps
            h = spike_protocol.like(h, torch.cat([h, h.new_zeros((self.extra_steps * n, *h.shape[1:]))]))
        # Channels-last: oneDNN's (and cuDNN's) native layout, which saves the convolutions ~20 % of
        # their time and the reorders' temporary copies; each timestep's BN uses the channels-last kernel.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        h = spike_protocol.like(h, h.contiguous(memory_format=layout))
        per_step = self.clock.per_step  # the per-timestep reference: one step per block, no replay
        replay = self.memory_saving and self.training and torch.is_grad_enabled() and not per_step
        block = 1 if per_step else min(self.memory_block, steps) if replay else steps
        neurons = self.neuron_layers()
        carries, totals = [None] * len(neurons), None
        this_pass = _ForwardPass()
        for t0 in range(0, steps, block):
            k = min(block, steps - t0)
            part = h if k == steps else _time_slice(h, steps, t0, k)
            if replay:
                # Memory-saving mode: keep only the block's input and the states at its start;
                # backward replays the block (BN statistics are not updated twice).
                sums, carries = torch.utils.checkpoint.checkpoint(
                    self._run_block,
                    part,
                    t0,
                    k,
                    carries,
                    recompute=True,
                    spikes_in=spike_protocol.levels(part),
                    this_pass=this_pass,
                    use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), this_pass.replay()),
                )
            else:
                sums, carries = self._run_block(part, t0, k, carries)
            totals = sums if totals is None else {key: totals[key] + value for key, value in sums.items()}
        heads = {MAIN: totals[MAIN]} if main_only else totals
        return {key: self.resize(self._readout(key, total, steps), out_size) for key, total in heads.items()}

    def _readout(self, key, total, steps):
        """The readout integrates without leak over all steps, divided by T (or not: the paper's FCN code);
        then the head, once (it is linear: head(sum_t s_t) == sum_t head(s_t))."""
        readout = total if (self.readout_sum or steps == 1) else total / self.timesteps
        head = self.readout_head() if key == MAIN else None
        if head is None:
            return readout
        for observer in self._observers:
            observer.alias(readout, total)
        return head(readout)

    def _run_block(self, h, t0, steps, carries, recompute=False, spikes_in=0, this_pass=None):
        """Timesteps t0 .. t0+steps-1 through the architecture: ({output name: its sum over these steps},
        [each neuron layer's final state]). ``recompute``: spiking conv units keep only their input and
        recompute their convolution in backward. ``spikes_in``: ``h`` holds spikes of these levels (0:
        it does not; checkpoint's replay passes a copy of ``h`` that has lost the mark, and must store what the
        first pass stored).
        ``this_pass``: the forward call's state (whether memory-saving mode is replaying this block now)."""
        if spikes_in:
            h = spike_protocol.mark(h, levels=spikes_in)
        replaying = this_pass is not None and this_pass.replaying
        neurons = self.neuron_layers()
        # Each layer's state, carried in and out through the clock, which is cleared afterwards: memory-saving
        # mode's replay in backward may stop early, and state left behind would keep its graph alive.
        states = {n: c for n, c in zip(neurons, carries) if c is not None}
        self.clock.set(steps, t0, states, recompute, replaying)
        try:
            for observer in self._observers:
                observer.block_input(h)
            outputs = self.forward_steps(h)
            outputs = outputs if isinstance(outputs, dict) else {MAIN: outputs}
            sums = {key: out if steps == 1 else time_sum(out, steps) for key, out in outputs.items()}
            for observer in self._observers:
                for key, out in outputs.items():
                    observer.alias(sums[key], out)
            return sums, [self.clock.states.get(n) for n in neurons]
        finally:
            self.clock.clear()

    # --------------------------------------------------------------------------------------------- queries
    def neuron_layers(self):
        """The neuron layers, in definition order (the order their states are carried in)."""
        return [m for m in self.modules() if isinstance(m, Neuron)]

    def conv_units(self):
        """The conv units (conv -> BN -> neurons or ReLU) in definition order."""
        return [m for m in self.modules() if isinstance(m, ConvUnit)]

    def parts(self):
        """(name, part) of the layers the tools ask about (models/protocol.py), in definition order."""
        return outer_parts(self)

    def picture_layer(self):
        """(name, module) of the layer whose mean activity the run's picture shows; architectures pick one
        whose output lines up with the input pixels (default: the first layer)."""
        return self.parts()[0]

    def _name_neurons(self):
        """Each neuron layer takes the name of the part it belongs to (``body.3``, ``layer1.0.sn1``): one
        naming for spike counts, energy, the run's picture and NIR."""
        for name, part in self.parts():
            inside = [(sub, m) for sub, m in part.named_modules() if isinstance(m, Neuron)]
            for sub, neuron in inside:
                neuron.name = name if len(inside) == 1 else f"{name}.{sub}" if sub else name

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

    def record_spikes(self, on: bool = True):
        for lif in self.neuron_layers():
            lif.recording = on

    def reset_spike_stats(self):
        for lif in self.neuron_layers():
            lif.reset_spike_stats()

    def spike_stats(self):
        return [lif.spike_stats() for lif in self.neuron_layers()]

    @contextlib.contextmanager
    def per_timestep(self):
        """Run one timestep at a time with plain PyTorch ops and the neurons' generic path (autograd through
        time), the way the paper's code runs: the baseline that benchmarks/bench.py measures against."""
        self.clock.per_step = True
        try:
            yield self
        finally:
            self.clock.per_step = False
