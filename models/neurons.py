"""The leaky integrate-and-fire neuron: the one definition of the spiking dynamics, and where its
execution backend is chosen.

For one neuron layer over timesteps t = 0..T-1 (``u`` starts at 0)::

    u[t] = leak * u[t-1] + I[t]              charge (I is the layer's input current)
    s[t] = H(u[t] / theta - 1)               fire
    u[t] = u[t] - theta * s[t]               reset by subtraction

With an imbalanced (negative) threshold ``theta_neg < 0`` (SNNs converted from leaky-ReLU ANNs) the neuron
also fires a -1 spike when ``u[t] / theta_neg - 1 > 0`` and is reset by ``theta_neg``.

Surrogate-gradient training: the reset is built from a comparison and carries no gradient, so the only
paths back through time are the leak and the spikes. The backward pass is therefore a reverse linear
recurrence that we run ourselves instead of recording T small graphs:

    dL/du[t] = dL/ds[t] * ds/du[t] + leak * dL/du[t+1],      dL/dI[t] = dL/du[t]

with ``ds/du = g(x) / theta`` (``g`` the surrogate, ``x = u / theta - 1``). Backward keeps the input
currents and the spikes (in one byte) and replays the membrane to get ``ds/du``.

Execution. A spiking layer is one autograd function, ``_SpikingLayer``: BNTT (the per-timestep BN in
front of the neurons, ``TimeBN``) and LIF over all S timesteps of a block, and optionally the
convolution before them, which backward then recomputes instead of storing its output (memory-saving
mode, and the full-resolution units). A spiking layer therefore stores 5 bytes per neuron and timestep
for backward (BN input and spikes), or 1 (the spikes) when it recomputes its convolution.
The arithmetic is done by a backend with one small API (see ``models/lif_torch.py``):

- ``torch`` (``models/lif_torch.py``): a loop over timesteps of in-place PyTorch ops; any device.
- ``triton`` (``models/lif_triton.py``): fused kernels, one per layer and pass over all timesteps;
  CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests run them).

``neuron_backend: auto`` takes triton on CUDA when Triton imports, torch otherwise. The backend is an
execution choice, not part of the model: the state dict is the same whichever runs it.
"""

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from . import lif_torch
from . import spikes as spike_protocol
from .convolution import conv2d, conv_backward
from .lif_torch import compile_neuron_kernels  # noqa: F401  (the torch backend's optional fusion)
from .surrogates import Surrogate, get_surrogate

Threshold = Union[float, torch.Tensor]
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class LIFParams:
    """A neuron layer's parameters: leak, threshold (a float, or a tensor that broadcasts against one
    timestep ``[C, H, W]``: ``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise), the negative
    threshold (None: off) and the surrogate derivative."""

    leak: float
    theta: Threshold
    theta_neg: Optional[Threshold]
    surrogate: Surrogate


@dataclass(frozen=True)
class TimeBN:
    """BNTT of the first ``steps`` timesteps of a block: per-(timestep, channel) statistics and scale.
    ``weight`` and the running statistics are the ``steps * C`` entries of those timesteps (views that
    training-mode BN updates in place); ``momentum`` 0 leaves them as they are."""

    weight: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    training: bool
    momentum: float
    eps: float
    steps: int


# ------------------------------------------------------------------------------------------ backends
@functools.lru_cache(maxsize=None)
def _triton_backend():
    """models.lif_triton, or None where Triton does not import."""
    try:
        from . import lif_triton
    except ImportError:
        return None
    return lif_triton


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str):
    """Fail early (at model build) on a backend that cannot exist here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown neuron_backend '{name}'; choose one of {list(BACKENDS)}")
    if name == "triton" and _triton_backend() is None:
        raise ValueError(
            "neuron_backend 'triton' needs the triton package (it ships with PyTorch's CUDA "
            "wheels); use neuron_backend 'torch' or 'auto'"
        )


@functools.lru_cache(maxsize=None)
def _warn_triton_fallback(device_type):
    warnings.warn(
        f"neuron_backend 'triton' runs on CUDA tensors; these are on '{device_type}', so the torch "
        "backend runs them (the results are the same)"
    )


def backend_for(name: str, device: torch.device):
    """The backend module that runs neurons of backend choice ``name`` on ``device``: the one place where
    this is decided. Triton kernels need CUDA tensors (or the interpreter); elsewhere torch runs, so that
    a model trained on a GPU with ``triton`` evaluates on a CPU unchanged."""
    if name == "torch":
        return lif_torch
    runs_triton = device.type == "cuda" or (name == "triton" and _triton_interpreting())
    backend = _triton_backend() if runs_triton else None
    if backend is None:
        if name == "triton" and device.type != "cuda":
            _warn_triton_fallback(device.type)
        return lif_torch
    return backend


def backend_name(module) -> str:
    return "triton" if module is not lif_torch else "torch"


# ------------------------------------------------------------------------------ the autograd function
@dataclass(frozen=True)
class _Call:
    """Everything a spiking layer's forward and backward need besides its tensors."""

    backend: object
    params: LIFParams
    bn: Optional[TimeBN]
    conv: Optional[tuple]  # (stride, padding, dilation) of a convolution to recompute in backward
    steps: int
    dense: str = "auto"  # the convolution's dilated_as_dense setting (models/convolution.py)


