"""The neuron model's base class, the spike with its surrogate gradient, and the registry by name.

A neuron model is one class (one file in this package, registered with ``@register_neuron``): docs/neurons.md.
"""

from typing import Optional, Union

import torch
import torch.nn as nn

from .. import protocol
from .. import spikes as spike_protocol
from ..clock import Timed
from ..fused import (  # noqa: F401  (re-exported: the accelerators' API)
    ACCELERATORS,
    BACKENDS,
    LIFParams,
    Threshold,
    TimeBN,
    _Call,
    _SpikingLayer,
    _triton_backend,
    _warn_triton_fallback,
    backend_for,
    backend_name,
    check_backend,
    run_layer,
    supports,
    time_split,
)
from ..surrogates import Surrogate, get_surrogate

RESETS = ("subtract", "zero")
NEURONS = {}


def register_neuron(cls):
    """Class decorator: make a Neuron subclass buildable by its ``kind`` (config key ``neuron``).

    Checked here, when the class is defined, not when a run first steps: a new, non-empty ``kind``, and a
    ``charge`` of its own (the one method the base class cannot supply)."""
    if not cls.kind or cls.kind in NEURONS:
        raise ValueError(f"neuron class {cls.__name__} needs a new, non-empty 'kind', got {cls.kind!r}")
    if getattr(cls, "charge", None) is Neuron.charge:
        raise ValueError(
            f"neuron class {cls.__name__} ('{cls.kind}') defines no charge(state, current): every neuron model "
            "needs one (docs/neurons.md, 'Adding a neuron in one file')"
        )
    NEURONS[cls.kind] = cls
    return cls


def get_neuron(kind: str):
    if kind not in NEURONS:
        raise ValueError(f"unknown neuron '{kind}'; choose one of {sorted(NEURONS)}")
    return NEURONS[kind]


# ------------------------------------------------------------------------------------ the spike
class _Spike(torch.autograd.Function):
    """H(x) forward, ``surrogate.grad(x)`` backward."""

    @staticmethod
    def forward(ctx, x, surrogate):
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.grad(x), None


def spike_fn(x: torch.Tensor, surrogate: Surrogate) -> torch.Tensor:
    """The Heaviside step ``H(x)`` (1 where x > 0) with the surrogate derivative ``g(x)`` in backward."""
    return _Spike.apply(x, surrogate)


class _Levels(torch.autograd.Function):
    """round(clamp(x, 0, D)) forward; backward the straight-through rectangle: 1 where 0 <= x <= D."""

    @staticmethod
    def forward(ctx, x, levels):
        ctx.save_for_backward(x)
        ctx.levels = levels
        return torch.round(torch.clamp(x, 0, levels))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0) & (x <= ctx.levels)).to(grad.dtype), None


