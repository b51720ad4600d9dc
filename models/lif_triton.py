"""The neurons' Triton backend: BNTT + LIF over all S timesteps of a layer in a few fused kernels.

Same API as ``models/lif_torch.py`` (see its docstring; ``models/neurons.py`` chooses the backend)::

    forward(x, u0, params, bn, keep_spikes) -> (spikes, compact, u, mean, invstd)
    backward(x, u0, compact, mean, invstd, weight, grad_spikes, grad_u_end, params, bn)
        -> (grad_x, grad_u0, grad_weight)

Kernels. A program of the LIF kernels owns a tile of neurons, ``BLOCK_M`` rows (n, h, w) by ``BLOCK_C``
channels, and loops over the timesteps inside, so the membrane stays in registers for the whole block
of time (one launch for all S steps, where the torch backend launches a few small kernels per step):

- ``_bn_partials_kernel`` (training BN only): per (chunk of rows, timestep, channel), the mean of x and
  the sum of squared deviations from it, both relative to a shift (x at the first row), each tile
  centred on its own mean and merged (Chan et al.'s parallel variance). Shift and centring keep the
  variance accurate when the mean is large against the spread (a plain sum of squares would cancel).
- ``_bn_finish_kernel``: combines the chunks (Chan again) into the batch mean and 1/std and updates the
  running statistics in place; in eval it reads the running statistics instead.
- ``_lif_forward_kernel``: per step, BN (``(x - mean) * invstd * weight``, no shift), charge, fire,
  reset; writes the spikes (x's dtype), their int8 copy and the final membrane.
- ``_lif_backward_kernel``: replays the membrane with the saved spikes as resets, writing the surrogate
  slopes into the gradient buffer, then runs the reverse recurrence over them, overwriting them with
  dL/dI, and writes per-tile partial sums of dL/dI and dL/dI * xhat for BN's backward (summed by one
  torch op afterwards: deterministic, no atomics). It also writes dL/du0.
- ``_bn_grad_kernel``: dL/dx from dL/dI for the BN steps (training or eval formula) and the cast to
  x's dtype; with a float32/float64 x and no BN the buffer already is dL/dx and this is skipped.

Launches per layer (host-side allocations aside; a python-float threshold or constant costs one small
host-to-device copy the first time a value is seen, then it is cached):

- forward: training BN 3 (partials, finish, LIF); eval BN 2 (finish, LIF); no BN 1.
- backward: BN 3 (backward, the partials' torch sum, dx), plus 1 cast when the weight's dtype differs
  from the statistics'; no BN 1 for float32/float64 x, 2 for bf16 (the cast).
  A threshold map that is not already addressable (e.g. a non-contiguous neuron-wise tensor), a u0,
  grad_u_end or grad_spikes in another layout than x's, or an x the kernels cannot address (see
  Layout) cost one copy each.

Layout. The kernels address timestep t, row (n, p = h * W + w) and channel c at
``t * sS + n * sN + p * sP + c * sC``, so any layout whose (h, w) fold into one stride works natively:
each step channels-last (the networks' layout, ``[S*N, C, H, W]`` channels-last seen as
``[S, N, C, H, W]``) or plain contiguous alike. Outputs are ``torch.empty_like(x)`` (x's layout); an x
that is not dense, or whose (h, w) do not fold, is copied to contiguous first and the outputs are
copied back into ``empty_like(x)``'s layout. Without BN, x may have any shape ``[S, ...]``: each step is
then seen as one flat row, and a threshold tensor is materialised in one step's layout.

Numerics. Spikes compare a correctly rounded ``u / theta`` with 1 (``tl.div_rn``; Triton's ``/`` on
float32 is an approximate division on NVIDIA GPUs) and the kernels are compiled without FMA contraction,
so ``leak * u + I`` rounds twice as torch's ``u.mul_(leak).add_(I)`` does: given the same currents the
spikes are torch's bit for bit. The membrane is float32 (float64 for float64 x) whatever x's dtype.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # models/neurons.py catches this and falls back to the torch backend
    raise ImportError(
        f"neuron_backend 'triton' needs the triton package ({error}); install triton or use neuron_backend 'torch'"
    ) from error

# Surrogate name -> (compile-time kind, its parameters in the order the kernel reads them).
_SURROGATES = {
    "linear": (0, ("gamma",)),
    "fast_sigmoid": (1, ("scale",)),
    "exp": (2, ("alpha", "beta")),
    "pass_through": (3, ()),
    "atan": (4, ("alpha",)),
    "sigmoid": (5, ("alpha",)),
}

# Tiles: at most _TILE neurons (BLOCK_M * BLOCK_C, powers of two), smaller (down to _MIN_TILE) while a
# layer would give fewer than _MIN_PROGRAMS programs; warps for about 4 neurons per thread. Compiled for
# sm_90 by triton 3.8, 4 per thread costs the forward ~64 and the backward ~80 registers, 8 per thread
# twice that (too few resident warps for a streaming kernel).
_TILE, _MIN_TILE, _MIN_PROGRAMS, _PER_THREAD = 1024, 256, 1024, 4
# At most 16 channels (64 bytes of a channels-last float32 row) per tile: more rows per tile, so fewer
# per-tile partial sums in backward (2 per BLOCK_M rows and channel).
_MAX_BLOCK_C = 16
# The statistics: at most _MAX_CHUNKS row chunks per (step, channel), combined _FINISH_CHUNKS at a time.
_MAX_CHUNKS, _FINISH_BLOCK_K, _FINISH_CHUNKS = 256, 32, 32
# Compiled without FMA contraction: torch rounds leak * u before adding the current (see Numerics).
_EXACT = {"enable_fp_fusion": False}


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _div(a, b):
    """a / b correctly rounded (float32 ``/`` is approximate on NVIDIA GPUs; float64 ``/`` is IEEE)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a):
    """Correctly rounded square root (float32 ``tl.sqrt`` is approximate)."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _offsets(rows, cols, HW, sN, sC, sP, ROWS_FLAT: tl.constexpr):
    """[rows, cols] element offsets within one timestep. ROWS_FLAT: the rows (n, p) are evenly spaced
    (sN == HW * sP, e.g. channels-last), which spares an integer division."""
    if ROWS_FLAT:
        row_off = rows * sP
    else:
        row_off = (rows // HW) * sN + (rows % HW) * sP
    return row_off[:, None] + cols[None, :] * sC


@triton.jit
def _tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C):
    """This program's rows, channels and the in-bounds mask of their tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return rows, cols, mask


