"""The fused implementations of the neurons they support (accelerators), and the custom ops through which
``torch.compile`` sees them.

A neuron model (``models/neurons/``) is defined by its per-timestep dynamics and runs anywhere through
ordinary autograd (the generic path). For LIF-type neurons (leak, threshold, optional negative threshold,
reset by subtraction or to zero) there are two faster implementations of a whole spiking layer, BNTT
included, with the same small API (see ``models/lif_torch.py``):

- ``torch`` (``models/lif_torch.py``): a loop over timesteps of in-place PyTorch ops; any device.
- ``triton`` (``models/triton/``): fused kernels, one per layer and pass over all timesteps;
  CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests run them).

Both run the recurrence of the LIF neuron and its surrogate-gradient backward themselves:

    dL/du[t] = dL/ds[t] * ds/du[t] + leak * k[t] * dL/du[t+1],      dL/dI[t] = dL/du[t]

with ``ds/du = g(x) / theta`` (``g`` the surrogate, ``x = u / theta - 1``) and ``k[t] = 1`` for reset by
subtraction, ``1 - |s[t]|`` for a hard reset (the reset's own factor, the spike detached). Backward keeps
the input currents and the spikes (in one byte) and replays the membrane to get ``ds/du``.

A spiking layer is one autograd function, ``_SpikingLayer``: BNTT and LIF over the S timesteps of a block,
and optionally the convolution before them, which backward then recomputes instead of storing its output
(memory-saving mode, and the full-resolution units). Under ``torch.compile`` the layer is instead the
custom op ``snnseg::spiking_layer`` (forward) with ``snnseg::spiking_layer_backward`` registered as its
autograd formula: non-tensor settings travel as float/int/bool/str arguments and the backend is chosen
by name, so a compiled training step has no graph break at the neurons.
"""

import functools
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from . import lif_torch
from . import spikes as spike_protocol
from .convolution import conv2d, conv_backward
from .surrogates import SURROGATES, Surrogate, get_surrogate

Threshold = Union[float, torch.Tensor]
ACCELERATORS = ("torch", "triton")
BACKENDS = ("auto", "generic") + ACCELERATORS


@dataclass(frozen=True)
class LIFParams:
    """A LIF layer's parameters: leak, threshold (a float, or a tensor that broadcasts against one
    timestep ``[C, H, W]``: ``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise), the negative
    threshold (None: off), the surrogate derivative and the reset: by subtraction, or to zero when
    ``hard_reset`` (``u * (1 - |s|)``, the spike detached). ``compile``: the torch backend runs its
    per-timestep steps torch.compile'd (a per-model setting; other backends ignore it)."""

    leak: float
    theta: Threshold
    theta_neg: Optional[Threshold]
    surrogate: Surrogate
    hard_reset: bool = False
    compile: bool = False


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
    """models.triton (the kernels), or None where Triton does not import."""
    try:
        from . import triton as kernels
    except ImportError:
        return None
    return kernels


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(accelerator: str, neuron) -> bool:
    """Whether ``accelerator`` ('torch' or 'triton') implements ``neuron``: a LIF-type neuron (it gives
    ``lif_params()``, which a neuron with dynamics of its own does not)."""
    params = neuron.lif_params()
    if params is None:
        return False
    return accelerator in ACCELERATORS


