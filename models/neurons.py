"""The leaky integrate-and-fire neuron: the one implementation of the spiking dynamics.

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

with ``ds/du = g(x) / theta`` (``g`` the surrogate, ``x = u / theta - 1``). Instead of autograd's T
per-step graphs, backward keeps the input currents and the spikes (in one byte) and replays the
membrane to get ``ds/du``. In the networks the per-timestep BN in front of the neurons is fused in too
(``_NormLIFFunction``), so a spiking layer stores 5 bytes per neuron and timestep for backward; in
memory-saving mode the convolution before them is fused in as well (``_ConvNormLIFFunction``) and
recomputed, leaving 1 byte (the spikes that are its next layer's input).
"""
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convolution import conv_backward
from .storage import SPIKE_STORAGE, restored, storable
from .surrogates import Surrogate, get_surrogate

Threshold = Union[float, torch.Tensor]


def _as_scalar(theta):
    """A one-element threshold as a python float (cheaper ops, and no device sync inside the loops)."""
    if isinstance(theta, torch.Tensor) and theta.numel() == 1:
        return float(theta)
    return theta


def _sub_scaled(u, spikes, theta):
    """u -= spikes * theta, in place."""
    if isinstance(theta, float):
        u.sub_(spikes, alpha=theta)
    else:
        u.addcmul_(spikes, theta, value=-1.0)


# ---- One timestep of each pass, in place on preallocated buffers (no allocation in the loops). ----
# ``u / theta > 1`` is the paper's ``u / theta - 1 > 0`` exactly (subtracting 1 near 1 is exact).

def _fire_step(u, current, spike, ratio, leak, theta, theta_neg):
    """Charge u with the current, write the spike, reset by subtraction."""
    u.mul_(leak).add_(current)
    torch.gt(torch.div(u, theta, out=ratio), 1.0, out=spike)
    _sub_scaled(u, spike, theta)
    if theta_neg is not None:  # exclusive with a positive spike: u was above theta > 0
        negative = torch.gt(torch.div(u, theta_neg, out=ratio), 1.0, out=ratio)
        _sub_scaled(u, negative, theta_neg)
        spike.sub_(negative)


def _slope_step(u, current, spike, extra, leak, theta, theta_neg, surrogate):
    """Charge u, overwrite ``current`` with ds/du, reset with the recorded spike."""
    u.mul_(leak).add_(current)
    slope = surrogate.grad_(torch.div(u, theta, out=current).sub_(1.0)).div_(theta)
    if theta_neg is None:
        _sub_scaled(u, spike, theta)
    else:
        slope.sub_(surrogate.grad_(torch.div(u, theta_neg, out=extra).sub_(1.0)).div_(theta_neg))
        _sub_scaled(u, spike.clamp(min=0), theta)
        _sub_scaled(u, spike.clamp(max=0).neg_(), theta_neg)


def _reverse_step(slope, grad_spike, grad_next, alpha):
    """Overwrite ``slope`` with dL/dI[t] = dL/ds[t] * ds/du[t] + alpha * grad_next.

    (``alpha * grad_next`` is leak * dL/dI[t+1], or at a block's last step the carried-in dL/du.)
    """
    slope.mul_(grad_spike)
    if grad_next is not None:
        slope.add_(grad_next, alpha=alpha)


class _Kernels:
    """The step functions in use: eager by default, torch.compile'd after ``compile_neuron_kernels()``."""
    fire, slope, reverse = _fire_step, _slope_step, _reverse_step


def compile_neuron_kernels(on: bool = True):
    """Fuse each step's elementwise ops with torch.compile (compiling costs seconds per new shape).
    Spikes are identical to the eager kernels'; gradients agree to float rounding."""
    if on:
        _Kernels.fire, _Kernels.slope, _Kernels.reverse = (
            torch.compile(f, dynamic=True) for f in (_fire_step, _slope_step, _reverse_step))
    else:
        _Kernels.fire, _Kernels.slope, _Kernels.reverse = _fire_step, _slope_step, _reverse_step