@triton.jit
def _threshold(ptr, rows, cols, HW, tC, tP, mask, f):
    """The threshold tile (strides 0 for a layer-wise scalar); loaded once, used at every step."""
    offs = (rows % HW)[:, None] * tP + cols[None, :] * tC
    return tl.load(ptr + offs, mask=mask, other=1.0).to(f)


@triton.jit
def _load_step(ptr, t, sS, offs, mask, f):
    """Timestep t of a tensor as compute dtype f (the time offset in 64 bits: S steps may pass 2**31)."""
    return tl.load(ptr + tl.cast(t, tl.int64) * sS + offs, mask=mask, other=0.0).to(f)


@triton.jit
def _channel_vector(ptr, t, cols, C, f):
    """Entries t * C + cols of a per-(timestep, channel) vector, as a [1, BLOCK_C] row."""
    return tl.load(ptr + t * C + cols, mask=cols < C, other=0.0).to(f)[None, :]


@triton.jit
def _xhat(x, t, cols, C, mean_ptr, invstd_ptr):
    """(x - mean) * invstd of timestep t, per channel."""
    return (x - _channel_vector(mean_ptr, t, cols, C, x.dtype)) * _channel_vector(invstd_ptr, t, cols, C, x.dtype)


@triton.jit
def _normalise(x, t, cols, C, mean_ptr, invstd_ptr, weight_ptr):
    """BN of timestep t without shift: (x - mean) * invstd * weight."""
    return _xhat(x, t, cols, C, mean_ptr, invstd_ptr) * _channel_vector(weight_ptr, t, cols, C, x.dtype)


