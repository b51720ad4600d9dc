"""The neurons' torch backend: BNTT + LIF over S timesteps as a loop of in-place PyTorch ops.

Runs on every device; it is the CPU's backend (and CUDA's when Triton is missing). Each timestep is a
few elementwise ops on preallocated buffers (no allocation in the loops) and one ``native_batch_norm``
per normalised timestep. ``models/triton/`` has the same API with fused CUDA kernels.

API (shared by both backends; ``models/neurons/base.py`` chooses one):

``forward(x, u0, params, bn, keep_spikes) -> (spikes, compact, u, mean, invstd)``
    ``x`` ``[S, ...]`` (``[S, N, C, H, W]`` whenever ``bn`` is given) are the input currents, ``u0`` the
    membrane carried in (None: a fresh start). ``params`` is a ``fused.LIFParams`` (leak, thresholds,
    surrogate, ``hard_reset``), ``bn`` a ``fused.TimeBN`` or None. Returns the spikes (x's dtype), their
    one-byte copy (None unless ``keep_spikes``), the final membrane (at least float32) and the
    per-(timestep, channel) mean and 1/std that BN used (empty without BN).
``backward(x, u0, compact, mean, invstd, weight, grad_spikes, grad_u_end, params, bn)
        -> (grad_x, grad_u0, grad_weight)``
    ``grad_spikes`` / ``grad_u_end`` may be None (zero); ``grad_u0`` is None without ``u0`` and
    ``grad_weight`` None without ``bn``.
"""

import functools

import torch

from .spikes import SPIKE_STORAGE


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


def _keep_factor(spike, out):
    """``out`` = 1 - |spike|: what a hard reset keeps of the membrane (and of its gradient)."""
    return out.copy_(spike).abs_().neg_().add_(1.0)


# ---- One timestep of each pass, in place on preallocated buffers. ----
# ``u / theta > 1`` is the paper's ``u / theta - 1 > 0`` exactly (subtracting 1 near 1 is exact).


def _fire_step(u, current, spike, ratio, leak, theta, theta_neg, hard):
    """Charge u with the current, write the spike, reset (by subtraction, or to zero when ``hard``)."""
    u.mul_(leak).add_(current)
    torch.gt(torch.div(u, theta, out=ratio), 1.0, out=spike)
    if hard:  # u * (1 - |s|); a negative spike needs u < theta_neg < 0, exclusive with a positive one
        if theta_neg is not None:
            spike.sub_(torch.gt(torch.div(u, theta_neg, out=ratio), 1.0, out=ratio))
        u.mul_(_keep_factor(spike, ratio))
        return
    _sub_scaled(u, spike, theta)
    if theta_neg is not None:  # exclusive with a positive spike: u was above theta > 0
        negative = torch.gt(torch.div(u, theta_neg, out=ratio), 1.0, out=ratio)
        _sub_scaled(u, negative, theta_neg)
        spike.sub_(negative)


def _slope_step(u, current, spike, extra, leak, theta, theta_neg, surrogate, hard):
    """Charge u, overwrite ``current`` with ds/du, reset with the recorded spike."""
    u.mul_(leak).add_(current)
    slope = surrogate.grad_(torch.div(u, theta, out=current).sub_(1.0)).div_(theta)
    if theta_neg is not None:
        slope.sub_(surrogate.grad_(torch.div(u, theta_neg, out=extra).sub_(1.0)).div_(theta_neg))
    if hard:
        u.mul_(_keep_factor(spike, extra))
    elif theta_neg is None:
        _sub_scaled(u, spike, theta)
    else:
        _sub_scaled(u, spike.clamp(min=0), theta)
        _sub_scaled(u, spike.clamp(max=0).neg_(), theta_neg)