def check_backend(name: str, neuron=None):
    """Fail early (at model build) on a backend that cannot exist here or cannot run ``neuron``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown neuron_backend '{name}'; choose one of {list(BACKENDS)}")
    if name == "triton" and _triton_backend() is None:
        raise ValueError(
            "neuron_backend 'triton' needs the triton package (it ships with PyTorch's CUDA "
            "wheels); use neuron_backend 'torch' or 'auto'"
        )
    if neuron is not None and name in ACCELERATORS and not supports(name, neuron):
        # a LIF neuron is refused for a reset that passes the spike's gradient only
        what = f"'{neuron.kind}'" + ("" if getattr(neuron, "detach_reset", True) else " with detach_reset false")
        raise ValueError(f"neuron_backend '{name}' does not support neuron {what}; use 'generic' or 'auto'")


@functools.lru_cache(maxsize=None)
def _warn_triton_fallback(device_type):
    warnings.warn(
        f"neuron_backend 'triton' runs on CUDA tensors; these are on '{device_type}', so the torch "
        "backend runs them (the results are the same)"
    )


def backend_for(name: str, device: torch.device, neuron=None):
    """The backend module that runs neurons of backend choice ``name`` on ``device`` (None: the generic
    path): the one place where this is decided. ``auto`` takes the fastest that supports ``neuron``
    (Triton on CUDA, else the torch loops, else generic). Triton kernels need CUDA tensors (or the
    interpreter); elsewhere torch runs, so that a model trained on a GPU with ``triton`` evaluates on a
    CPU unchanged."""
    if name == "generic" or (neuron is not None and not supports("torch", neuron)):
        return None
    if name == "torch":
        return lif_torch
    runs_triton = device.type == "cuda" or (name == "triton" and _triton_interpreting())
    backend = _triton_backend() if runs_triton else None
    if backend is not None and neuron is not None and not supports("triton", neuron):
        backend = None  # auto (an explicit 'triton' was refused at build)
    if backend is None:
        if name == "triton" and device.type != "cuda":
            _warn_triton_fallback(device.type)
        return lif_torch
    return backend


def backend_name(module) -> str:
    return "generic" if module is None else "torch" if module is lif_torch else "triton"


def _module_named(name: str):
    return lif_torch if name == "torch" else _triton_backend()


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


def run_layer(x, u0, call: _Call, conv=None):
    """(spikes ``[S, N, ...]``, final membrane, one-byte spikes or None): through ``_SpikingLayer`` when
    a gradient is wanted, else straight through the backend; under torch.compile through the custom op."""
    if torch.compiler.is_compiling():
        if conv is not None:
            x = time_split(conv(x), call.steps)
        return _run_op(x, u0, call)
    weights = [None if call.bn is None else call.bn.weight, None if conv is None else conv.weight]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, u0, *weights))
    if grad:
        conv_bias = None if conv is None else conv.bias
        return _SpikingLayer.apply(x, u0, weights[0], weights[1], conv_bias, call)
    if conv is not None:
        x = time_split(conv(x), call.steps)
    spikes, _, u, _, _ = call.backend.forward(x, u0, call.params, call.bn, False)
    return spikes, u, None


# ------------------------------------------------------------------------------------- custom ops
# The same layer as two torch.library custom ops. Tensors that may be absent are Optional; the threshold
# is always a tensor (a python float would make torch.compile read it back from the device); the
# surrogate is its name and its parameters in the order of its defaults; absent outputs are empty.


def _surrogate_of(name: str, values: List[float]) -> Surrogate:
    return get_surrogate(name, **dict(zip(SURROGATES[name].defaults, values)))


def _op_params(theta, theta_neg, leak, hard_reset, surrogate, surrogate_params) -> LIFParams:
    return LIFParams(float(leak), theta, theta_neg, _surrogate_of(surrogate, surrogate_params), bool(hard_reset))


@torch.library.custom_op("snnseg::spiking_layer", mutates_args=())
def spiking_layer(
    x: torch.Tensor,
    u0: Optional[torch.Tensor],
    theta: torch.Tensor,
    theta_neg: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    leak: float,
    hard_reset: bool,
    surrogate: str,
    surrogate_params: List[float],
    bn_steps: int,
    bn_training: bool,
    bn_momentum: float,
    bn_eps: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BNTT of the first ``bn_steps`` timesteps and LIF on backend 'torch' or 'triton' -> (spikes, one-byte
    spikes, final membrane, BN mean, BN 1/std, updated running mean, updated running var). A functional op:
    the running statistics (``[bn_steps * C]``) are updated on copies, which the caller writes back."""
    params = _op_params(theta, theta_neg, leak, hard_reset, surrogate, surrogate_params)
    bn, new_mean, new_var = None, x.new_empty(0), x.new_empty(0)
    if bn_steps:
        new_mean, new_var = running_mean.clone(), running_var.clone()
        bn = TimeBN(bn_weight, new_mean, new_var, bn_training, bn_momentum, bn_eps, bn_steps)
    spikes, compact, u, mean, invstd = _module_named(backend).forward(x, u0, params, bn, True)
    return spikes, compact, u, mean, invstd, new_mean, new_var


@spiking_layer.register_fake
def _(x, u0, theta, theta_neg, bn_weight, running_mean, running_var, leak, hard_reset, surrogate,
      surrogate_params, bn_steps, bn_training, bn_momentum, bn_eps, backend):  # fmt: skip
    state = torch.promote_types(x.dtype, torch.float32)
    size = bn_steps * x.shape[2] if bn_steps else 0
    return (
        torch.empty_like(x),
        torch.empty_like(x, dtype=spike_protocol.SPIKE_STORAGE),
        x.new_empty(x.shape[1:], dtype=state),
        x.new_empty(size, dtype=state),
        x.new_empty(size, dtype=state),
        torch.empty_like(running_mean) if bn_steps else x.new_empty(0),
        torch.empty_like(running_var) if bn_steps else x.new_empty(0),
    )