@triton.jit
def _fire(u, current, leak, theta, theta_neg, NEG: tl.constexpr):
    """Charge, fire, reset by subtraction; returns (u, spike) with spike in {-1, 0, 1}."""
    u = u * leak + current
    spike = (_div(u, theta) > 1.0).to(u.dtype)
    u = u - theta * spike
    if NEG:  # exclusive with a positive spike: u was above theta > 0 before the reset
        negative = (_div(u, theta_neg) > 1.0).to(u.dtype)
        u = u - theta_neg * negative
        spike = spike - negative
    return u, spike


@triton.jit
def _surrogate(x, p0, p1, KIND: tl.constexpr):
    """g(x) of models/surrogates.py (KIND in _SURROGATES order)."""
    if KIND == 0:  # linear: gamma * max(0, 1 - |x|)
        g = p0 * tl.maximum(1.0 - tl.abs(x), 0.0)
    elif KIND == 1:  # fast_sigmoid: (scale * |x| + 1)^-2
        d = p0 * tl.abs(x) + 1.0
        g = _div(tl.full(x.shape, 1.0, x.dtype), d * d)
    elif KIND == 2:  # exp: alpha * exp(-beta * |x|)
        g = p0 * tl.exp(-p1 * tl.abs(x))
    elif KIND == 3:  # pass_through
        g = tl.full(x.shape, 1.0, x.dtype)
    elif KIND == 4:  # atan: (alpha / 2) / (1 + (pi / 2 * alpha * x)^2)
        z = (1.5707963267948966 * p0) * x
        g = _div(tl.full(x.shape, 1.0, x.dtype) * (p0 * 0.5), 1.0 + z * z)
    else:  # sigmoid: alpha * s * (1 - s), s = sigmoid(alpha * x)
        s = _div(tl.full(x.shape, 1.0, x.dtype), 1.0 + tl.exp(-(p0 * x)))
        g = p0 * s * (1.0 - s)
    return g


@triton.jit
def _slope(u, theta, theta_neg, p0, p1, KIND: tl.constexpr, NEG: tl.constexpr):
    """ds/du at the charged membrane: g(u / theta - 1) / theta (minus the negative threshold's term)."""
    slope = _div(_surrogate(_div(u, theta) - 1.0, p0, p1, KIND), theta)
    if NEG:
        slope = slope - _div(_surrogate(_div(u, theta_neg) - 1.0, p0, p1, KIND), theta_neg)
    return slope


