"""The LIF kernels: BNTT + charge / fire / reset over all S timesteps of a layer (forward), the replay
and reverse recurrence with BN's partial sums (backward), and dL/dx through BN (dx).

A program owns a tile of neurons, BLOCK_M rows (n, h, w) by BLOCK_C channels, and loops over the
timesteps inside, so the membrane stays in registers for the whole block of time: one launch for all S
steps, where the torch backend launches a few small kernels per step.

Reset (constexpr HARD_RESET): by subtraction, ``u -= theta * s``, or hard, ``u *= 1 - |s|`` (to 0 after
any spike). In backward the spike in the reset is detached: the reverse recurrence carries
``leak * dL/du[t+1]`` into step t unchanged (subtraction) or only where step t did not spike (hard).

Numerics: spikes compare a correctly rounded ``u / theta`` with 1 (primitives.div), and the kernels are
compiled without FMA contraction, so ``leak * u + I`` rounds twice as torch's ``u.mul_(leak).add_(I)``
does: given the same currents the spikes are the torch backend's bit for bit. The membrane is float32
(float64 for float64 x) whatever x's dtype.
"""

import triton
import triton.language as tl

from .primitives import channel_vector, div, load_step, normalise, offsets, standardise, tile
from .surrogates import slope


@triton.jit
def _threshold(ptr, rows, cols, HW, tC, tP, mask, f):
    """The threshold tile (strides 0 for a layer-wise scalar); loaded once, used at every step."""
    offs = (rows % HW)[:, None] * tP + cols[None, :] * tC
    return tl.load(ptr + offs, mask=mask, other=1.0).to(f)


@triton.jit
def _reset(u, fired, theta, HARD_RESET: tl.constexpr):
    """u after a spike of one sign, ``fired`` in {0, 1} (u's dtype): minus theta, or to 0 (hard)."""
    if HARD_RESET:
        return u * (1.0 - fired)
    else:
        return u - theta * fired


@triton.jit
def _fire(u, current, leak, theta, theta_neg, NEG: tl.constexpr, HARD_RESET: tl.constexpr):
    """Charge, fire, reset; returns (u, spike) with spike in {-1, 0, 1}."""
    u = u * leak + current
    spike = (div(u, theta) > 1.0).to(u.dtype)
    u = _reset(u, spike, theta, HARD_RESET)
    if NEG:  # exclusive with a positive spike: u was above theta > 0 before the reset (or is 0 after it)
        negative = (div(u, theta_neg) > 1.0).to(u.dtype)
        u = _reset(u, negative, theta_neg, HARD_RESET)
        spike = spike - negative
    return u, spike


