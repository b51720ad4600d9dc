"""Launch glue of the Triton backend: tiles and grids, the tensors' layouts and strides as the kernels
address them, and the backend API (``forward``, ``backward``; see models/triton/__init__.py).

Launches per layer (host-side allocations aside; a python-float threshold or constant costs one small
host-to-device copy the first time a value is seen, then it is cached):

- forward: training BN 3 (partials, finish, LIF); eval BN 2 (finish, LIF); no BN 1.
- backward: BN 3 (backward, the partials' torch sum, dx), plus 1 cast when the weight's dtype differs
  from the statistics'; no BN 1 for float32/float64 x, 2 for bf16 (the cast).
  A threshold map that is not already addressable (e.g. a non-contiguous neuron-wise tensor), a u0,
  grad_u_end or grad_spikes in another layout than x's, or an x the kernels cannot address cost one
  copy each.

Layout. Timestep t, row (n, p = h * W + w) and channel c sit at ``t * sS + n * sN + p * sP + c * sC``,
so any layout whose (h, w) fold into one stride works natively: each step channels-last (the networks'
layout, ``[S*N, C, H, W]`` channels-last seen as ``[S, N, C, H, W]``) or plain contiguous alike.
Outputs are ``torch.empty_like(x)`` (x's layout); an x that is not dense, or whose (h, w) do not fold,
is copied to contiguous first and the outputs are copied back into ``empty_like(x)``'s layout. Without
BN, x may have any shape ``[S, ...]``: each step is then seen as one flat row, and a threshold tensor is
materialised in one step's layout.
"""

import functools

import torch
import triton

from .bn_stats import _bn_finish_kernel, _bn_partials_kernel
from .neuron_kernels import _bn_grad_kernel, _lif_backward_kernel, _lif_forward_kernel
from .surrogates import surrogate_args

# Tiles: at most _TILE neurons (BLOCK_M * BLOCK_C, powers of two), smaller (down to _MIN_TILE) while a
# layer would give fewer than _MIN_PROGRAMS programs; warps for _PER_THREAD neurons per thread (register
# use per choice: docs/gpu.md).
_TILE, _MIN_TILE, _MIN_PROGRAMS, _PER_THREAD = 1024, 256, 1024, 4
# At most 16 channels (64 bytes of a channels-last float32 row) per tile: more rows per tile, so fewer
# per-tile partial sums in backward (2 per BLOCK_M rows and channel).
_MAX_BLOCK_C = 16
# The statistics: at most _MAX_CHUNKS row chunks per (step, channel), combined _FINISH_CHUNKS at a time.
_MAX_CHUNKS, _FINISH_BLOCK_K, _FINISH_CHUNKS = 256, 32, 32
# Compiled without FMA contraction: torch rounds leak * u before adding the current (see neuron_kernels).
_EXACT = {"enable_fp_fusion": False}

# The environment variable is read when the kernels are decorated (at import), not at launch.
_INTERPRETED = type(_lif_forward_kernel).__name__ == "InterpretedFunction"
if _INTERPRETED:
    # The interpreter runs each program as numpy calls on whole tiles: few, large tiles are what is fast
    # there (the tests' networks would take minutes with the GPU's tile sizes).
    _TILE, _MIN_PROGRAMS, _MAX_BLOCK_C, _FINISH_BLOCK_K = 1 << 15, 1, 1 << 12, 1 << 12