@triton.jit
def _replay_reset(u, spike, theta, theta_neg, NEG: tl.constexpr):
    """The forward's reset, from the saved spike (no recomputed comparison: the trajectory is exact)."""
    u = u - theta * (spike > 0).to(u.dtype)
    if NEG:
        u = u - theta_neg * (spike < 0).to(u.dtype)
    return u


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _bn_partials_kernel(
    x_ptr,
    part_ptr,
    M,
    HW,
    C,
    K,
    chunk_rows,
    sS,
    sN,
    sC,
    sP,
    X_FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per (row chunk, timestep t, channel c), k = t*C + c: part[chunk, k] = the mean of x - shift over
    the chunk's rows, part[chunks + chunk, k] = the sum of squared deviations from it, and
    part[2 * chunks, k] = shift, x at row 0: statistics relative to it keep their precision when the
    mean is large against the spread. The chunk is read BLOCK_M rows at a time, each tile centred on its
    own mean and merged into the running pair (Chan et al.). Grid (row chunks, channel tiles, BN steps)."""
    t = tl.program_id(2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    f = part_ptr.dtype.element_ty
    shift = _load_step(x_ptr, t, sS, cols * sC, cols < C, f)
    start = tl.program_id(0) * chunk_rows
    end = tl.minimum(start + chunk_rows, M)
    mean = tl.zeros([BLOCK_C], f)
    m2 = tl.zeros([BLOCK_C], f)
    for first in range(start, end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & (cols < C)[None, :]
        x = _load_step(x_ptr, t, sS, _offsets(rows, cols, HW, sN, sC, sP, X_FLAT), mask, f)
        x = tl.where(mask, x - shift[None, :], 0.0)
        n_tile = tl.cast(tl.minimum(end - first, BLOCK_M), f)
        n_before = tl.cast(first - start, f)  # the earlier tiles are full
        tile_mean = _div(tl.sum(x, axis=0), n_tile)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        delta = tile_mean - mean
        mean += delta * _div(n_tile, n_before + n_tile)
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * _div(n_before * n_tile, n_before + n_tile)
    at = part_ptr + tl.program_id(0) * K + t * C + cols
    tl.store(at, mean, mask=cols < C)
    tl.store(at + tl.num_programs(0) * K, m2, mask=cols < C)
    first_chunk = tl.program_id(0) == 0
    tl.store(part_ptr + 2 * tl.num_programs(0) * K + t * C + cols, shift, mask=(cols < C) & first_chunk)


@triton.jit
def _bn_finish_kernel(
    part_ptr,
    mean_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    consts_ptr,
    K,
    M,
    n_chunks,
    chunk_rows,
    TRAINING: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """mean and 1/std per (timestep, channel) k: from the chunks' partials in training (and the running
    statistics' update), from the running statistics in eval. consts = (eps, momentum)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    f = mean_ptr.dtype.element_ty
    if TRAINING:
        mean, var = _combine_chunks(part_ptr, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS)
        if UPDATE:
            _update_running(running_mean_ptr, running_var_ptr, k, kmask, mean, var, M, tl.load(consts_ptr + 1))
    else:
        mean = tl.load(running_mean_ptr + k, mask=kmask, other=0.0).to(f)
        var = tl.load(running_var_ptr + k, mask=kmask, other=1.0).to(f)
    tl.store(mean_ptr + k, mean, mask=kmask)
    one = tl.full(var.shape, 1.0, f)
    tl.store(invstd_ptr + k, _div(one, _sqrt(var + tl.load(consts_ptr))), mask=kmask)


@triton.jit
def _combine_chunks(part_ptr, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS: tl.constexpr):
    """Batch mean and biased variance from the chunks' means (relative to the shift) and centred sums
    of squares (Chan et al.): M2 = sum_i M2_i + sum_i n_i * (mean_i - mean)^2. CHUNKS chunks at a time."""
    total = tl.zeros(k.shape, f)
    for first in range(0, n_chunks, CHUNKS):
        count, chunk_mean, offs, mask = _chunk_tile(part_ptr, first, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS)
        total += tl.sum(count * chunk_mean, axis=0)
    mean = _div(total, tl.cast(M, f))
    m2 = tl.zeros(k.shape, f)
    for first in range(0, n_chunks, CHUNKS):
        count, chunk_mean, offs, mask = _chunk_tile(part_ptr, first, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS)
        shift = chunk_mean - mean[None, :]
        chunk_m2 = tl.load(part_ptr + n_chunks * K + offs, mask=mask, other=0.0)
        m2 += tl.sum(chunk_m2 + count * shift * shift, axis=0)
    mean += tl.load(part_ptr + 2 * n_chunks * K + k, mask=kmask, other=0.0)
    return mean, _div(m2, tl.cast(M, f))


@triton.jit
def _chunk_tile(part_ptr, first, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS: tl.constexpr):
    """Chunks first .. first+CHUNKS-1: their row counts [CHUNKS, 1] (0 past the last), their means
    [CHUNKS, BLOCK_K], and the offsets and mask of that tile in the partials."""
    chunks = first + tl.arange(0, CHUNKS)
    count = tl.cast(tl.maximum(tl.minimum(M - chunks * chunk_rows, chunk_rows), 0), f)[:, None]
    offs = chunks[:, None] * K + k[None, :]
    mask = (chunks < n_chunks)[:, None] & kmask[None, :]
    return count, tl.load(part_ptr + offs, mask=mask, other=0.0), offs, mask


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, k, kmask, mean, var, M, momentum):
    """torch BN's update: running = (1 - m) * running + m * batch (the variance unbiased)."""
    f = mean.dtype
    old_mean = tl.load(running_mean_ptr + k, mask=kmask, other=0.0).to(f)
    old_var = tl.load(running_var_ptr + k, mask=kmask, other=0.0).to(f)
    unbiased = _div(var * tl.cast(M, f), tl.cast(M - 1, f))
    tl.store(
        running_mean_ptr + k,
        ((1.0 - momentum) * old_mean + momentum * mean).to(running_mean_ptr.dtype.element_ty),
        mask=kmask,
    )
    tl.store(
        running_var_ptr + k,
        ((1.0 - momentum) * old_var + momentum * unbiased).to(running_var_ptr.dtype.element_ty),
        mask=kmask,
    )


