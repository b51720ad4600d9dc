"""Spiking neuron models: one class per model, defined by its per-timestep dynamics; a registry by name.

A neuron layer keeps a state (a tuple of tensors, the membrane first) and, at each timestep t of its
input currents ``I[t]``, runs three small methods (docs/neurons.md shows how to add a model)::

    state = charge(state, I[t])                 e.g. u = leak * u + I
    s[t]  = fire(state)                         s = H(u / theta - 1), with a surrogate gradient
    state = reset(state, s[t].detach())         u = u - theta * s  (subtract)  or  u * (1 - |s|)  (zero)

The generic path runs any model this way over ``[S, N, C, H, W]`` through ordinary autograd: the spike
is an autograd function whose backward is the surrogate (``spike_fn``), the reset sees the detached
spike, and nothing else is written by hand. Shipped models (``NEURONS``):

- ``lif``:  u = leak * u + I (leak = ``leak_mem``); the paper's neuron.
- ``if``:   u = u + I (no leak: ``leak_mem`` is ignored).
- ``plif``: u = sigmoid(w) * u + I with one learnable ``w`` per layer (``leak_logit`` in the state
  dict), initialised so that sigmoid(w) = ``leak_mem``.

Every model has a threshold ``theta`` (a buffer: a float, or per channel / per neuron for converted
SNNs), the imbalanced negative threshold ``theta_neg = -theta / alpha`` when built with ``alpha`` (a
-1 spike when ``u / theta_neg - 1 > 0``), and a reset by subtraction or to zero (``reset``).

Accelerators (``models/fused.py``): the torch loops and the Triton kernels run LIF and IF (both
resets) as one fused autograd function per layer; ``neuron_backend`` picks one: ``auto`` (the fastest
that supports the model on its device), ``generic``, ``torch`` or ``triton``. The backend is an
execution choice, not part of the model: the state dict is the same whichever runs it.
"""

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from . import spikes as spike_protocol
from .fused import (  # noqa: F401  (re-exported: the accelerators' API)
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
from .surrogates import Surrogate, get_surrogate

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
class Neuron(nn.Module):
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

    def forward(
        self,
        x: torch.Tensor,
        steps: int,
        norm=None,
        t0: int = 0,
        membranes: Optional[dict] = None,
        conv: Optional[nn.Module] = None,
        replaying: bool = False,
    ):
        """Spikes for time-folded currents ``x`` of timesteps ``t0 .. t0+steps-1``.

        ``norm`` (a TimeBatchNorm) is applied first (fused into an accelerator's backward). ``membranes``
        (a dict keyed by layer) carries the state across blocks of timesteps: with ``t0 > 0`` this layer
        continues from ``membranes[self]``, and its final state is stored there. With ``conv``, ``x`` is
        that convolution's input and backward recomputes the convolution (see ``recomputes_conv``).
        ``replaying``: memory-saving mode replays this block in backward (BN statistics stay as they are).
        """
        state = membranes.get(self) if (membranes is not None and t0 > 0) else None
        backend = self.accelerator(x.device)
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
            )
            u0 = None if state is None else state[0]
            spikes, u, compact = run_layer(x if conv is not None else time_split(x, steps), u0, call, conv)
            state = (u,)
        if membranes is not None:
            membranes[self] = state
        if self.recording and not replaying:  # memory-saving mode's replay: counted in the first pass
            self._record(spikes)
        out = spikes.flatten(0, 1)
        if torch.compiler.is_compiling():  # the spike mark is a python attribute on the tensor
            return out
        return spike_protocol.mark(out, None if compact is None else compact.flatten(0, 1), per_step=spikes)

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


