"""BNTT's batch statistics per (timestep, channel), and the running statistics' update, as two kernels.

The mean and the variance come from shifted, chunked reductions merged with Chan et al.'s parallel
formula: relative to a shift (x at the first row) and centred tile by tile, they stay accurate when a
channel's mean is large against its spread (a plain sum of squares would cancel).
"""

import triton
import triton.language as tl

from .primitives import div, load_step, offsets, sqrt


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
    shift = load_step(x_ptr, t, sS, cols * sC, cols < C, f)
    start = tl.program_id(0) * chunk_rows
    end = tl.minimum(start + chunk_rows, M)
    mean = tl.zeros([BLOCK_C], f)
    m2 = tl.zeros([BLOCK_C], f)
    for first in range(start, end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & (cols < C)[None, :]
        x = load_step(x_ptr, t, sS, offsets(rows, cols, HW, sN, sC, sP, X_FLAT), mask, f)
        x = tl.where(mask, x - shift[None, :], 0.0)
        n_tile = tl.cast(tl.minimum(end - first, BLOCK_M), f)
        n_before = tl.cast(first - start, f)  # the earlier tiles are full
        tile_mean = div(tl.sum(x, axis=0), n_tile)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        delta = tile_mean - mean
        mean += delta * div(n_tile, n_before + n_tile)
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * div(n_before * n_tile, n_before + n_tile)
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
    tl.store(invstd_ptr + k, div(one, sqrt(var + tl.load(consts_ptr))), mask=kmask)


@triton.jit
def _combine_chunks(part_ptr, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS: tl.constexpr):
    """Batch mean and biased variance from the chunks' means (relative to the shift) and centred sums
    of squares (Chan et al.): M2 = sum_i M2_i + sum_i n_i * (mean_i - mean)^2. CHUNKS chunks at a time."""
    total = tl.zeros(k.shape, f)
    for first in range(0, n_chunks, CHUNKS):
        count, chunk_mean, offs, mask = _chunk_tile(part_ptr, first, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS)
        total += tl.sum(count * chunk_mean, axis=0)
    mean = div(total, tl.cast(M, f))
    m2 = tl.zeros(k.shape, f)
    for first in range(0, n_chunks, CHUNKS):
        count, chunk_mean, offs, mask = _chunk_tile(part_ptr, first, k, kmask, K, M, n_chunks, chunk_rows, f, CHUNKS)
        shift = chunk_mean - mean[None, :]
        chunk_m2 = tl.load(part_ptr + n_chunks * K + offs, mask=mask, other=0.0)
        m2 += tl.sum(chunk_m2 + count * shift * shift, axis=0)
    mean += tl.load(part_ptr + 2 * n_chunks * K + k, mask=kmask, other=0.0)
    return mean, div(m2, tl.cast(M, f))


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
    unbiased = div(var * tl.cast(M, f), tl.cast(M - 1, f))
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