def _membrane(currents, time_dim, u0):
    """The membrane to integrate into: the carried-over one, or zeros. At least float32, so that
    bf16 autocast (convolutions in bf16) does not also round the integration of the membrane."""
    if u0 is not None:
        return u0.detach().clone()
    dtype = torch.promote_types(currents.dtype, torch.float32)
    return torch.zeros_like(currents.select(time_dim, 0), dtype=dtype)


def _lif_scan(currents: torch.Tensor, leak: float, theta: Threshold, theta_neg: Optional[Threshold],
              time_dim: int, inplace: bool = False, u0: Optional[torch.Tensor] = None):
    """Run the recurrence over ``time_dim``; return the spikes and the final membrane (no graph).

    ``u0`` is the membrane carried over from earlier timesteps (None: a fresh start, u = 0).
    With ``inplace`` the spikes overwrite the currents (each step's current is consumed first).
    """
    theta, theta_neg = _as_scalar(theta), _as_scalar(theta_neg)
    spikes = currents if inplace else torch.empty_like(currents)
    # With u[0-] = 0, u[0] = leak * 0 + I[0] = I[0] exactly.
    u = _membrane(currents, time_dim, u0)
    ratio = torch.empty_like(u)
    for t in range(currents.shape[time_dim]):
        _Kernels.fire(u, currents.select(time_dim, t), spikes.select(time_dim, t), ratio, leak, theta, theta_neg)
    return spikes, u


def _slopes_inplace(currents, spikes, leak, theta, theta_neg, surrogate: Surrogate, time_dim, u0=None):
    """Overwrite ``currents`` with ``ds/du`` at every step, replaying the membrane in backward.

    The resets replay the saved spikes, so the membrane trajectory is the forward one even if the
    recomputed currents differ in the last bit; the surrogate is continuous, so such differences
    only move the slopes by as much. Working in place keeps backward's memory to one extra buffer.
    """
    theta, theta_neg = _as_scalar(theta), _as_scalar(theta_neg)
    u = _membrane(currents, time_dim, u0)
    extra = None if theta_neg is None else torch.empty_like(u)
    for t in range(currents.shape[time_dim]):
        _Kernels.slope(u, currents.select(time_dim, t), spikes.select(time_dim, t), extra, leak, theta, theta_neg,
                       surrogate)
    return currents


def _reverse_scan_inplace(grad_spikes, slopes, leak, time_dim, grad_u_end=None):
    """Overwrite ``slopes`` with dL/dI: the reverse linear recurrence through the leak.

    ``grad_u_end`` is dL/du after the last step (from later timesteps computed elsewhere). Returns
    dL/dI[0]; the membrane carried in, if any, gets ``leak`` times that.
    """
    grad_u, alpha = grad_u_end, 1.0
    for t in reversed(range(slopes.shape[time_dim])):
        grad_t = slopes.select(time_dim, t)
        _Kernels.reverse(grad_t, grad_spikes.select(time_dim, t), grad_u, alpha)
        grad_u, alpha = grad_t, leak
    return grad_u


def _carried_grad(u0, grad_first, leak):
    """dL/du0 = leak * dL/dI[0] for a membrane carried in from earlier timesteps; None without one."""
    return None if u0 is None else grad_first * leak


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


class _LIFFunction(torch.autograd.Function):
    """LIF over time with the surrogate gradient; saves the currents and the spikes (1 byte).

    Returns the spikes, the final membrane (through which later timesteps, a later block of timesteps
    in memory-saving mode, send their gradient back) and the spikes' one-byte copy (see ``mark_spikes``).
    """

    @staticmethod
    def forward(ctx, currents, u0, leak, theta, theta_neg, surrogate, time_dim):
        ctx.set_materialize_grads(False)
        spikes, u = _lif_scan(currents, leak, theta, theta_neg, time_dim, u0=u0)
        compact = spikes.to(SPIKE_STORAGE)
        ctx.save_for_backward(currents, compact, u0)
        ctx.mark_non_differentiable(compact)
        ctx.args = leak, theta, theta_neg, surrogate, time_dim
        return spikes, u, compact

    @staticmethod
    def backward(ctx, grad_spikes, grad_u_end, _):
        currents, spikes, u0 = ctx.saved_tensors
        leak, theta, theta_neg, surrogate, time_dim = ctx.args
        grads = _slopes_inplace(currents.clone(), spikes, leak, theta, theta_neg, surrogate, time_dim, u0)
        grad_first = _reverse_scan_inplace(_grad_or_zeros(grad_spikes, grads), grads, leak, time_dim, grad_u_end)
        return grads, _carried_grad(u0, grad_first, leak), None, None, None, None, None