# ------------------------------------------------------------------------------- shipped neurons
@register_neuron
class LIF(Neuron):
    """Leaky integrate-and-fire: u = leak * u + I. Runs on every backend."""

    kind = "lif"

    def charge(self, state, current):
        return (self.leak * state[0] + current,)

    def lif_params(self) -> Optional[LIFParams]:
        # A subclass with dynamics of its own is not what the fused implementations compute.
        if any(getattr(type(self), m) is not getattr(LIF, m) for m in _DYNAMICS):
            return None
        theta, theta_neg = self.thresholds()
        return LIFParams(self.leak, theta, theta_neg, self.surrogate, self.hard_reset, self.compile)

    def params(self) -> Optional[LIFParams]:  # the name of earlier versions
        return self.lif_params()


_DYNAMICS = ("initial_state", "charge", "fire", "reset")


@register_neuron
class IF(LIF):
    """Integrate-and-fire: LIF without leak (u = u + I); ``leak`` is ignored (always 1)."""

    kind = "if"

    def __init__(self, leak: float = 1.0, *args, **kwargs):
        super().__init__(1.0, *args, **kwargs)


@register_neuron
class PLIF(LIF):
    """Parametric LIF (Fang et al. 2021): u = sigmoid(w) * u + I with one learnable ``w`` per layer
    (``leak_logit``), initialised so that sigmoid(w) = ``leak``, which must be in (0, 1) (1 is no leak,
    which a sigmoid does not reach). Runs on the generic path only."""

    kind = "plif"

    def __init__(self, leak: float = 0.99, *args, **kwargs):
        leak = float(leak)
        logit = math.log(leak / (1 - leak)) if 0 < leak < 1 else None
        if logit is None or not 0 < torch.sigmoid(torch.tensor(logit)).item() < 1:
            raise ValueError(
                f"neuron 'plif' learns leak = sigmoid(w) and needs leak_mem in (0, 1) that float32 can "
                f"represent that way, got {leak!r}"
            )
        super().__init__(leak, *args, **kwargs)
        self.leak_logit = nn.Parameter(torch.tensor(logit))

    def charge(self, state, current):
        return (torch.sigmoid(self.leak_logit) * state[0] + current,)

    def extra_repr(self):
        return f"learned leak={torch.sigmoid(self.leak_logit.detach()).item():.4f}, " + super().extra_repr()


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


def lif_sequence(
    currents: torch.Tensor,
    leak: float = 0.99,
    threshold: Threshold = 1.0,
    surrogate: Union[str, Surrogate] = "linear",
    threshold_neg: Optional[Threshold] = None,
    time_dim: int = 0,
    backend: str = "torch",
    reset: str = "subtract",
    **surrogate_params,
) -> torch.Tensor:
    """Spikes of a LIF layer driven by ``currents`` (time along ``time_dim``, default ``[T, ...]``).

    ``threshold`` is a float (layer-wise) or a tensor that broadcasts against one timestep
    (``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise). ``threshold_neg`` (negative) turns on
    the imbalanced threshold; ``reset`` is 'subtract' or 'zero'. The result has the shape of ``currents``,
    values in {0, 1} (or {-1, 0, 1}), and is differentiable through the surrogate when ``currents``
    requires a gradient. ``backend`` 'triton' needs ``[T, N, C, H, W]`` currents (the kernels' layout);
    'generic' runs the LIF model's per-step methods through autograd.
    """
    check_backend(backend)
    if reset not in RESETS:
        raise ValueError(f"unknown reset '{reset}'; choose one of {list(RESETS)}")
    surrogate = get_surrogate(surrogate, **surrogate_params)
    x = currents.movedim(time_dim, 0)
    if backend == "generic":
        neuron = LIF(leak, 1.0, surrogate, reset=reset, backend="generic")
        neuron.thresholds = lambda: (threshold, threshold_neg)
        return neuron.run_generic(x, None)[0].movedim(0, time_dim)
    params = LIFParams(float(leak), threshold, threshold_neg, surrogate, reset == "zero")
    call = _Call(backend_for(backend, x.device), params, None, None, x.shape[0])
    return run_layer(x, None, call)[0].movedim(0, time_dim)