def _reverse_step(slope, grad_spike, grad_next, alpha, keep):
    """Overwrite ``slope`` with dL/du[t] = dL/ds[t] * ds/du[t] + alpha * keep * grad_next.

    (``alpha * grad_next`` is leak * dL/du[t+1], or at a block's last step the carried-in dL/du;
    ``keep`` is 1 - |s[t]| for a hard reset, None for reset by subtraction.)
    """
    slope.mul_(grad_spike)
    if grad_next is None:
        return
    if keep is None:
        slope.add_(grad_next, alpha=alpha)
    else:
        slope.addcmul_(grad_next, keep, value=alpha)


_EAGER_STEPS = (_fire_step, _slope_step, _reverse_step)


def _steps(compiled: bool):
    """(fire, slope, reverse): eager, or torch.compile'd for a model built with ``compile`` on (a per-model
    setting carried by ``LIFParams.compile``; compiling costs seconds per new shape)."""
    return _compiled_steps() if compiled else _EAGER_STEPS


@functools.lru_cache(maxsize=None)
def _compiled_steps():
    return tuple(torch.compile(f, dynamic=True) for f in _EAGER_STEPS)


def _membrane(x, u0):
    """The membrane to integrate into: the carried-over one, or zeros. At least float32, so that
    bf16 autocast (convolutions in bf16) does not also round the integration of the membrane."""
    if u0 is not None:
        return u0.detach().clone()
    return torch.zeros_like(x[0], dtype=torch.promote_types(x.dtype, torch.float32))