def level_fn(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer spikes ``round(clamp(x, 0, levels))`` (0, 1, ..., levels) with the straight-through gradient of
    the multi-level papers (I-LIF, SpikeYOLO; SpikingJelly's ``MultiLevelSpikeCount``): 1 where ``0 <= x <=
    levels``, else 0."""
    return _Levels.apply(x, int(levels))


# ---------------------------------------------------------------------------------- the base class
class Neuron(protocol.Part, Timed):
    """A layer of spiking neurons for time-folded tensors ``[T*N, C, H, W]`` (time-major: t, then n).

    Subclasses set ``kind`` and define ``charge`` (and, if they differ from the threshold neuron's,
    ``initial_state``, ``fire``, ``reset``). The base class owns what every model shares: the threshold
    buffer (any shape that broadcasts against ``[C, H, W]``, kept in the state dict), the negative
    threshold (``alpha``), the surrogate, the reset, whether the reset sees the spike's gradient
    (``detach_reset``), spike counting and the backend choice.

    What a class declares about itself (docs/neurons.md, "The spike contract"): ``emits()`` (binary,
    signed, integer levels up to D, or analog: storage, counting, energy, the zero reset, conversion and NIR
    follow it), ``ignores`` (model keys it does not read: a run that gives one is refused, naming it),
    ``options`` (model keys passed to ``__init__`` under their own name, e.g. ``spike_levels``) and
    ``converts`` (ANN-to-SNN conversion may build it).
    """

    kind = ""
    ignores: dict = {}  # {model key: why this neuron does not read it}
    options: tuple = ()  # model keys given to __init__ as keyword arguments of the same name
    converts = False  # conversion may build it: the rate of its spikes approximates a ReLU's output

    def __init__(
        self,
        leak: float = 0.99,
        threshold: float = 1.0,
        surrogate: Union[str, Surrogate] = "linear",
        surrogate_params: Optional[dict] = None,
        alpha: Optional[float] = None,
        reset: str = "subtract",
        name: str = "",
        backend: str = "auto",
        detach_reset: bool = True,
    ):
        if type(self).charge is Neuron.charge:
            raise ValueError(
                f"neuron class {type(self).__name__} defines no charge(state, current): every neuron model needs "
                "one (docs/neurons.md, 'Adding a neuron in one file')"
            )
        super().__init__()
        if reset not in RESETS:
            raise ValueError(f"unknown reset '{reset}'; choose one of {list(RESETS)}")
        self.detach_reset = bool(detach_reset)
        self._contract_checked = False  # the first generic forward checks emits() against the values
        self.leak = float(leak)
        self.surrogate = get_surrogate(surrogate, **(surrogate_params or {}))
        self.alpha = alpha
        self.hard_reset = reset == "zero"
        self.name = name
        self.compile = False  # the torch backend's per-model torch.compile of its steps
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._scalar_threshold = (None, None, None)
        self.recording = False
        self.reset_spike_stats()
        self.set_backend(backend)

    # ---- the dynamics: one timestep. ``state`` is a tuple of tensors, the membrane first. ----
    def initial_state(self, current: torch.Tensor) -> tuple:
        """The state before the first timestep; ``current`` is one timestep's input. The membrane is at
        least float32, so that bf16 autocast does not also round its integration."""
        return (torch.zeros_like(current, dtype=torch.promote_types(current.dtype, torch.float32)),)

    def charge(self, state: tuple, current: torch.Tensor) -> tuple:
        """The state after the input current of one timestep (before firing). Every model defines it."""
        raise NotImplementedError(f"neuron class {type(self).__name__} defines no charge(state, current)")

    def fire(self, state: tuple) -> torch.Tensor:
        """s = H(u / theta - 1) (minus H(u / theta_neg - 1) with the negative threshold)."""
        u = state[0]
        theta, theta_neg = self.thresholds()
        spike = spike_fn(u / theta - 1, self.surrogate)
        if theta_neg is not None:
            spike = spike - spike_fn(u / theta_neg - 1, self.surrogate)
        return spike

    def reset(self, state: tuple, spike: torch.Tensor) -> tuple:
        """``spike`` is detached unless ``detach_reset`` is false. Subtract: u - theta * s (theta_neg for a
        -1 spike; s * theta for a spike of level s); zero: u * (1 - |s|), and with levels above 1 (as
        ``emits()`` declares) u * (1 - min(|s|, 1)): zero after any spike."""
        u = state[0]
        if self.hard_reset:
            if self.emits().levels > 1:
                return (u * (1 - spike.abs().clamp(max=1)), *state[1:])
            return (u * (1 - spike.abs()), *state[1:])
        theta, theta_neg = self.thresholds()
        if theta_neg is None:
            return (u - theta * spike, *state[1:])
        return (u - theta * spike.clamp(min=0) - theta_neg * spike.clamp(max=0).neg(), *state[1:])

    # ---- the generic path ----
    def run_generic(self, x: torch.Tensor, state: Optional[tuple]):
        """Spikes ``[S, N, ...]`` (x's dtype) of currents ``x`` ``[S, N, ...]`` and the final state."""
        state = self.initial_state(x[0]) if state is None else state
        out = []
        for t in range(x.shape[0]):
            state = self.charge(state, x[t])
            spike = self.fire(state)
            state = self.reset(state, spike.detach() if self.detach_reset else spike)
            out.append(spike.to(x.dtype))
        return torch.stack(out), tuple(state)

    def check_contract(self, spikes: torch.Tensor):
        """A ValueError naming the layer unless ``spikes`` holds what ``emits()`` declares: integers within
        the declared levels (non-negative unless signed). Run on a layer's first generic forward, so that a
        neuron emitting, say, ``s / D`` while declaring spikes is refused before its output is stored in
        one byte for backward (which would make the next convolution's weight gradient wrong)."""
        activity = self.emits()
        found = activity.violation(spikes) if activity.is_spikes else None
        if found is not None:
            raise ValueError(
                f"neuron '{self.kind or type(self).__name__}'{f' (layer {self.name})' if self.name else ''} emits "
                f"{found!r} but "
                f"declares {activity.describe()} (Neuron.emits): declare protocol.spikes(levels=D) for integer "
                "levels, protocol.analog() for other values"
            )

    # ---- the accelerated path ----
    def lif_params(self) -> Optional[LIFParams]:
        """The layer as LIF parameters for the fused implementations, or None (generic path only)."""
        return None

    def accelerator(self, device: torch.device):
        """The backend module that runs this layer on ``device``, or None: the generic path."""
        return backend_for(self.backend, device, self)

    def set_backend(self, name: str):
        """Run on backend ``name`` (``BACKENDS``); a ValueError if it does not support this neuron."""
        check_backend(name, self)
        self.backend = name

    # ---- forward ----
    def recomputes_conv(self, x: torch.Tensor, norm, wanted: bool) -> bool:
        """Whether this layer should take its convolution's input and recompute the convolution in
        backward (``wanted``: the unit asks for it). Only on an accelerator, when a backward may follow
        (otherwise the neurons' input is the currents, as calibration hooks expect), with BN in front, and
        not under autocast, whose casts backward would not replay, nor under torch.compile."""
        return (
            wanted
            and norm is not None
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
            and self.accelerator(x.device) is not None
        )

    def forward(self, x: torch.Tensor, steps: Optional[int] = None, norm=None, conv: Optional[nn.Module] = None):
        """Spikes for the time-folded currents ``x`` of the block of timesteps that the network's clock
        says (``steps``: the number of timesteps, for a layer used on its own).

        ``norm`` (a TimeBatchNorm) is applied first (fused into an accelerator's backward). The state is
        carried across blocks of timesteps in the clock: with ``t0 > 0`` this layer continues from
        ``clock.states[self]``, and its final state is stored there. With ``conv``, ``x`` is that
        convolution's input and backward recomputes the convolution (see ``recomputes_conv``).
        """
        clock = self.clock_for(steps)
        steps, t0, replaying = clock.steps, clock.t0, clock.replaying
        state = clock.states.get(self) if t0 > 0 else None
        backend = None if clock.per_step else self.accelerator(x.device)
        if backend is None:
            if conv is not None:
                x = conv(x)
            if norm is not None:
                x = norm(x, steps, t0, replaying)
            spikes, state = self.run_generic(time_split(x, steps), state)
            compact = None
            if not self._contract_checked and not torch.compiler.is_compiling():
                self.check_contract(spikes)
                self._contract_checked = True
        else:
            bn = None if norm is None else norm.time_bn(t0, steps, replaying)
            call = _Call(
                backend,
                self.lif_params(),
                bn,
                None if conv is None else (conv.stride, conv.padding, conv.dilation),
                steps,
                getattr(conv, "dense", "auto"),
            )
            u0 = None if state is None else state[0]
            spikes, u, compact = run_layer(x if conv is not None else time_split(x, steps), u0, call, conv)
            state = (u,)
        clock.states[self] = state
        if self.recording and not replaying:  # memory-saving mode's replay: counted in the first pass
            self._record(spikes)
        out = spikes.flatten(0, 1)
        if torch.compiler.is_compiling():  # the spike mark is a python attribute on the tensor
            return out
        activity = self.emits()
        if not activity.is_spikes:  # analog values: kept as they are for backward, never in one byte
            return out
        compact = None if compact is None else compact.flatten(0, 1)
        return spike_protocol.mark(out, compact, per_step=spikes, levels=activity.levels)

    # ---- the layer protocol (models/protocol.py) ----
    def emits(self) -> protocol.Activity:
        """What this neuron model outputs: binary spikes, signed ones with the negative threshold. A model
        with integer levels 0..D returns ``protocol.spikes(levels=D, sources=(self,))``; one whose outputs
        are not integers (e.g. normalised levels s / D) returns ``protocol.analog(sources=(self,))``."""
        return protocol.spikes(1, signed=self.alpha is not None, sources=(self,))

    def activity(self, inputs):
        return self.emits()

    def conversion_problem(self):
        return None

    def nir_leak(self):
        """The leak per step if this model is NIR's LIF (leak < 1) or IF (leak 1); None: no NIR node."""
        return None

    def nir_neuron(self) -> protocol.NirNeuron:
        leak = self.nir_leak()
        if leak is None:
            exportable = sorted(kind for kind, cls in NEURONS.items() if cls.nir_leak is not Neuron.nir_leak)
            raise protocol.NotSupported(
                f"neuron '{self.kind or type(self).__name__}' has no NIR node", f"neuron: {', '.join(exportable)}"
            )
        activity = self.emits()
        if not activity.is_spikes or activity.levels > 1:
            raise protocol.NotSupported(
                f"neuron '{self.kind}' emits {activity.describe()}; NIR's neurons emit binary spikes"
            )
        return protocol.NirNeuron(leak, self.thresholds()[0])

    def nir_problems(self):
        problems = []
        if not self.hard_reset:
            problems.append(
                protocol.NirProblem(
                    "reset by subtraction has no NIR form (NIR resets to v_reset)",
                    "reset: zero",
                    "reset to zero instead of by subtraction",
                )
            )
        if self.thresholds()[1] is not None:
            problems.append(
                protocol.NirProblem(
                    "the negative threshold (leaky-ReLU conversion) has no NIR form",
                    "leaky: false",
                    "negative spikes dropped",
                )
            )
        return problems

    # ---- thresholds ----
    def thresholds(self):
        """(theta, theta_neg): floats when the threshold is one number (tensors under torch.compile)."""
        theta = self._threshold_value()
        return theta, (None if self.alpha is None else -theta / self.alpha)

    def _threshold_value(self) -> Threshold:
        """The threshold; a python float when it is one number. The float is cached until the buffer
        changes (another tensor, or written in place), so that a CUDA model does not wait for the GPU to
        read it at every call."""
        theta = self.threshold
        if theta.numel() != 1 or torch.compiler.is_compiling():
            return theta
        cached, version, value = self._scalar_threshold
        if cached is not theta or version != theta._version:
            value = float(theta)
            self._scalar_threshold = (theta, theta._version, value)
        return value

    def set_threshold(self, threshold: Threshold):
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32, device=self.threshold.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Thresholds of converted SNNs are per channel or per neuron: take the stored shape.
        key = prefix + "threshold"
        if key in state_dict:
            self.threshold = torch.empty_like(state_dict[key], device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- spike counting ----
    def _record(self, spikes):
        """Events: a spike of level k counts k (as energy counts its synaptic operations); with levels above
        1 also the neuron-steps that fire at all (for binary spikes the two are the same number)."""
        self.spike_count += spikes.detach().abs().sum(dtype=torch.float64)  # exact for bf16 spikes too
        if self.emits().levels > 1:
            self.firing_count += (spikes.detach() != 0).sum(dtype=torch.float64)
        self.images += spikes.shape[1]
        self.steps = spikes.shape[0]
        self.neurons = spikes[0, 0].numel()

    def reset_spike_stats(self):
        self.spike_count = torch.zeros((), dtype=torch.float64)
        self.firing_count = torch.zeros((), dtype=torch.float64)
        self.images, self.steps, self.neurons = 0, 0, 0

    def spike_stats(self) -> dict:
        """``spikes``: events (levels summed); ``firing``: neuron-steps with a non-zero output; ``levels``:
        the declared largest level (0 for a neuron that emits analog values)."""
        levels = self.emits().levels
        return {
            "name": self.name,
            "neurons": self.neurons,
            "spikes": float(self.spike_count),
            "firing": float(self.firing_count if levels > 1 else self.spike_count),
            "levels": levels,
            "images": self.images,
            "steps": self.steps,
        }

    def describe(self) -> dict:
        """What ``converter.py inspect`` shows of the layer: {reset, leak, threshold} as text."""
        theta, theta_neg = self.thresholds()
        threshold = _summary(self.threshold) + ("" if theta_neg is None else f", negative -threshold / {self.alpha}")
        return {"reset": "zero" if self.hard_reset else "subtract", "leak": f"{self.leak:g}", "threshold": threshold}

    def extra_repr(self):
        shape = tuple(self.threshold.shape) or float(self.threshold)
        return (
            f"leak={self.leak}, threshold={shape}, surrogate={self.surrogate}, alpha={self.alpha}, "
            f"reset={'zero' if self.hard_reset else 'subtract'}, backend={self.backend}"
        )


def _summary(tensor) -> str:
    """A number, or a tensor's shape and range, as text."""
    tensor = tensor.detach()
    if tensor.numel() == 1:
        return f"{float(tensor):.4g}"
    return f"{tuple(tensor.shape)} in [{float(tensor.min()):.4g}, {float(tensor.max()):.4g}]"


def build_neuron(kind: str, **kwargs) -> Neuron:
    """A neuron layer of model ``kind`` (``NEURONS``)."""
    return get_neuron(kind)(**kwargs)


def neuron_arguments(cfg: dict, name: str = "") -> dict:
    """The keyword arguments of the neuron class ``cfg['neuron']`` for a model config ``cfg``: the keys every
    neuron takes, and the model keys the class asks for by name (``options``)."""
    cls = get_neuron(cfg.get("neuron", "lif"))
    arguments = dict(
        leak=cfg["leak_mem"],
        threshold=cfg["def_threshold"],
        surrogate=cfg["surrogate"],
        surrogate_params=cfg.get("surrogate_params"),
        alpha=float(cfg["alpha"]) if cfg.get("leaky") else None,
        reset=cfg.get("reset", "subtract"),
        name=name,
        backend=cfg.get("neuron_backend", "auto"),
        detach_reset=cfg.get("detach_reset", True),
    )
    for key in cls.options:
        arguments[key] = cfg[key]
    return arguments


def ignored_key_problem(cfg: dict, given, defaults: dict) -> Optional[str]:
    """One line naming a model key that neuron ``cfg['neuron']`` does not read (its class's ``ignores``)
    and that was given: typed as a flag (``given`` holds '--key' sources), or set elsewhere to a value
    other than its default (a paper config spells the defaults out); None if there is none."""
    kind = cfg.get("neuron", "lif")
    for key, why in get_neuron(kind).ignores.items():
        where = given.get(key) if isinstance(given, dict) else (key if key in given else None)
        if where is None:
            continue
        if where != f"--{key}" and cfg.get(key) == defaults.get(key):
            continue
        shown = f"--{key}" if where == f"--{key}" else f"{key} (set in {where})"
        return f"{shown} means nothing to neuron '{kind}': {why}; leave it out"
    return None


def conversion_neurons() -> list:
    """The registered neurons that ANN-to-SNN conversion may build (their class declares ``converts``)."""
    return sorted(kind for kind, cls in NEURONS.items() if cls.converts)


def state_dict_neuron_errors(kind: str, state_dict: dict) -> Optional[str]:
    """None if ``state_dict``'s neuron parameters fit a model of neurons ``kind``; else a sentence
    naming a state-dict key that belongs to another neuron model, or one that ``kind`` needs."""
    own = set(_neuron_keys(kind))
    for other in NEURONS:
        for name in set(_neuron_keys(other)) - own:
            found = next((k for k in state_dict if k.endswith(f".act.{name}")), None)
            if found is not None:
                return f"its weights hold {found!r} of neuron '{other}'; the model has neuron '{kind}'"
    for name in own:
        if not any(k.endswith(f".act.{name}") for k in state_dict):
            return f"its weights lack '{name}' of neuron '{kind}' (made with another neuron)"
    return None


def _neuron_keys(kind: str) -> list:
    """The state-dict entries a neuron model adds to the threshold (its learnable parameters)."""
    try:
        probe = get_neuron(kind)(name="probe", backend="generic")
    except (TypeError, ValueError):  # a model that needs arguments of its own: nothing to compare
        return []
    return [name for name, _ in probe.named_parameters()]


# ----------------------------------------------------------------------------------------- public API
def time_sum(x, steps):
    """Sum over the timesteps of a time-folded tensor, ``[N, C, H, W]``.

    A neuron layer's output is summed as the ``[S, N, ...]`` spikes it came from: backward then hands
    the neurons the sum's gradient broadcast over time (no memory), where summing the time-folded
    view would make autograd write out all S copies of it (4 bytes per neuron and step).
    """
    if torch.compiler.is_compiling():
        return time_split(x, steps).sum(0)
    spike_info = spike_protocol.info(x)
    per_step = None if spike_info is None else spike_info.per_step
    if per_step is None or per_step.shape[0] != steps:
        per_step = time_split(x, steps)
    return per_step.sum(0)