@triton.jit
def _lif_forward_kernel(
    x_ptr,
    spikes_ptr,
    compact_ptr,
    u0_ptr,
    u_ptr,
    theta_ptr,
    theta_neg_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    consts_ptr,
    S,
    n_bn,
    M,
    HW,
    C,
    sS,
    sN,
    sC,
    sP,
    uN,
    uC,
    uP,
    tC,
    tP,
    nC,
    nP,
    X_FLAT: tl.constexpr,
    U_FLAT: tl.constexpr,
    HAS_U0: tl.constexpr,
    KEEP: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """All S timesteps of one tile: BN for t < n_bn, then charge / fire / reset. consts = (leak,)."""
    rows, cols, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    f = u_ptr.dtype.element_ty
    offs = _offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    u_offs = _offsets(rows, cols, HW, uN, uC, uP, U_FLAT)
    leak = tl.load(consts_ptr)
    theta = _threshold(theta_ptr, rows, cols, HW, tC, tP, mask, f)
    theta_neg = _threshold(theta_neg_ptr, rows, cols, HW, nC, nP, mask, f) if NEG else theta
    if HAS_U0:
        u = tl.load(u0_ptr + u_offs, mask=mask, other=0.0).to(f)
    else:
        u = tl.zeros([BLOCK_M, BLOCK_C], f)
    for t in range(0, n_bn):
        current = _normalise(_load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr, weight_ptr)
        u, spike = _fire(u, current, leak, theta, theta_neg, NEG)
        _store_spike(spikes_ptr, compact_ptr, t, sS, offs, mask, spike, KEEP)
    for t in range(n_bn, S):  # full propagation's tail (or every step without BN): no normalisation
        u, spike = _fire(u, _load_step(x_ptr, t, sS, offs, mask, f), leak, theta, theta_neg, NEG)
        _store_spike(spikes_ptr, compact_ptr, t, sS, offs, mask, spike, KEEP)
    tl.store(u_ptr + u_offs, u, mask=mask)


@triton.jit
def _store_spike(spikes_ptr, compact_ptr, t, sS, offs, mask, spike, KEEP: tl.constexpr):
    """Spikes in x's dtype and, with KEEP, their int8 copy (same layout)."""
    at = tl.cast(t, tl.int64) * sS + offs
    tl.store(spikes_ptr + at, spike.to(spikes_ptr.dtype.element_ty), mask=mask)
    if KEEP:
        tl.store(compact_ptr + at, spike.to(tl.int8), mask=mask)


@triton.jit
def _lif_backward_kernel(
    x_ptr,
    compact_ptr,
    gs_ptr,
    gu_end_ptr,
    u0_ptr,
    gu0_ptr,
    g_ptr,
    part_ptr,
    theta_ptr,
    theta_neg_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    consts_ptr,
    S,
    n_bn,
    M,
    HW,
    C,
    K,
    sS,
    sN,
    sC,
    sP,
    dS,
    dN,
    dC,
    dP,
    uN,
    uC,
    uP,
    tC,
    tP,
    nC,
    nP,
    X_FLAT: tl.constexpr,
    D_FLAT: tl.constexpr,
    U_FLAT: tl.constexpr,
    HAS_U0: tl.constexpr,
    HAS_GS: tl.constexpr,
    HAS_GU_END: tl.constexpr,
    NEG: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile's backward through all S steps: slopes by replay into g, then dL/dI over them (reverse
    recurrence), with BN's per-tile partial sums and dL/du0. consts = (leak, p0, p1)."""
    rows, cols, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    f = g_ptr.dtype.element_ty
    offs = _offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    u_offs = _offsets(rows, cols, HW, uN, uC, uP, U_FLAT)
    leak = tl.load(consts_ptr)
    theta = _threshold(theta_ptr, rows, cols, HW, tC, tP, mask, f)
    theta_neg = _threshold(theta_neg_ptr, rows, cols, HW, nC, nP, mask, f) if NEG else theta
    if HAS_U0:
        u = tl.load(u0_ptr + u_offs, mask=mask, other=0.0).to(f)
    else:
        u = tl.zeros([BLOCK_M, BLOCK_C], f)
    p0 = tl.load(consts_ptr + 1)
    p1 = tl.load(consts_ptr + 2)
    for t in range(0, n_bn):
        current = _normalise(_load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr, weight_ptr)
        u = _replay_step(u, current, compact_ptr, g_ptr, t, sS, offs, mask, leak, theta, theta_neg, p0, p1, KIND, NEG)
    for t in range(n_bn, S):
        u = _replay_step(
            u,
            _load_step(x_ptr, t, sS, offs, mask, f),
            compact_ptr,
            g_ptr,
            t,
            sS,
            offs,
            mask,
            leak,
            theta,
            theta_neg,
            p0,
            p1,
            KIND,
            NEG,
        )
    # The reverse pass reads the slopes this program just wrote. Each element is written and read through
    # the same offsets (so by the same thread in the same layout); the barrier makes that hold whatever
    # layout the compiler picks for the two loops (once per program: negligible).
    tl.debug_barrier()
    # dL/dI[S-1] = dL/ds * slope + dL/du_end: the carried-in gradient enters with factor 1, not leak.
    if HAS_GU_END:
        carry = tl.load(gu_end_ptr + u_offs, mask=mask, other=0.0).to(f)
    else:
        carry = tl.zeros([BLOCK_M, BLOCK_C], f)
    gs_offs = _offsets(rows, cols, HW, dN, dC, dP, D_FLAT)
    for i in range(0, S - n_bn):
        grad = _reverse_step(g_ptr, gs_ptr, S - 1 - i, sS, dS, offs, gs_offs, mask, carry, HAS_GS)
        carry = leak * grad
    for i in range(0, n_bn):
        t = n_bn - 1 - i
        grad = _reverse_step(g_ptr, gs_ptr, t, sS, dS, offs, gs_offs, mask, carry, HAS_GS)
        carry = leak * grad
        xhat = _xhat(_load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr)
        at = part_ptr + tl.program_id(0) * K + t * C + cols
        tl.store(at, tl.sum(grad, axis=0), mask=cols < C)
        tl.store(at + tl.num_programs(0) * K, tl.sum(grad * xhat, axis=0), mask=cols < C)
    if HAS_U0:  # dL/du0 = leak * dL/dI[0]
        tl.store(gu0_ptr + u_offs, carry, mask=mask)


@triton.jit
def _replay_step(
    u,
    current,
    compact_ptr,
    g_ptr,
    t,
    sS,
    offs,
    mask,
    leak,
    theta,
    theta_neg,
    p0,
    p1,
    KIND: tl.constexpr,
    NEG: tl.constexpr,
):
    """Charge, write ds/du of step t into g, reset with the saved spike."""
    u = u * leak + current
    at = tl.cast(t, tl.int64) * sS + offs
    tl.store(g_ptr + at, _slope(u, theta, theta_neg, p0, p1, KIND, NEG), mask=mask)
    spike = tl.load(compact_ptr + at, mask=mask, other=0)
    return _replay_reset(u, spike, theta, theta_neg, NEG)


@triton.jit
def _reverse_step(g_ptr, gs_ptr, t, sS, dS, offs, gs_offs, mask, carry, HAS_GS: tl.constexpr):
    """dL/dI[t] = dL/ds[t] * slope[t] + carry (carry: leak * dL/dI[t+1]), written over the slope."""
    at = tl.cast(t, tl.int64) * sS + offs
    if HAS_GS:
        slope = tl.load(g_ptr + at, mask=mask, other=0.0)
        grad_spike = tl.load(gs_ptr + tl.cast(t, tl.int64) * dS + gs_offs, mask=mask, other=0.0)
        grad = slope * grad_spike.to(slope.dtype) + carry
    else:  # no gradient reaches the spikes: only the membrane's carries on
        grad = carry
    tl.store(g_ptr + at, grad, mask=mask)
    return grad


@triton.jit
def _bn_grad_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    sums_ptr,
    n_bn,
    M,
    HW,
    C,
    K,
    sS,
    sN,
    sC,
    sP,
    X_FLAT: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dL/dx of timestep program_id(2) from dL/dI in g, in gx's dtype. sums = [sum dI, sum dI * xhat]
    per (timestep, channel), over the batch. Steps t >= n_bn are only cast."""
    rows, cols, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    t = tl.program_id(2)
    f = g_ptr.dtype.element_ty
    offs = _offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    grad = _load_step(g_ptr, t, sS, offs, mask, f)
    if t < n_bn:
        scale = _channel_vector(weight_ptr, t, cols, C, f) * _channel_vector(invstd_ptr, t, cols, C, f)
        if TRAINING:  # the batch statistics depend on x too
            xhat = _xhat(_load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr)
            count = tl.cast(M, f)
            mean_grad = _div(_channel_vector(sums_ptr, t, cols, C, f), count)
            mean_grad_xhat = _div(_channel_vector(sums_ptr + K, t, cols, C, f), count)
            grad = scale * (grad - mean_grad - xhat * mean_grad_xhat)
        else:
            grad = grad * scale
    tl.store(gx_ptr + tl.cast(t, tl.int64) * sS + offs, grad.to(gx_ptr.dtype.element_ty), mask=mask)


# The environment variable is read when the kernels are decorated (at import), not at launch.
_INTERPRETED = type(_lif_forward_kernel).__name__ == "InterpretedFunction"
if _INTERPRETED:
    # The interpreter runs each program as numpy calls on whole tiles: few, large tiles are what is fast
    # there (the tests' networks would take minutes with the GPU's tile sizes).
    _TILE, _MIN_PROGRAMS, _MAX_BLOCK_C, _FINISH_BLOCK_K = 1 << 15, 1, 1 << 12, 1 << 12


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


def forward(x, u0, params, bn, keep_spikes: bool):
    """BN of the first ``bn.steps`` steps of ``x``, then LIF over all steps -> (spikes, compact, u, mean,
    invstd); see the module docstring and models/lif_torch.py."""
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
    kind, surrogate_params = _surrogate_args(params.surrogate)
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


def _surrogate_args(surrogate):
    """(kind, (p0, p1)) of a models.surrogates.Surrogate for the kernels."""
    if surrogate.name not in _SURROGATES:
        raise ValueError(f"neuron_backend 'triton' has no kernel for surrogate '{surrogate.name}'")
    kind, names = _SURROGATES[surrogate.name]
    values = tuple(float(surrogate.params[name]) for name in names) + (0.0, 0.0)
    return kind, values[:2]


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