def forward(x, u0, params, bn, keep_spikes: bool):
    """BN of the first ``bn.steps`` steps of ``x``, then LIF over all steps -> (spikes, compact, u, mean,
    invstd); see models/lif_torch.py. ``params.hard_reset`` (absent: False) picks the reset."""
    _check_device(x)
    n_bn = 0 if bn is None else bn.steps
    geo = _Geometry(x, n_bn)
    f = _compute_dtype(x)
    spikes = torch.empty_like(geo.x)
    compact = torch.empty_like(geo.x, dtype=torch.int8) if keep_spikes else None
    u = torch.empty_like(geo.x[0], dtype=f)
    mean, invstd = _statistics(geo, bn, n_bn, f)
    u0 = None if u0 is None else _as_layout(u0.detach(), u)
    thresholds, threshold_strides, negative = _threshold_pair(params, geo, f)
    x_strides, u_strides = _strides(geo.view(geo.x)), _strides(geo.view(u))
    block_m, block_c, grid, warps = _tiles(geo)
    view = geo.view
    _lif_forward_kernel[grid](
        view(geo.x),
        view(spikes),
        view(_either(compact, spikes)),
        view(_either(u0, u)),
        view(u),
        *thresholds,
        mean if n_bn else u,
        invstd if n_bn else u,
        _bn_weight(None if bn is None else bn.weight, n_bn * geo.C, u),
        _constants(x.device, f, (float(params.leak),)),
        geo.S,
        n_bn,
        geo.M,
        geo.HW,
        geo.C,
        view(geo.x).stride(0),
        *x_strides[:3],
        *u_strides[:3],
        *threshold_strides,
        X_FLAT=x_strides[3],
        U_FLAT=u_strides[3],
        HAS_U0=u0 is not None,
        KEEP=keep_spikes,
        NEG=negative,
        HARD_RESET=_hard_reset(params),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=warps,
        **_EXACT,
    )
    compact = None if compact is None else geo.restore(compact)
    return geo.restore(spikes), compact, u, mean, invstd


def backward(x, u0, compact, mean, invstd, weight, grad_spikes, grad_u_end, params, bn):
    """dL/dx, dL/du0 and dL/dweight of ``forward``, replaying BN and the membrane."""
    _check_device(x)
    n_bn = 0 if bn is None else bn.steps
    geo = _Geometry(x, n_bn)
    f = _compute_dtype(x)
    view = geo.view
    grad = torch.empty_like(geo.x, dtype=f)  # slopes, then dL/dI, then (float32/64 x) dL/dx
    grad_u0 = torch.empty_like(geo.x[0], dtype=f)  # also the layout reference for u0 and grad_u_end
    u0 = None if u0 is None else _as_layout(u0.detach(), grad_u0)
    grad_u_end = None if grad_u_end is None else _as_layout(grad_u_end, grad_u0)
    grad_spikes = None if grad_spikes is None else _grad_spikes_view(grad_spikes, geo)
    thresholds, threshold_strides, negative = _threshold_pair(params, geo, f)
    kind, surrogate_params = surrogate_args(params.surrogate)
    x_strides, u_strides = _strides(view(geo.x)), _strides(view(grad_u0))
    gs_strides = (0, 0, 0, True) if grad_spikes is None else _strides(grad_spikes)
    K = n_bn * geo.C
    block_m, block_c, grid, warps = _tiles(geo)
    parts = grad.new_empty((2, grid[0], K)) if n_bn else grad
    mean, invstd = (mean, invstd) if n_bn else (grad, grad)
    weight_arg = _bn_weight(weight if n_bn else None, K, grad)
    _lif_backward_kernel[grid](
        view(geo.x),
        view(_as_layout(compact, geo.x)),
        _either(grad_spikes, view(grad)),
        view(_either(grad_u_end, grad_u0)),
        view(_either(u0, grad_u0)),
        view(grad_u0),
        view(grad),
        parts,
        *thresholds,
        mean,
        invstd,
        weight_arg,
        _constants(x.device, f, (float(params.leak),) + surrogate_params),
        geo.S,
        n_bn,
        geo.M,
        geo.HW,
        geo.C,
        K,
        view(geo.x).stride(0),
        *x_strides[:3],
        _either(grad_spikes, view(grad)).stride(0),
        *gs_strides[:3],
        *u_strides[:3],
        *threshold_strides,
        X_FLAT=x_strides[3],
        D_FLAT=gs_strides[3],
        U_FLAT=u_strides[3],
        HAS_U0=u0 is not None,
        HAS_GS=grad_spikes is not None,
        HAS_GU_END=grad_u_end is not None,
        NEG=negative,
        HARD_RESET=_hard_reset(params),
        KIND=kind,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=warps,
        **_EXACT,
    )
    sums = parts.sum(1) if n_bn else None  # [sum dI, sum dI * xhat] per (timestep, channel)
    grad_weight = None if (weight is None or not n_bn) else sums[1].to(weight.dtype)
    grad_x = _input_grad(grad, geo, n_bn, mean, invstd, weight_arg, sums, bn)
    return geo.restore(grad_x), (grad_u0 if u0 is not None else None), grad_weight