class _NormLIFFunction(torch.autograd.Function):
    """Per-timestep BN (BNTT) followed by LIF, fused so that backward needs only the BN's input.

    Saving the BN input (4 bytes) and the spikes (1 byte) replaces saving the BN input, the BN output
    and the surrogate slopes (12 bytes): BN and the membrane are recomputed in backward.
    ``x`` is ``[S, N, C, H, W]``; BN applies to its first ``n_bn`` steps (full propagation's tail passes
    unnormalised), with statistics per (timestep, channel): ``weight`` and the running statistics are
    the ``n_bn * C`` entries of those timesteps. Returns the spikes, the final membrane and the spikes'
    one-byte copy.
    """

    @staticmethod
    def forward(ctx, x, u0, weight, running_mean, running_var, training, momentum, eps, n_bn,
                leak, theta, theta_neg, surrogate):
        ctx.set_materialize_grads(False)
        spikes, u, mean, invstd = _norm_lif_forward(
            x, u0, weight, running_mean, running_var, training, momentum, eps, n_bn, leak, theta, theta_neg)
        compact = spikes.to(SPIKE_STORAGE)
        ctx.save_for_backward(x, u0, weight, mean, invstd, compact)
        ctx.mark_non_differentiable(compact)
        ctx.args = training, eps, n_bn, leak, theta, theta_neg, surrogate
        return spikes, u, compact

    @staticmethod
    def backward(ctx, grad_spikes, grad_u_end, _):
        x, *saved = ctx.saved_tensors
        grad_x, grad_u0, grad_weight = _norm_lif_backward(x, *saved, grad_spikes, grad_u_end, *ctx.args)
        return (grad_x, grad_u0, grad_weight,
                None, None, None, None, None, None, None, None, None, None)


class _ConvNormLIFFunction(torch.autograd.Function):
    """Convolution + BNTT + LIF that keeps only the convolution's input (spikes: one byte) and
    recomputes the convolution in backward: memory-saving mode's trade of one more convolution per
    layer for not storing its output (4 bytes per neuron and timestep). ``conv`` is
    (stride, padding, dilation); the other arguments are ``_NormLIFFunction``'s.
    """

    @staticmethod
    def forward(ctx, inputs, conv_weight, conv_bias, conv, steps, u0, weight, running_mean, running_var,
                training, momentum, eps, n_bn, leak, theta, theta_neg, surrogate):
        ctx.set_materialize_grads(False)
        x = time_split(F.conv2d(inputs, conv_weight, conv_bias, *conv), steps)
        spikes, u, mean, invstd = _norm_lif_forward(
            x, u0, weight, running_mean, running_var, training, momentum, eps, n_bn, leak, theta, theta_neg)
        del x
        compact = spikes.to(SPIKE_STORAGE)
        stored_inputs, ctx.input_dtype = storable(inputs)
        ctx.save_for_backward(stored_inputs, conv_weight, conv_bias, u0, weight, mean, invstd, compact)
        ctx.mark_non_differentiable(compact)
        ctx.conv, ctx.steps = conv, steps
        ctx.args = training, eps, n_bn, leak, theta, theta_neg, surrogate
        return spikes, u, compact

    @staticmethod
    def backward(ctx, grad_spikes, grad_u_end, _):
        stored_inputs, conv_weight, conv_bias, *saved = ctx.saved_tensors
        inputs = restored(stored_inputs, ctx.input_dtype)
        with torch.no_grad():
            x = time_split(F.conv2d(inputs, conv_weight, conv_bias, *ctx.conv), ctx.steps)
        grad_x, grad_u0, grad_weight = _norm_lif_backward(x, *saved, grad_spikes, grad_u_end, *ctx.args)
        del x
        grad_inputs, grad_conv_weight, grad_conv_bias = conv_backward(
            grad_x.flatten(0, 1), inputs, conv_weight, conv_bias, *ctx.conv, 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], conv_bias is not None and ctx.needs_input_grad[2]])
        return (grad_inputs, grad_conv_weight, grad_conv_bias, None, None, grad_u0, grad_weight,
                None, None, None, None, None, None, None, None, None, None)


