"""Device helpers shared by the Triton kernels: correctly rounded division and square root, and how a
program addresses its tile of neurons, a timestep and a per-(timestep, channel) vector.

Layout: timestep t, row (n, p = h * W + w) and channel c sit at ``t * sS + n * sN + p * sP + c * sC``
(models/triton/launch.py prepares the strides); offsets within one timestep are 32-bit, the time offset
64-bit.
"""

import triton
import triton.language as tl


@triton.jit
def div(a, b):
    """a / b correctly rounded (float32 ``/`` is approximate on NVIDIA GPUs; float64 ``/`` is IEEE)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt(a):
    """Correctly rounded square root (float32 ``tl.sqrt`` is approximate)."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def offsets(rows, cols, HW, sN, sC, sP, ROWS_FLAT: tl.constexpr):
    """[rows, cols] element offsets within one timestep. ROWS_FLAT: the rows (n, p) are evenly spaced
    (sN == HW * sP, e.g. channels-last), which spares an integer division."""
    if ROWS_FLAT:
        row_off = rows * sP
    else:
        row_off = (rows // HW) * sN + (rows % HW) * sP
    return row_off[:, None] + cols[None, :] * sC


@triton.jit
def tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C):
    """This program's rows, channels and the in-bounds mask of their tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return rows, cols, mask


@triton.jit
def load_step(ptr, t, sS, offs, mask, f):
    """Timestep t of a tensor as compute dtype f (the time offset in 64 bits: S steps may pass 2**31)."""
    return tl.load(ptr + tl.cast(t, tl.int64) * sS + offs, mask=mask, other=0.0).to(f)


@triton.jit
def channel_vector(ptr, t, cols, C, f):
    """Entries t * C + cols of a per-(timestep, channel) vector, as a [1, BLOCK_C] row."""
    return tl.load(ptr + t * C + cols, mask=cols < C, other=0.0).to(f)[None, :]


@triton.jit
def standardise(x, t, cols, C, mean_ptr, invstd_ptr):
    """(x - mean) * invstd of timestep t, per channel."""
    return (x - channel_vector(mean_ptr, t, cols, C, x.dtype)) * channel_vector(invstd_ptr, t, cols, C, x.dtype)


@triton.jit
def normalise(x, t, cols, C, mean_ptr, invstd_ptr, weight_ptr):
    """BN of timestep t without shift: (x - mean) * invstd * weight."""
    return standardise(x, t, cols, C, mean_ptr, invstd_ptr) * channel_vector(weight_ptr, t, cols, C, x.dtype)