def _bn_statistics(x, size, training):
    """Buffers for the per-(timestep, channel) mean and 1/std that training-mode BN writes (at least
    float32, as BN computes them; eval-mode BN writes none, and gets empty ones)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    size = size if training else 0
    return x.new_empty(size, dtype=dtype), x.new_empty(size, dtype=dtype)


def forward(x, u0, params, bn, keep_spikes):
    """BN of the first ``bn.steps`` steps of ``x``, then LIF (see the module docstring).

    Timestep by timestep: each step's BN output goes to one reused timestep-sized buffer that the
    neurons consume at once, and each step is one contiguous block (time-major), which BN's
    channels-last kernel wants. (Reusing buffers in the loops, here and in backward, instead of
    allocating a block per step keeps the C heap from fragmenting: see utils/allocator.py.)
    """
    n_bn = 0 if bn is None else bn.steps
    theta, theta_neg = _as_scalar(params.theta), _as_scalar(params.theta_neg)
    spikes = torch.empty_like(x)
    u = _membrane(x, u0)
    ratio = torch.empty_like(u)
    normed = torch.empty_like(x[0]) if n_bn else None
    c = x.shape[2] if n_bn else 0
    mean, invstd = _bn_statistics(x, n_bn * c, bn is not None and bn.training)
    fire = _steps(getattr(params, "compile", False))[0]
    hard = getattr(params, "hard_reset", False)
    for t in range(x.shape[0]):
        current = x[t]
        if t < n_bn:
            k = slice(t * c, (t + 1) * c)
            torch.ops.aten.native_batch_norm.out(
                current,
                bn.weight[k],
                None,
                bn.running_mean[k],
                bn.running_var[k],
                bn.training,
                bn.momentum,
                bn.eps,
                out=normed,
                save_mean=mean[k],
                save_invstd=invstd[k],
            )
            current = normed
        fire(u, current, spikes[t], ratio, params.leak, theta, theta_neg, hard)
    if n_bn and not bn.training:  # eval-mode BN normalises with the running statistics
        mean, invstd = bn.running_mean.clone(), (bn.running_var + bn.eps).rsqrt()
    compact = spikes.to(SPIKE_STORAGE) if keep_spikes else None
    return spikes, compact, u, mean, invstd


def _slopes_inplace(currents, spikes, u0, params):
    """Overwrite ``currents`` with ``ds/du`` at every step, replaying the membrane in backward.

    The resets replay the saved spikes, so the membrane trajectory is the forward one even if the
    recomputed currents differ in the last bit; the surrogate is continuous, so such differences
    only move the slopes by as much. Working in place keeps backward's memory to one extra buffer.
    """
    theta, theta_neg = _as_scalar(params.theta), _as_scalar(params.theta_neg)
    u = _membrane(currents, u0)
    hard = getattr(params, "hard_reset", False)
    extra = None if theta_neg is None and not hard else torch.empty_like(u)
    slope = _steps(getattr(params, "compile", False))[1]
    for t in range(currents.shape[0]):
        slope(u, currents[t], spikes[t], extra, params.leak, theta, theta_neg, params.surrogate, hard)


def _reverse_scan_inplace(grad_spikes, slopes, params, grad_u_end, spikes):
    """Overwrite ``slopes`` with dL/du (= dL/dI): the reverse linear recurrence through the leak (and,
    for a hard reset, through 1 - |s[t]|).

    ``grad_u_end`` is dL/du after the last step (from later timesteps computed elsewhere). Returns
    dL/du[0]; the membrane carried in, if any, gets ``leak`` times that.
    """
    reverse = _steps(getattr(params, "compile", False))[2]
    hard = getattr(params, "hard_reset", False)
    keep = torch.empty_like(slopes[0]) if hard else None
    grad_u, alpha = grad_u_end, 1.0
    for t in reversed(range(slopes.shape[0])):
        reverse(slopes[t], grad_spikes[t], grad_u, alpha, None if keep is None else _keep_factor(spikes[t], keep))
        grad_u, alpha = slopes[t], params.leak
    return grad_u


def backward(x, u0, compact, mean, invstd, weight, grad_spikes, grad_u_end, params, bn):
    """dL/dx, dL/du0 and dL/dweight of ``forward``, replaying BN and the membrane."""
    n_bn = 0 if bn is None else bn.steps
    # One full-size buffer carries currents -> slopes -> dL/dcurrents -> dL/dx; everything else is
    # one timestep in size, which keeps backward's peak memory near the saved tensors'.
    buffer = torch.empty_like(x)
    if n_bn:
        _replay_bn(x, mean, invstd, weight, n_bn, out=buffer)
    buffer[n_bn:] = x[n_bn:]  # the steps without BN (full propagation's tail, or all without BN)
    _slopes_inplace(buffer, compact, u0, params)
    grad_spikes = torch.zeros_like(buffer) if grad_spikes is None else grad_spikes
    grad_first = _reverse_scan_inplace(grad_spikes, buffer, params, grad_u_end, compact)
    grad_u0 = None if u0 is None else grad_first * params.leak  # before BN's backward overwrites the buffer
    grad_weight = _bn_backward_inplace(buffer, x, mean, invstd, weight, bn) if n_bn else None
    return buffer, grad_u0, grad_weight


def _replay_bn(x, mean, invstd, weight, n_bn, out):
    """BN's output recomputed: x * scale - mean * scale, in x's dtype (under bf16 autocast a float32
    factor that varies along the channels-last inner dimension costs 25-50x more than a bf16 one)."""
    c = x.shape[2]
    scale = (invstd * weight).view(n_bn, 1, c, 1, 1)
    torch.mul(x[:n_bn], scale.to(x.dtype), out=out[:n_bn])
    out[:n_bn].sub_((mean.view(n_bn, 1, c, 1, 1) * scale).to(x.dtype))


def _bn_backward_inplace(buffer, x, mean, invstd, weight, bn):
    """Overwrite ``buffer``'s BN steps (dL/dBN output) with dL/dx; return dL/dweight."""
    c = x.shape[2]
    grad_weight = torch.empty_like(weight)
    var = invstd.pow(-2) - bn.eps  # read instead of running_var when train=False
    grad_x, grad_shift = torch.empty_like(x[0]), torch.empty_like(weight[:c])  # reused; the shift's is unused
    for t in range(bn.steps):
        k = slice(t * c, (t + 1) * c)
        torch.ops.aten.native_batch_norm_backward.out(
            buffer[t],
            x[t],
            weight[k],
            mean[k],
            var[k],
            mean[k],
            invstd[k],
            bn.training,
            bn.eps,
            [True, True, True],
            out0=grad_x,
            out1=grad_weight[k],
            out2=grad_shift,
        )
        buffer[t].copy_(grad_x)
    return grad_weight
