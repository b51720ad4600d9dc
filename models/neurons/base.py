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
    """Class decorator: make a Neuron subclass buildable by its ``kind`` (config key ``neuron``)."""
    if not cls.kind or cls.kind in NEURONS:
        raise ValueError(f"neuron class {cls.__name__} needs a new, non-empty 'kind', got {cls.kind!r}")
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


# ---------------------------------------------------------------------------------- the base class
class Neuron(protocol.Part, Timed):
    """A layer of spiking neurons for time-folded tensors ``[T*N, C, H, W]`` (time-major: t, then n).

    Subclasses set ``kind`` and define ``charge`` (and, if they differ from the threshold neuron's,
    ``initial_state``, ``fire``, ``reset``). The base class owns what every model shares: the threshold
    buffer (any shape that broadcasts against ``[C, H, W]``, kept in the state dict), the negative
    threshold (``alpha``), the surrogate, the reset, spike counting and the backend choice.
    """

    kind = ""

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
    ):
        super().__init__()
        if reset not in RESETS:
            raise ValueError(f"unknown reset '{reset}'; choose one of {list(RESETS)}")
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
        raise NotImplementedError

    def fire(self, state: tuple) -> torch.Tensor:
        """s = H(u / theta - 1) (minus H(u / theta_neg - 1) with the negative threshold)."""
        u = state[0]
        theta, theta_neg = self.thresholds()
        spike = spike_fn(u / theta - 1, self.surrogate)
        if theta_neg is not None:
            spike = spike - spike_fn(u / theta_neg - 1, self.surrogate)
        return spike

    def reset(self, state: tuple, spike: torch.Tensor) -> tuple:
        """``spike`` is detached. Subtract: u - theta * s (theta_neg for a -1 spike); zero: u * (1 - |s|)."""
        u = state[0]
        if self.hard_reset:
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
            state = self.reset(state, spike.detach())
            out.append(spike.to(x.dtype))
        return torch.stack(out), tuple(state)

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
        return spike_protocol.mark(out, None if compact is None else compact.flatten(0, 1), per_step=spikes)

    # ---- the layer protocol (models/protocol.py) ----
    def emits(self) -> protocol.Activity:
        """What this neuron model outputs: binary spikes, signed ones with the negative threshold."""
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
            raise protocol.NotSupported(
                f"neuron '{self.kind or type(self).__name__}' has no NIR node", "neuron: lif, if or plif"
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
        self.spike_count += spikes.detach().abs().sum(dtype=torch.float64)  # exact for bf16 spikes too
        self.images += spikes.shape[1]
        self.steps = spikes.shape[0]
        self.neurons = spikes[0, 0].numel()

    def reset_spike_stats(self):
        self.spike_count = torch.zeros((), dtype=torch.float64)
        self.images, self.steps, self.neurons = 0, 0, 0

    def spike_stats(self) -> dict:
        return {
            "name": self.name,
            "neurons": self.neurons,
            "spikes": float(self.spike_count),
            "images": self.images,
            "steps": self.steps,
        }

    def extra_repr(self):
        shape = tuple(self.threshold.shape) or float(self.threshold)
        return (
            f"leak={self.leak}, threshold={shape}, surrogate={self.surrogate}, alpha={self.alpha}, "
            f"reset={'zero' if self.hard_reset else 'subtract'}, backend={self.backend}"
        )


def build_neuron(kind: str, **kwargs) -> Neuron:
    """A neuron layer of model ``kind`` (``NEURONS``)."""
    return get_neuron(kind)(**kwargs)


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