def _input_grad(grad, geo, n_bn, mean, invstd, weight, sums, bn):
    """dL/dx in x's dtype from dL/dI: BN's backward for the normalised steps, a cast for the others
    (skipped when the buffer already has x's dtype: it is written in place)."""
    grad_x = grad if grad.dtype == geo.x.dtype else torch.empty_like(geo.x)
    steps = n_bn if grad_x is grad else geo.S
    if steps == 0:
        return grad_x
    x_strides = _strides(geo.view(geo.x))
    block_m, block_c, grid, warps = _tiles(geo)
    _bn_grad_kernel[grid + (steps,)](
        geo.view(grad),
        geo.view(geo.x),
        geo.view(grad_x),
        mean,
        invstd,
        weight,
        _either(sums, grad),
        n_bn,
        geo.M,
        geo.HW,
        geo.C,
        n_bn * geo.C,
        geo.view(geo.x).stride(0),
        *x_strides[:3],
        X_FLAT=x_strides[3],
        TRAINING=bool(n_bn) and bn.training,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return grad_x


def _statistics(geo, bn, n_bn, f):
    """BN's per-(timestep, channel) mean and 1/std: the batch's (and the running statistics updated in
    place) in training, the running statistics in eval; empty without BN."""
    K = n_bn * geo.C
    mean, invstd = geo.x.new_empty(K, dtype=f), geo.x.new_empty(K, dtype=f)
    if not n_bn:
        return mean, invstd
    running_mean, running_var = bn.running_mean, bn.running_var
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError("the running statistics are updated in place and must be contiguous")
    parts, chunk_rows = mean, 1
    if bn.training:
        if geo.M < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {geo.M}")
        parts, chunk_rows = _batch_partials(geo, n_bn, f)
    _bn_finish_kernel[(triton.cdiv(K, _FINISH_BLOCK_K),)](
        parts,
        mean,
        invstd,
        running_mean,
        running_var,
        _constants(geo.x.device, f, (float(bn.eps), float(bn.momentum))),
        K,
        geo.M,
        parts.shape[0] // 2 if bn.training else 0,
        chunk_rows,
        TRAINING=bn.training,
        UPDATE=bn.training and bn.momentum != 0,
        BLOCK_K=_FINISH_BLOCK_K,
        CHUNKS=_FINISH_CHUNKS,
        num_warps=4,
    )
    return mean, invstd


def _batch_partials(geo, n_bn, f):
    """Per-chunk partials of the BN steps' statistics, [2 * chunks + 1, n_bn * C], and the rows per chunk:
    enough chunks to fill the GPU, few enough that combining them is quick."""
    block_m, block_c, grid, warps = _tiles(geo)
    chunks = min(grid[0], _MAX_CHUNKS, triton.cdiv(_MIN_PROGRAMS, grid[1] * n_bn))
    chunk_rows = triton.cdiv(grid[0], chunks) * block_m
    chunks = triton.cdiv(geo.M, chunk_rows)
    parts = geo.x.new_empty((2 * chunks + 1, n_bn * geo.C), dtype=f)
    x_strides = _strides(geo.x)
    _bn_partials_kernel[(chunks, grid[1], n_bn)](
        geo.x,
        parts,
        geo.M,
        geo.HW,
        geo.C,
        n_bn * geo.C,
        chunk_rows,
        geo.x.stride(0),
        *x_strides[:3],
        X_FLAT=x_strides[3],
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return parts, chunk_rows


def _bn_weight(weight, size, dummy):
    """BN's scale as the kernels read it: contiguous; ones for a BN without one (``weight`` None,
    ``size`` > 0); ``dummy`` (never read) without BN."""
    if weight is not None:
        return weight.detach().contiguous()
    return torch.ones(size, dtype=dummy.dtype, device=dummy.device) if size else dummy


class _Geometry:
    """How the kernels see x: per timestep, M = N * H * W rows (n, p = h * W + w) by C channels.

    ``x`` is the tensor they read: the caller's, or a contiguous copy when they cannot address it.
    Without BN, x may have any shape ``[S, ...]``: each step is seen as one row of ``L`` elements in
    memory order (N = C = H = 1, W = L), which needs each step to be one dense block.
    """

    def __init__(self, x, n_bn):
        self.flat = x.dim() != 5
        if self.flat and n_bn:
            raise ValueError(f"BN needs x of shape [S, N, C, H, W], got {tuple(x.shape)}")
        self.original = x
        self.x = x if self._addressable(x) else x.contiguous()
        self.S = x.shape[0]
        self.N, self.C, self.H, self.W = (1, 1, 1, x[0].numel()) if self.flat else x.shape[1:]
        self.HW, self.M = self.H * self.W, self.N * self.H * self.W
        _check_offsets(self.view(self.x))

    def _addressable(self, x):
        if not _dense(x):
            return False
        if self.flat:
            return x.shape[0] == 1 or x.stride(0) == x[0].numel()
        return _flattenable(x)

    def view(self, t):
        """``t`` (x's shape or one step's, in the layout of ``self.x``) as the kernels address it."""
        if not self.flat or t is None:
            return t
        length = self.W
        if t.dim() == self.x.dim():
            return t.as_strided((self.S, 1, 1, 1, length), (t.stride(0), length, length, length, 1), t.storage_offset())
        return t.as_strided((1, 1, 1, length), (length, length, length, 1), t.storage_offset())

    def restore(self, t):
        """An output computed in ``self.x``'s layout, in the caller's x's layout (empty_like(x)'s)."""
        return t if self.x is self.original else _as_layout(t, self.original)


def _grad_spikes_view(grad_spikes, geo):
    """dL/dspikes as the kernels read it. A gradient expanded over time (stride 0, e.g. of a sum over
    the steps) stays expanded: the kernel reads one step S times instead of S copies."""
    if geo.S > 1 and grad_spikes.stride(0) == 0:
        step = grad_spikes[0]
        if geo.flat:
            step = _as_layout(step, geo.x[0])
        elif not _flattenable(step):
            step = step.contiguous()
        grad_spikes = step.unsqueeze(0).expand(grad_spikes.shape)
    elif geo.flat:
        grad_spikes = _as_layout(grad_spikes, geo.x)
    elif not _flattenable(grad_spikes):
        grad_spikes = grad_spikes.contiguous()
    grad_spikes = geo.view(grad_spikes)
    _check_offsets(grad_spikes)
    return grad_spikes


def _threshold_pair(params, geo, f):
    """Kernel arguments for the thresholds: (theta, theta_neg) tensors, their strides (tC, tP, nC, nP),
    and whether the negative threshold is on (off: theta stands in for it, never read)."""
    theta = _threshold_args(params.theta, geo, f)
    negative = _threshold_args(params.theta_neg, geo, f)
    pair = (theta, _either(negative, theta))
    return (pair[0][0], pair[1][0]), (*pair[0][1:], *pair[1][1:]), negative is not None


def _threshold_args(theta, geo, f):
    """(tensor, tC, tP) such that the kernels read the threshold of channel c, pixel p at
    ``tensor[p * tP + c * tC]``: strides 0 for a layer-wise one (a python float goes to a cached
    device scalar), the expanded view's strides for a channel- or neuron-wise one. None stays None."""
    if theta is None:
        return None
    if not isinstance(theta, torch.Tensor):
        return _constants(geo.x.device, f, (float(theta),)), 0, 0
    theta = theta.detach().to(geo.x.device)
    if theta.numel() == 1:
        return theta.reshape(1), 0, 0
    if geo.flat:  # materialised in one step's layout, read at the step's flat memory index
        step = geo.x[0]
        return torch.empty_like(step, dtype=theta.dtype).copy_(theta.expand(step.shape)), 0, 1
    per_sample = _per_sample(theta).expand(geo.C, geo.H, geo.W)
    if not _flattenable(per_sample):
        per_sample = per_sample.contiguous()
    _, tc, tp, _ = _strides(per_sample.unsqueeze(0))
    return per_sample, tc, tp


def _per_sample(theta):
    """A threshold that broadcasts against one sample [C, H, W] (leading size-1 dims dropped)."""
    if theta.dim() > 3:
        if any(n != 1 for n in theta.shape[:-3]):
            raise ValueError(
                f"a threshold of shape {tuple(theta.shape)} does not broadcast against one sample [C, H, W]"
            )
        theta = theta.reshape(theta.shape[-3:])
    return theta


def _hard_reset(params):
    """Reset to 0 after a spike (``params.hard_reset``), else by subtracting the threshold."""
    return bool(getattr(params, "hard_reset", False))


@functools.lru_cache(maxsize=512)
def _constants(device, dtype, values):
    """Scalars as a small device tensor, cached per value: a host-to-device copy per call would
    synchronise the stream. Read-only (the kernels only load it)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _check_device(x):
    if x.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            "neuron_backend 'triton' runs on CUDA tensors "
            "(set TRITON_INTERPRET=1 to run its kernels on the CPU, for tests)"
        )


def _compute_dtype(x):
    """The membrane's and the statistics' dtype: float32, or float64 for float64 x."""
    return torch.promote_types(x.dtype, torch.float32)


def _tiles(geo):
    """(BLOCK_M, BLOCK_C, grid, num_warps) of this layer's tiles (see _TILE)."""
    block_c = min(triton.next_power_of_2(geo.C), _MAX_BLOCK_C)
    rows_max = triton.next_power_of_2(geo.M)
    elements = _TILE
    block_m = min(max(elements // block_c, 1), rows_max)
    while elements > _MIN_TILE and triton.cdiv(geo.M, block_m) * triton.cdiv(geo.C, block_c) < _MIN_PROGRAMS:
        elements //= 2
        block_m = min(max(elements // block_c, 1), rows_max)
    warps = min(max(block_m * block_c // (32 * _PER_THREAD), 1), 8)
    return block_m, block_c, (triton.cdiv(geo.M, block_m), triton.cdiv(geo.C, block_c)), warps


def _strides(t):
    """(sN, sC, sP, rows_flat) of a [..., N, C, H, W] tensor whose (h, w) fold into p = h * W + w;
    rows_flat: the rows (n, p) are evenly spaced, sN == H * W * sP."""
    n, c, h, w = t.shape[-4:]
    sn, sc, sh, sw = t.stride()[-4:]
    sp = sw if w > 1 else sh
    return sn, sc, sp, n == 1 or sn == h * w * sp


def _check_offsets(t):
    """The kernels index within one timestep in 32 bits."""
    if t is not None and sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
        raise ValueError("neuron_backend 'triton': one timestep spans more than 2**31 elements")


def _flattenable(t):
    """(h, w), the last two dims, fold into one index with one stride."""
    h, w = t.shape[-2:]
    return h == 1 or w == 1 or t.stride(-2) == w * t.stride(-1)


def _dense(t):
    """Non-overlapping and dense: then torch.empty_like(t) has t's strides."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_strides(a, b):
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _as_layout(t, like):
    """t's values (and dtype) in ``like``'s memory layout; t itself when it has it already."""
    return t if _same_strides(t, like) else torch.empty_like(like, dtype=t.dtype).copy_(t)


def _either(value, fallback):
    """``value``, or ``fallback`` for a kernel argument that is unused (a dummy pointer)."""
    return fallback if value is None else value