@torch.library.custom_op("snnseg::spiking_layer_backward", mutates_args=())
def spiking_layer_backward(
    x: torch.Tensor,
    u0: Optional[torch.Tensor],
    compact: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    grad_spikes: Optional[torch.Tensor],
    grad_u_end: Optional[torch.Tensor],
    theta: torch.Tensor,
    theta_neg: Optional[torch.Tensor],
    leak: float,
    hard_reset: bool,
    surrogate: str,
    surrogate_params: List[float],
    bn_steps: int,
    bn_training: bool,
    bn_eps: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/du0, dL/dweight) of ``spiking_layer``; the last two empty when absent."""
    params = _op_params(theta, theta_neg, leak, hard_reset, surrogate, surrogate_params)
    bn = None
    if bn_steps:
        empty = mean.new_empty(0)
        bn = TimeBN(bn_weight, empty, empty, bn_training, 0.0, bn_eps, bn_steps)
    grad_x, grad_u0, grad_weight = _module_named(backend).backward(
        x, u0, compact, mean, invstd, bn_weight, grad_spikes, grad_u_end, params, bn
    )
    return (
        grad_x,
        x.new_empty(0) if grad_u0 is None else grad_u0,
        x.new_empty(0) if grad_weight is None else grad_weight,
    )


@spiking_layer_backward.register_fake
def _(x, u0, compact, mean, invstd, bn_weight, grad_spikes, grad_u_end, theta, theta_neg, leak, hard_reset,
      surrogate, surrogate_params, bn_steps, bn_training, bn_eps, backend):  # fmt: skip
    return (
        torch.empty_like(x),
        x.new_empty(0) if u0 is None else torch.empty_like(u0),
        x.new_empty(0) if bn_weight is None else torch.empty_like(bn_weight),
    )


def _setup_context(ctx, inputs, output):
    (x, u0, theta, theta_neg, bn_weight, _, _, leak, hard, surrogate, values, n_bn, training, _, eps, backend) = inputs
    _, compact, _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, u0, compact, mean, invstd, bn_weight, theta, theta_neg)
    ctx.settings = (leak, hard, surrogate, values, n_bn, training, eps, backend)


def _backward(ctx, grad_spikes, _compact, grad_u_end, *_statistics):
    x, u0, compact, mean, invstd, bn_weight, theta, theta_neg = ctx.saved_tensors
    leak, hard, surrogate, values, n_bn, training, eps, backend = ctx.settings
    grad_x, grad_u0, grad_weight = spiking_layer_backward(
        x, u0, compact, mean, invstd, bn_weight, grad_spikes, grad_u_end, theta, theta_neg,
        leak, hard, surrogate, values, n_bn, training, eps, backend,
    )  # fmt: skip
    return (
        grad_x,
        None if u0 is None else grad_u0,
        None,
        None,
        None if bn_weight is None else grad_weight,
        *([None] * 11),
    )


spiking_layer.register_autograd(_backward, setup_context=_setup_context)


def _as_tensor(theta, like):
    return theta if isinstance(theta, torch.Tensor) else torch.tensor(theta, dtype=like.dtype, device=like.device)


def _run_op(x, u0, call: _Call):
    """The layer through the custom op (what torch.compile traces)."""
    params = call.params
    surrogate = params.surrogate
    if surrogate.name not in SURROGATES:
        raise ValueError(f"torch.compile of the fused neurons needs a registered surrogate, got {surrogate!r}")
    bn = call.bn
    spikes, compact, u, _, _, new_mean, new_var = spiking_layer(
        x,
        u0,
        _as_tensor(params.theta, x),
        None if params.theta_neg is None else _as_tensor(params.theta_neg, x),
        None if bn is None else bn.weight,
        None if bn is None else bn.running_mean,
        None if bn is None else bn.running_var,
        float(params.leak),
        bool(params.hard_reset),
        surrogate.name,
        [float(v) for v in surrogate.params.values()],
        0 if bn is None else bn.steps,
        False if bn is None else bn.training,
        0.0 if bn is None else float(bn.momentum),
        0.0 if bn is None else float(bn.eps),
        backend_name(call.backend),
    )
    if bn is not None and bn.training and bn.momentum != 0:
        with torch.no_grad():
            bn.running_mean.copy_(new_mean)
            bn.running_var.copy_(new_var)
    return spikes, u, compact


# ------------------------------------------------------------------------------------- time layout
def time_split(x, steps):
    """``[S*N, C, H, W]`` (time-major) -> ``[S, N, C, H, W]``: a view, timestep t is ``[t]``."""
    return x.view(steps, x.shape[0] // steps, *x.shape[1:])