class _SpikingLayer(torch.autograd.Function):
    """[conv ->] BNTT -> LIF over a block of timesteps, with the surrogate gradient.

    ``x`` is ``[S, N, C, H, W]`` currents, or with ``call.conv`` the convolution's time-folded input
    ``[S*N, C_in, H, W]`` (kept for backward in one byte when it holds spikes). Returns the spikes, the
    final membrane (through which a later block of timesteps sends its gradient back) and the spikes'
    one-byte copy, which the next layer then shares for its own backward.
    """

    @staticmethod
    def forward(ctx, x, u0, bn_weight, conv_weight, conv_bias, call: _Call):
        ctx.set_materialize_grads(False)
        kept, ctx.input_dtype = x, None
        if call.conv is not None:
            kept, ctx.input_dtype = spike_protocol.storable(x)
            x = time_split(conv2d(x, conv_weight, conv_bias, *call.conv, dense=call.dense), call.steps)
        spikes, compact, u, mean, invstd = call.backend.forward(x, u0, call.params, call.bn, True)
        ctx.save_for_backward(kept, u0, bn_weight, conv_weight, conv_bias, mean, invstd, compact)
        ctx.mark_non_differentiable(compact)
        ctx.call = call
        return spikes, u, compact

    @staticmethod
    def backward(ctx, grad_spikes, grad_u_end, _):
        kept, u0, bn_weight, conv_weight, conv_bias, mean, invstd, compact = ctx.saved_tensors
        call = ctx.call
        x = inputs = spike_protocol.restored(kept, ctx.input_dtype)
        if call.conv is not None:
            with torch.no_grad():
                x = time_split(conv2d(inputs, conv_weight, conv_bias, *call.conv, dense=call.dense), call.steps)
        grad_x, grad_u0, grad_bn_weight = call.backend.backward(
            x, u0, compact, mean, invstd, bn_weight, grad_spikes, grad_u_end, call.params, call.bn
        )
        if call.conv is None:
            return grad_x, grad_u0, grad_bn_weight, None, None, None
        del x
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], conv_bias is not None and ctx.needs_input_grad[4]]
        grad_inputs, grad_conv_weight, grad_conv_bias = conv_backward(
            grad_x.flatten(0, 1), inputs, conv_weight, conv_bias, *call.conv, 1, wanted
        )
        return grad_inputs, grad_u0, grad_bn_weight, grad_conv_weight, grad_conv_bias, None


def _run(x, u0, call: _Call, conv: Optional[nn.Conv2d]):
    """(spikes ``[S, N, ...]``, final membrane, one-byte spikes or None): through ``_SpikingLayer`` when
    a gradient is wanted, else straight through the backend."""
    weights = [None if call.bn is None else call.bn.weight, None if conv is None else conv.weight]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, u0, *weights))
    if grad:
        conv_bias = None if conv is None else conv.bias
        return _SpikingLayer.apply(x, u0, weights[0], weights[1], conv_bias, call)
    if conv is not None:
        x = time_split(conv(x), call.steps)
    spikes, _, u, _, _ = call.backend.forward(x, u0, call.params, call.bn, False)
    return spikes, u, None