def time_split(x, steps):
    """``[S*N, C, H, W]`` (time-major) -> ``[S, N, C, H, W]``: a view, timestep t is ``[t]``."""
    return x.view(steps, x.shape[0] // steps, *x.shape[1:])


def time_sum(x, steps):
    """Sum over the timesteps of a time-folded tensor, ``[N, C, H, W]``.

    A neuron layer's output is summed as the ``[S, N, ...]`` spikes it came from: backward then hands
    the neurons the sum's gradient broadcast over time (no memory), where summing the time-folded
    view would make autograd write out all S copies of it (4 bytes per neuron and step).
    """
    per_step = getattr(x, 'per_step', None)
    if per_step is None or per_step.shape[0] != steps:
        per_step = time_split(x, steps)
    return per_step.sum(0)


def _norm_lif_forward(x, u0, weight, running_mean, running_var, training, momentum, eps, n_bn,
                      leak, theta, theta_neg):
    """BN of the first ``n_bn`` steps of ``x`` ``[S, N, C, H, W]``, then LIF: the spikes, the final
    membrane and the BN statistics used.

    Timestep by timestep: each step's BN output goes to one reused timestep-sized buffer that the
    neurons consume at once, and each step is one contiguous block (time-major), which BN's
    channels-last kernel wants. (Reusing buffers in the loops, here and in backward, instead of
    allocating a block per step keeps the C heap from fragmenting: see utils/allocator.py.)
    """
    steps, c = x.shape[0], x.shape[2]
    theta, theta_neg = _as_scalar(theta), _as_scalar(theta_neg)
    spikes = torch.empty_like(x)
    u = _membrane(x, 0, u0)
    ratio, normed = torch.empty_like(u), torch.empty_like(x[0])
    mean, invstd = _bn_statistics(x, n_bn * c, training)
    for t in range(steps):
        current = x[t]
        if t < n_bn:
            k = slice(t * c, (t + 1) * c)
            torch.ops.aten.native_batch_norm.out(
                current, weight[k], None, running_mean[k], running_var[k], training, momentum, eps,
                out=normed, save_mean=mean[k], save_invstd=invstd[k])
            current = normed
        _Kernels.fire(u, current, spikes[t], ratio, leak, theta, theta_neg)
    if not training:  # eval-mode BN normalises with the running statistics
        mean, invstd = running_mean.clone(), (running_var + eps).rsqrt()
    return spikes, u, mean, invstd


def _bn_statistics(x, size, training):
    """Buffers for the per-(timestep, channel) mean and 1/std that training-mode BN writes (at least
    float32, as BN computes them; eval-mode BN writes none, and gets empty ones)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    size = size if training else 0
    return x.new_empty(size, dtype=dtype), x.new_empty(size, dtype=dtype)


def _norm_lif_backward(x, u0, weight, mean, invstd, spikes, grad_spikes, grad_u_end,
                       training, eps, n_bn, leak, theta, theta_neg, surrogate):
    """dL/dx, dL/du0 and dL/dweight of ``_norm_lif_forward``, replaying BN and the membrane."""
    c = x.shape[2]
    # One full-size buffer carries currents -> slopes -> dL/dcurrents -> dL/dx; everything else is
    # one timestep in size, which keeps backward's peak memory near the saved tensors'.
    buffer = torch.empty_like(x)
    # BN replayed: x * scale - mean * scale, in x's dtype (under bf16 autocast a float32 factor that
    # varies along the channels-last inner dimension costs 25-50x more than a bf16 one).
    scale = (invstd * weight).view(n_bn, 1, c, 1, 1)
    torch.mul(x[:n_bn], scale.to(x.dtype), out=buffer[:n_bn])
    buffer[:n_bn].sub_((mean.view(n_bn, 1, c, 1, 1) * scale).to(x.dtype))
    buffer[n_bn:] = x[n_bn:]  # full propagation's unnormalised tail
    _slopes_inplace(buffer, spikes, leak, theta, theta_neg, surrogate, 0, u0)
    grad_first = _reverse_scan_inplace(_grad_or_zeros(grad_spikes, buffer), buffer, leak, 0, grad_u_end)
    grad_u0 = _carried_grad(u0, grad_first, leak)  # before the BN backward overwrites the buffer
    grad_weight = torch.empty_like(weight)
    var = invstd.pow(-2) - eps  # read instead of running_var when train=False
    grad_x, grad_shift = torch.empty_like(x[0]), torch.empty_like(weight[:c])  # reused; the shift's is unused
    for t in range(n_bn):
        k = slice(t * c, (t + 1) * c)
        torch.ops.aten.native_batch_norm_backward.out(
            buffer[t], x[t], weight[k], mean[k], var[k], mean[k], invstd[k], training, eps, [True, True, True],
            out0=grad_x, out1=grad_weight[k], out2=grad_shift)
        buffer[t].copy_(grad_x)
    return buffer, grad_u0, grad_weight


def mark_spikes(tensor: torch.Tensor, compact: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tag a tensor whose values are all in {-1, 0, 1}, so that ``compact_spikes`` may store it in a byte.

    ``compact``, its one-byte copy if one exists already (the neurons keep one for their own backward),
    is then what the next layer saves too: one copy of the spikes in memory, not two.
    """
    tensor.holds_spikes = True
    tensor.compact = compact
    return tensor


def _pack(tensor):
    stored, dtype = storable(tensor)
    return stored if dtype is None else (stored, dtype)


def _unpack(packed):
    return restored(*packed) if isinstance(packed, tuple) else packed


def compact_spikes():
    """Context in which autograd stores tagged spike tensors (e.g. a conv's input) in one byte."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def lif_sequence(currents: torch.Tensor, leak: float = 0.99, threshold: Threshold = 1.0,
                 surrogate: Union[str, Surrogate] = 'linear', threshold_neg: Optional[Threshold] = None,
                 time_dim: int = 0, **surrogate_params) -> torch.Tensor:
    """Spikes of a LIF layer driven by ``currents`` (time along ``time_dim``, default ``[T, ...]``).

    ``threshold`` is a float (layer-wise) or a tensor that broadcasts against one timestep
    (``[C, 1, 1]`` channel-wise, ``[C, H, W]`` neuron-wise). ``threshold_neg`` (negative) turns on
    the imbalanced threshold. The result has the shape of ``currents``, values in {0, 1} (or {-1, 0, 1}),
    and is differentiable through the surrogate when ``currents`` requires a gradient.
    """
    surrogate = get_surrogate(surrogate, **surrogate_params)
    if torch.is_grad_enabled() and currents.requires_grad:
        return _LIFFunction.apply(currents, None, float(leak), threshold, threshold_neg, surrogate, time_dim)[0]
    return _lif_scan(currents.detach(), float(leak), threshold, threshold_neg, time_dim)[0]


class LIF(nn.Module):
    """A layer of LIF neurons for time-folded tensors ``[T*N, C, H, W]`` (time-major: t, then n).

    ``threshold`` is a buffer so that converted SNNs keep their (layer, channel or neuron-wise)
    thresholds in the ordinary state dict; it may have any shape that broadcasts against ``[C, H, W]``.
    ``alpha`` (the leaky-ReLU slope of the ANN it came from) turns on ``theta_neg = -theta / alpha``.
    """

    def __init__(self, leak: float = 0.99, threshold: float = 1.0, surrogate: str = 'linear',
                 surrogate_params: Optional[dict] = None, alpha: Optional[float] = None, name: str = ''):
        super().__init__()
        self.leak = float(leak)
        self.surrogate = get_surrogate(surrogate, **(surrogate_params or {}))
        self.alpha = alpha
        self.name = name
        self.register_buffer('threshold', torch.tensor(float(threshold)))
        self.recording = False
        self.reset_spike_stats()

    def forward(self, x: torch.Tensor, steps: int, norm=None, t0: int = 0, membranes: Optional[dict] = None,
                conv: Optional[nn.Conv2d] = None):
        """Spikes for time-folded currents ``x`` of timesteps ``t0 .. t0+steps-1``.

        ``norm`` (a TimeBatchNorm) is applied first, fused into the backward pass. ``membranes`` (a dict
        keyed by layer) carries the membrane across blocks of timesteps: with ``t0 > 0`` this layer
        continues from ``membranes[self]``, and its final membrane is stored there. With ``conv``, ``x``
        is that convolution's input, and training recomputes the convolution in backward instead of
        storing its output (memory-saving mode; not under autocast, which backward would not replay).
        """
        u0 = membranes.get(self) if (membranes is not None and t0 > 0) else None
        n_bn = 0 if norm is None else norm.steps_normalised(t0, steps)
        grad = torch.is_grad_enabled() and (x.requires_grad or (u0 is not None and u0.requires_grad) or
                                            (conv is not None and conv.weight.requires_grad))
        recompute = conv is not None and grad and n_bn and not torch.is_autocast_enabled(x.device.type)
        if conv is not None and not recompute:
            x = conv(x)
        theta_neg = None if self.alpha is None else -self.threshold / self.alpha
        currents = time_split(x, steps)
        neuron = (self.leak, self.threshold, theta_neg, self.surrogate)
        if recompute:
            spikes, u, compact = _ConvNormLIFFunction.apply(
                x, conv.weight, conv.bias, (conv.stride, conv.padding, conv.dilation), steps, u0,
                *norm.batch_norm_args(t0, n_bn), *neuron)
        elif grad and n_bn:
            spikes, u, compact = _NormLIFFunction.apply(currents, u0, *norm.batch_norm_args(t0, n_bn), *neuron)
        elif grad:
            spikes, u, compact = _LIFFunction.apply(currents, u0, *neuron, 0)
        elif n_bn:  # inference
            spikes, u, _, _ = _norm_lif_forward(currents, u0, *norm.batch_norm_args(t0, n_bn), *neuron[:3])
            compact = None
        else:
            spikes, u = _lif_scan(currents, self.leak, self.threshold, theta_neg, 0, u0=u0)
            compact = None
        if membranes is not None:
            membranes[self] = u
        if self.recording:
            self._record(spikes)
        out = mark_spikes(spikes.flatten(0, 1), None if compact is None else compact.flatten(0, 1))
        out.per_step = spikes  # for time_sum
        return out

    def _record(self, spikes):
        self.spike_count += spikes.detach().abs().sum().double()
        self.images += spikes.shape[1]
        self.steps = spikes.shape[0]
        self.neurons = spikes[0, 0].numel()

    def reset_spike_stats(self):
        self.spike_count = torch.zeros((), dtype=torch.float64)
        self.images, self.steps, self.neurons = 0, 0, 0

    def spike_stats(self) -> dict:
        return {'name': self.name, 'neurons': self.neurons, 'spikes': float(self.spike_count),
                'images': self.images, 'steps': self.steps}

    def set_threshold(self, threshold: Threshold):
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32,
                                         device=self.threshold.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Thresholds of converted SNNs are per channel or per neuron: take the stored shape.
        key = prefix + 'threshold'
        if key in state_dict:
            self.threshold = torch.empty_like(state_dict[key], device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        shape = tuple(self.threshold.shape) or float(self.threshold)
        return f'leak={self.leak}, threshold={shape}, surrogate={self.surrogate}, alpha={self.alpha}'