@triton.jit
def _replay_reset(u, spike, theta, theta_neg, NEG: tl.constexpr, HARD_RESET: tl.constexpr):
    """The forward's reset, from the saved spike (no recomputed comparison: the trajectory is exact)."""
    u = _reset(u, (spike > 0).to(u.dtype), theta, HARD_RESET)
    if NEG:
        u = _reset(u, (spike < 0).to(u.dtype), theta_neg, HARD_RESET)
    return u


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
    HARD_RESET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """All S timesteps of one tile: BN for t < n_bn, then charge / fire / reset. consts = (leak,)."""
    rows, cols, mask = tile(BLOCK_M, BLOCK_C, M, C)
    f = u_ptr.dtype.element_ty
    offs = offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    u_offs = offsets(rows, cols, HW, uN, uC, uP, U_FLAT)
    leak = tl.load(consts_ptr)
    theta = _threshold(theta_ptr, rows, cols, HW, tC, tP, mask, f)
    theta_neg = _threshold(theta_neg_ptr, rows, cols, HW, nC, nP, mask, f) if NEG else theta
    if HAS_U0:
        u = tl.load(u0_ptr + u_offs, mask=mask, other=0.0).to(f)
    else:
        u = tl.zeros([BLOCK_M, BLOCK_C], f)
    for t in range(0, n_bn):
        current = normalise(load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr, weight_ptr)
        u, spike = _fire(u, current, leak, theta, theta_neg, NEG, HARD_RESET)
        _store_spike(spikes_ptr, compact_ptr, t, sS, offs, mask, spike, KEEP)
    for t in range(n_bn, S):  # full propagation's tail (or every step without BN): no normalisation
        u, spike = _fire(u, load_step(x_ptr, t, sS, offs, mask, f), leak, theta, theta_neg, NEG, HARD_RESET)
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
    HARD_RESET: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile's backward through all S steps: slopes by replay into g, then dL/dI over them (reverse
    recurrence), with BN's per-tile partial sums and dL/du0. consts = (leak, p0, p1)."""
    rows, cols, mask = tile(BLOCK_M, BLOCK_C, M, C)
    f = g_ptr.dtype.element_ty
    offs = offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    u_offs = offsets(rows, cols, HW, uN, uC, uP, U_FLAT)
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
        current = normalise(load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr, weight_ptr)
        u = _replay_step(
            u, current, compact_ptr, g_ptr, t, sS, offs, mask, leak, theta, theta_neg, p0, p1, KIND, NEG, HARD_RESET
        )
    for t in range(n_bn, S):
        current = load_step(x_ptr, t, sS, offs, mask, f)
        u = _replay_step(
            u, current, compact_ptr, g_ptr, t, sS, offs, mask, leak, theta, theta_neg, p0, p1, KIND, NEG, HARD_RESET
        )
    # The reverse pass reads the slopes this program just wrote. Each element is written and read through
    # the same offsets (so by the same thread in the same layout); the barrier makes that hold whatever
    # layout the compiler picks for the two loops (once per program: negligible).
    tl.debug_barrier()
    # dL/dI[S-1] = dL/ds * slope + dL/du_end: the carried-in gradient enters with factor 1, not leak (hard
    # reset: 1 - |s[S-1]|, as any carry: u_end is the membrane after the last reset).
    if HAS_GU_END:
        carry = tl.load(gu_end_ptr + u_offs, mask=mask, other=0.0).to(f)
    else:
        carry = tl.zeros([BLOCK_M, BLOCK_C], f)
    gs_offs = offsets(rows, cols, HW, dN, dC, dP, D_FLAT)
    for i in range(0, S - n_bn):
        grad = _reverse_step(
            g_ptr, gs_ptr, compact_ptr, S - 1 - i, sS, dS, offs, gs_offs, mask, carry, HAS_GS, HARD_RESET
        )
        carry = leak * grad
    for i in range(0, n_bn):
        t = n_bn - 1 - i
        grad = _reverse_step(g_ptr, gs_ptr, compact_ptr, t, sS, dS, offs, gs_offs, mask, carry, HAS_GS, HARD_RESET)
        carry = leak * grad
        xhat = standardise(load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr)
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
    HARD_RESET: tl.constexpr,
):
    """Charge, write ds/du of step t into g, reset with the saved spike."""
    u = u * leak + current
    at = tl.cast(t, tl.int64) * sS + offs
    tl.store(g_ptr + at, slope(u, theta, theta_neg, p0, p1, KIND, NEG), mask=mask)
    spike = tl.load(compact_ptr + at, mask=mask, other=0)
    return _replay_reset(u, spike, theta, theta_neg, NEG, HARD_RESET)


@triton.jit
def _reverse_step(
    g_ptr,
    gs_ptr,
    compact_ptr,
    t,
    sS,
    dS,
    offs,
    gs_offs,
    mask,
    carry,
    HAS_GS: tl.constexpr,
    HARD_RESET: tl.constexpr,
):
    """dL/dI[t] = dL/ds[t] * slope[t] + carry, written over the slope. carry: leak * dL/dI[t+1] (or the
    carried-in dL/du_end), which a hard reset lets through only where step t did not spike."""
    at = tl.cast(t, tl.int64) * sS + offs
    if HARD_RESET:
        spike = tl.load(compact_ptr + at, mask=mask, other=0)
        carry = tl.where(spike == 0, carry, 0.0)
    if HAS_GS:
        ds = tl.load(g_ptr + at, mask=mask, other=0.0)
        grad_spike = tl.load(gs_ptr + tl.cast(t, tl.int64) * dS + gs_offs, mask=mask, other=0.0)
        grad = ds * grad_spike.to(ds.dtype) + carry
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
    rows, cols, mask = tile(BLOCK_M, BLOCK_C, M, C)
    t = tl.program_id(2)
    f = g_ptr.dtype.element_ty
    offs = offsets(rows, cols, HW, sN, sC, sP, X_FLAT)
    grad = load_step(g_ptr, t, sS, offs, mask, f)
    if t < n_bn:
        scale = channel_vector(weight_ptr, t, cols, C, f) * channel_vector(invstd_ptr, t, cols, C, f)
        if TRAINING:  # the batch statistics depend on x too
            xhat = standardise(load_step(x_ptr, t, sS, offs, mask, f), t, cols, C, mean_ptr, invstd_ptr)
            count = tl.cast(M, f)
            mean_grad = div(channel_vector(sums_ptr, t, cols, C, f), count)
            mean_grad_xhat = div(channel_vector(sums_ptr + K, t, cols, C, f), count)
            grad = scale * (grad - mean_grad - xhat * mean_grad_xhat)
        else:
            grad = grad * scale
    tl.store(gx_ptr + tl.cast(t, tl.int64) * sS + offs, grad.to(gx_ptr.dtype.element_ty), mask=mask)