# ------------------------------------------------------------------------------------- time layout
def time_split(x, steps):
    """``[S*N, C, H, W]`` (time-major) -> ``[S, N, C, H, W]``: a view, timestep t is ``[t]``."""
    return x.view(steps, x.shape[0] // steps, *x.shape[1:])


def time_sum(x, steps):
    """Sum over the timesteps of a time-folded tensor, ``[N, C, H, W]``.

    A neuron layer's output is summed as the ``[S, N, ...]`` spikes it came from: backward then hands
    the neurons the sum's gradient broadcast over time (no memory), where summing the time-folded
    view would make autograd write out all S copies of it (4 bytes per neuron and step).
    """
    spike_info = spike_protocol.info(x)
    per_step = None if spike_info is None else spike_info.per_step
    if per_step is None or per_step.shape[0] != steps:
        per_step = time_split(x, steps)
    return per_step.sum(0)


# ----------------------------------------------------------------------------------------- public API
def lif_sequence(
    currents: torch.Tensor,
    leak: float = 0.99,
    threshold: Threshold = 1.0,
    surrogate: Union[str, Surrogate] = "linear",
    threshold_neg: Optional[Threshold] = None,
    time_dim: int = 0,
    backend: str = "torch",
    **surrogate_params,
) -> torch.Tensor:
    """Spikes of a LIF layer driven by ``currents`` (time along ``time_dim``, default ``[T, ...]``).

    ``threshold`` is a float (layer-wise) or a tensor that broadcasts against one timestep
    (``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise). ``threshold_neg`` (negative) turns on
    the imbalanced threshold. The result has the shape of ``currents``, values in {0, 1} (or {-1, 0, 1}),
    and is differentiable through the surrogate when ``currents`` requires a gradient.
    ``backend`` 'triton' needs ``[T, N, C, H, W]`` currents (the kernels' layout).
    """
    check_backend(backend)
    params = LIFParams(float(leak), threshold, threshold_neg, get_surrogate(surrogate, **surrogate_params))
    x = currents.movedim(time_dim, 0)
    call = _Call(backend_for(backend, x.device), params, None, None, x.shape[0])
    return _run(x, None, call, None)[0].movedim(0, time_dim)


class LIF(nn.Module):
    """A layer of LIF neurons for time-folded tensors ``[T*N, C, H, W]`` (time-major: t, then n).

    ``threshold`` is a buffer so that converted SNNs keep their (layer, channel or neuron-wise)
    thresholds in the ordinary state dict; it may have any shape that broadcasts against ``[C, H, W]``.
    ``alpha`` (the leaky-ReLU slope of the ANN it came from) turns on ``theta_neg = -theta / alpha``.
    ``backend`` (not state: an execution choice) is one of ``BACKENDS``.
    """

    def __init__(
        self,
        leak: float = 0.99,
        threshold: float = 1.0,
        surrogate: str = "linear",
        surrogate_params: Optional[dict] = None,
        alpha: Optional[float] = None,
        name: str = "",
        backend: str = "auto",
    ):
        super().__init__()
        check_backend(backend)
        self.leak = float(leak)
        self.surrogate = get_surrogate(surrogate, **(surrogate_params or {}))
        self.alpha = alpha
        self.name = name
        self.backend = backend
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._scalar_threshold = (None, None, None)
        self.recording = False
        self.reset_spike_stats()

    def recomputes_conv(self, x: torch.Tensor, norm, wanted: bool) -> bool:
        """Whether this layer should take its convolution's input and recompute the convolution in
        backward (``wanted``: the unit asks for it). Only when a backward may follow (otherwise the neurons'
        input is the currents, as calibration hooks expect), with BN in front, and not under autocast,
        whose casts backward would not replay."""
        return wanted and norm is not None and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)

    def forward(
        self,
        x: torch.Tensor,
        steps: int,
        norm=None,
        t0: int = 0,
        membranes: Optional[dict] = None,
        conv: Optional[nn.Conv2d] = None,
    ):
        """Spikes for time-folded currents ``x`` of timesteps ``t0 .. t0+steps-1``.

        ``norm`` (a TimeBatchNorm) is applied first, fused into the backward pass. ``membranes`` (a dict
        keyed by layer) carries the membrane across blocks of timesteps: with ``t0 > 0`` this layer
        continues from ``membranes[self]``, and its final membrane is stored there. With ``conv``, ``x``
        is that convolution's input and backward recomputes the convolution (see ``recomputes_conv``).
        """
        u0 = membranes.get(self) if (membranes is not None and t0 > 0) else None
        bn = None if norm is None else norm.time_bn(t0, steps)
        call = _Call(
            backend_for(self.backend, x.device),
            self.params(),
            bn,
            None if conv is None else (conv.stride, conv.padding, conv.dilation),
            steps,
            getattr(conv, "dense", "auto"),
        )
        spikes, u, compact = _run(x if conv is not None else time_split(x, steps), u0, call, conv)
        if membranes is not None:
            membranes[self] = u
        if self.recording:
            self._record(spikes)
        return spike_protocol.mark(
            spikes.flatten(0, 1), None if compact is None else compact.flatten(0, 1), per_step=spikes
        )

    def params(self) -> LIFParams:
        theta = self._threshold_value()
        theta_neg = None if self.alpha is None else -theta / self.alpha
        return LIFParams(self.leak, theta, theta_neg, self.surrogate)

    def _threshold_value(self) -> Threshold:
        """The threshold; a python float when it is one number. The float is cached until the buffer
        changes (another tensor, or written in place), so that a CUDA model does not wait for the GPU to
        read it at every call."""
        theta = self.threshold
        if theta.numel() != 1:
            return theta
        cached, version, value = self._scalar_threshold
        if cached is not theta or version != theta._version:
            value = float(theta)
            self._scalar_threshold = (theta, theta._version, value)
        return value

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

    def set_threshold(self, threshold: Threshold):
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32, device=self.threshold.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Thresholds of converted SNNs are per channel or per neuron: take the stored shape.
        key = prefix + "threshold"
        if key in state_dict:
            self.threshold = torch.empty_like(state_dict[key], device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        shape = tuple(self.threshold.shape) or float(self.threshold)
        return (
            f"leak={self.leak}, threshold={shape}, surrogate={self.surrogate}, alpha={self.alpha}, "
            f"backend={self.backend}"
        )
