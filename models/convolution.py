"""Convolution and pooling layers with passes of our own, where PyTorch's cost time or memory.

``conv2d`` is ``F.conv2d`` (same arguments, same result up to float rounding, autograd through it); for
stride-1, ungrouped convolutions with numeric padding it reformulates dilated ones, in two steps:

1. Only the taps that overlap the map (``tap_crop``). Tap (i, j) reads input row y + i*d - p for output
   row y; the taps whose reads all land in the padding are the kernel's outer rows / columns (as many
   on each side: the padding is symmetric), so the convolution runs with the weight cropped to the
   others and the padding reduced by d per dropped tap (the input trimmed where that would be
   negative). Where only the centre tap is left (DeepLab's 3x3, d=12 on a map of 12x12 or less) it is a
   1x1 convolution with dilation 1: a GEMM. Taken wherever it drops a tap, on every device and dtype:
   it removes only products with zeros. Forward and backward (autograd through the weight's slice: the
   dropped taps get a zero gradient, exactly theirs; ``conv_backward`` crops the same way).
   On this project's CPU (fp32, dl-vgg9's atrous layer at T=10, batch 4, maps of 8x8 and 12x12) it
   changed nothing measurable: oneDNN already skips most of the padding. It does not apply at either
   GPU shape below (all taps overlap there); on a GPU it is unmeasured.
2. Dilated as dense, over the dilation's phases (``phase_conv2d``, space-to-batch). With p = m*d, output
   row y = r + d*u reads rows r + d*(u + i - m): phase r of the output (rows r, r+d, ...) is a dense
   convolution, padding m, of phase r of the input. The input, zero-filled up to multiples of d, is
   split into its d*d phase sub-images stacked along the batch, one dense convolution runs over all of
   them, and its output is interleaved back and cropped to the true size. Taken after step 1 where a
   dilation > 1 is left, p % d == 0 on both axes (else the dilated convolution runs as it is) and
   ``dilated_strategy`` says so (the switch ``DILATED_AS_DENSE``): by default only on CUDA in bf16 /
   fp16, autocast included (``conv2d`` then casts input, weight and bias itself, as autocast would).
   This covers dl-vgg9's d=2 layers as well as its atrous one.

Why step 2, and what is not known. Measured on an H200 (torch 2.11, CUDA 13): under bf16 autocast cuDNN
runs DeepLab's atrous layer (3x3, d=12, p=12; a 16x16 map at 64x64 input, ~50x87 at DDD17's 200x346)
with ``conv2d_grouped_direct_kernel``: 210 ms per dl-vgg9 training step at 64x64 (81 % of the GPU time),
and at DDD17's shape (T=20, batch 8) a bf16 step 14x slower than fp32 (5.59 s vs 0.393 s). A dense
3x3 convolution should get cuDNN's ordinary kernels. UNMEASURED: nobody has run step 2 on a GPU yet,
neither its speed (compare ``DILATED_AS_DENSE['cuda-lowp'] = False`` against the default) nor its
accuracy there. Its costs: the phases fill the map up to multiples of d (16x16 at d=12: 24x24, 2.25x
the positions; 50x87: 60x96, 1.32x), which the dense convolution computes and then drops; four more
ops each way, all copies (zero fill, split, interleave, crop; about five kernels each way: a positive
padding fills, then copies; counted in ``tests/test_convolution.py``); and the convolution saves the
phases for backward (2.25x / 1.32x the bf16 input autocast's convolution would keep). On CPU, where
step 2 is off by default, oneDNN's bf16 weight gradient over the many small phase images is ~2 % off
(batch 2) to 8 % (batch 32), against ~0.3-0.7 % for the dilated convolution: its reduction over the
batch is not fp32. Whether cuDNN's is must be checked with the speed: ``tests/test_convolution.py``'s
CUDA test (skipped without a GPU, never run yet) checks both the kernels and the errors at the two shapes.

cuDNN's algorithm choice: ``torch.backends.cudnn.benchmark`` is not turned on, here or anywhere (it is
PyTorch's default, off). Benchmark mode times the algorithms for every new shape; in the measurement at
DDD17's input it did not finish within 120 s, and the event-camera inputs bring new shapes. Step 2 works
on the heuristic choice instead, by handing cuDNN a convolution its heuristics serve well.

``Conv2d`` has one more special case, in backward: atrous kernels wider than their input (training
outside autocast, where step 2 is off: fp32). DeepLab's atrous layer on a 16x16 map spans 25 pixels:
most of each outer tap lands in the padding. For such a convolution oneDNN (PyTorch's CPU backend,
v3.12) computes the weight gradient on a generic path that needs ~77 MB of scratch for dl-vgg9 at T=10,
batch 4 (independent of the batch size: it is the peak of the whole training step) and twice the time
of the taps' real work. We compute that weight gradient by hand instead (``tap_weight_grad``): one
matrix product per tap over the output positions where the tap lands inside the input, on
channels-last views (no im2col). On this project's CPU: 64 ms and 24 MB (the 9.4 MB gradient included)
instead of 129 ms and 86 MB. It skips the taps step 1 drops, so the two agree; the input's gradient and
the forward take step 1 (at 16x16 no tap is dropped: the same oneDNN calls as before step 1 existed).
The input is kept for backward in one byte where it is spikes. ``tests/test_convolution.py`` checks all
of this against PyTorch's convolution in float64.

``AvgPool2d`` keeps nothing for backward (its gradient depends only on the input's shape; PyTorch
keeps the input, which memory-saving mode's replay would store as float spikes).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .spikes import restored, storable

# Where dilated convolutions run as dense ones over their phases (step 2), keyed by device type, with
# '-lowp' for bf16 / fp16 (autocast's dtype where it is on). A missing key is off.
DILATED_AS_DENSE = {"cuda-lowp": True}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _autocasts(tensor) -> bool:
    """True where autocast is on for the tensor's device and would cast it (floating, not float64)."""
    return (
        torch.is_autocast_enabled(tensor.device.type) and tensor.is_floating_point() and tensor.dtype != torch.float64
    )


def _autocast(tensor):
    """The tensor as autocast hands it to a convolution (unchanged where autocast is off or passes it)."""
    if tensor is None or not _autocasts(tensor):
        return tensor
    return tensor.to(torch.get_autocast_dtype(tensor.device.type))


def dilated_strategy(x) -> str:
    """'phases' where a dilated convolution of ``x`` runs as a dense one over its phases, else 'dilated'."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if _autocasts(x) else x.dtype
    key = f"{device}-lowp" if dtype in LOW_PRECISION else device
    return "phases" if DILATED_AS_DENSE.get(key, False) else "dilated"


# ---- Step 1: only the taps that overlap the map. ----


def overlapping_taps(kernel: int, padding: int, dilation: int, size: int):
    """(first, last): the taps along one axis whose reads land inside the input (first > last: none).

    Tap i reads rows i*d - p .. i*d - p + out - 1 (out: the output's size); it overlaps the input's rows
    0 .. size-1 iff its last read is >= 0 and its first <= size - 1. Both bounds move with i, so the
    overlapping taps are one run.
    """
    out = size + 2 * padding - dilation * (kernel - 1)
    first = max(0, -((out - 1 - padding) // dilation))  # ceil((p - out + 1) / d)
    last = min(kernel - 1, (padding + size - 1) // dilation)
    return first, last


class TapCrop(NamedTuple):
    """The convolution over the overlapping taps: the taps kept, and that convolution's arguments."""

    rows: slice
    cols: slice
    padding: tuple  # p - first*d per axis, at least 0
    trim: tuple  # input rows / columns dropped at each end where p - first*d < 0
    dilation: tuple  # 1 along an axis with one tap left

    def drops_taps(self, weight) -> bool:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start) != tuple(weight.shape[-2:])

    def inputs(self, x):
        (th, tw), (h, w) = self.trim, x.shape[-2:]
        return x[..., th : h - th, tw : w - tw] if th or tw else x

    def weight(self, weight):
        return weight[:, :, self.rows, self.cols]

    def grad_input(self, grad):
        """dL/dx from dL/d(trimmed x): zero on the trimmed rows and columns (never read)."""
        (th, tw) = self.trim
        return F.pad(grad, (tw, tw, th, th)) if th or tw else grad

    def grad_weight(self, grad, weight):
        """dL/dweight from the kept taps' gradient: zero on the dropped taps (never read inside the input)."""
        full = torch.zeros_like(weight)  # keeps the weight's memory format
        full[:, :, self.rows, self.cols] = grad
        return full


def tap_crop(kernel, padding, dilation, in_hw) -> Optional[TapCrop]:
    """The taps of a stride-1 convolution that overlap the input; None where the convolution is
    degenerate (an empty output, or no tap overlapping: left to F.conv2d)."""
    axes = []
    for k, p, d, size in zip(kernel, padding, dilation, in_hw):
        first, last = overlapping_taps(k, p, d, size)
        if first > last or size + 2 * p - d * (k - 1) < 1:
            return None
        # By the padding's symmetry tap k-1-i overlaps where tap i does: as many dropped at each end.
        new_padding = p - first * d
        axes.append((slice(first, last + 1), max(new_padding, 0), max(-new_padding, 0), d if last > first else 1))
    (rows, ph, th, dh), (cols, pw, tw, dw) = axes
    return TapCrop(rows, cols, (ph, pw), (th, tw), (dh, dw))


# ---- Step 2: dilated as dense, over the phases. ----


def _channels_last(x) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _five_d(x):
    """[N, C, H, W] as [N, A, H, W, B], (A, B) = (C, 1), or (1, C) for channels-last: a view whose
    copies stay in the input's memory format."""
    return x.permute(0, 2, 3, 1).unsqueeze(1) if _channels_last(x) else x.unsqueeze(-1)


def _four_d(x5, channels_last: bool):
    return x5.squeeze(1).permute(0, 3, 1, 2) if channels_last else x5.squeeze(-1)


def space_to_batch(x, block):
    """[N, C, H, W] -> [bh*bw*N, C, ceil(H/bh), ceil(W/bw)]: batch slot (r*bw + c)*N + n holds rows
    r, r + bh, ... and columns c, c + bw, ... of image n, zero past the input. One copy (two where H or
    W is not a multiple of the block: the zero fill), in x's memory format."""
    (bh, bw), (n, _, h, w) = block, x.shape
    hs, ws = -(-h // bh), -(-w // bw)
    x5 = _five_d(x)
    if (hs * bh, ws * bw) != (h, w):
        x5 = F.pad(x5, (0, 0, 0, ws * bw - w, 0, hs * bh - h))
    a, b = x5.shape[1], x5.shape[4]
    # Row u*bh + r of the image is row u of phase r: split each spatial axis, move the phases first.
    phases = x5.reshape(n, a, hs, bh, ws, bw, b).permute(3, 5, 0, 1, 2, 4, 6)
    return _four_d(phases.reshape(bh * bw * n, a, hs, ws, b), _channels_last(x))


def batch_to_space(y, block, out_hw):
    """``space_to_batch``'s inverse layout: [bh*bw*N, C, Hs, Ws] -> [N, C, H, W], cropped to ``out_hw``
    (the phases' surplus). One copy, two where it crops."""
    (bh, bw), (h, w), channels_last = block, out_hw, _channels_last(y)
    y5 = _five_d(y)
    m, a, hs, ws, b = y5.shape
    n = m // (bh * bw)
    image = y5.reshape(bh, bw, n, a, hs, ws, b).permute(2, 3, 4, 0, 5, 1, 6).reshape(n, a, hs * bh, ws * bw, b)
    if (hs * bh, ws * bw) != (h, w):
        # A dense copy (later layers view it by timestep); negative padding crops in one op, forward
        # and backward, where slicing and .contiguous() take three.
        image = F.pad(image, (0, 0, 0, w - ws * bw, 0, h - hs * bh))
    return _four_d(image, channels_last)


def phase_conv2d(inputs, weight, bias, padding, dilation):
    """``F.conv2d(inputs, weight, bias, 1, padding, dilation)`` as one dense convolution over the
    dilation's phases; needs padding % dilation == 0 on both axes."""
    assert all(p % d == 0 for p, d in zip(padding, dilation)), (padding, dilation)
    out_hw = [
        size + 2 * p - d * (k - 1) for size, p, d, k in zip(inputs.shape[-2:], padding, dilation, weight.shape[-2:])
    ]
    dense_padding = [p // d for p, d in zip(padding, dilation)]
    out = F.conv2d(space_to_batch(inputs, dilation), weight, bias, 1, dense_padding)
    return batch_to_space(out, dilation, out_hw)


# ---- The two steps together. ----


class ConvPlan(NamedTuple):
    crop: Optional[TapCrop]  # None: every tap overlaps
    padding: tuple
    dilation: tuple
    phases: bool


def conv_plan(inputs, weight, stride, padding, dilation, groups) -> Optional[ConvPlan]:
    """How ``conv2d`` runs ``F.conv2d(inputs, weight, ...)``; None: as F.conv2d itself."""
    if _pair(stride) != (1, 1) or groups != 1 or isinstance(padding, str):
        return None
    padding, dilation = _pair(padding), _pair(dilation)
    taps = tap_crop(weight.shape[-2:], padding, dilation, inputs.shape[-2:])
    if taps is None:
        return None
    crop = taps if taps.drops_taps(weight) else None
    padding, dilation = taps.padding, taps.dilation  # unchanged but for dilation 1 where one tap is left
    phases = (
        max(dilation) > 1
        and all(p % d == 0 for p, d in zip(padding, dilation))
        and dilated_strategy(inputs) == "phases"
    )
    return ConvPlan(crop, padding, dilation, phases) if crop is not None or phases else None


def conv2d(inputs, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` (autocast included) through steps 1 and 2 where they apply (``conv_plan``)."""
    plan = conv_plan(inputs, weight, stride, padding, dilation, groups)
    if plan is None:
        return F.conv2d(inputs, weight, bias, stride, padding, dilation, groups)
    if plan.crop is not None:  # before autocast's casts, which then copy only the taps kept
        inputs, weight = plan.crop.inputs(inputs), plan.crop.weight(weight)
    inputs, weight, bias = _autocast(inputs), _autocast(weight), _autocast(bias)
    if plan.phases:
        return phase_conv2d(inputs, weight, bias, plan.padding, plan.dilation)
    return F.conv2d(inputs, weight, bias, 1, plan.padding, plan.dilation)


# ---- fp32 training: the atrous weight gradient by taps. ----


def kernel_exceeds_input(weight: torch.Tensor, dilation, in_hw) -> bool:
    """True where the dilated kernel is wider (or taller) than the input it slides over."""
    return any((k - 1) * d + 1 > size for k, d, size in zip(weight.shape[-2:], dilation, in_hw))


def tap_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, kernel, padding, dilation) -> torch.Tensor:
    """dL/dweight of a stride-1, ungrouped convolution as one product per tap over its valid positions.

    With output position (y, x) and tap (i, j), the input read is (y + i*dil - pad, x + j*dil - pad);
    positions where it falls in the zero padding add nothing, so each tap needs only the rectangle of
    outputs whose reads are inside the input: dW[:, :, i, j] = G[rect]^T X[rect shifted].
    """
    c_out, c_in = grad_out.shape[1], inputs.shape[1]
    (h_out, w_out), (h_in, w_in) = grad_out.shape[-2:], inputs.shape[-2:]
    grad_rows = grad_out.permute(0, 2, 3, 1)  # [N, H, W, C]: a view of a channels-last tensor
    input_rows = inputs.permute(0, 2, 3, 1)
    grad_weight = grad_out.new_zeros(c_out, kernel[0], kernel[1], c_in)
    for i in range(kernel[0]):
        dy = i * dilation[0] - padding[0]
        y0, y1 = max(0, -dy), min(h_out, h_in - dy)
        for j in range(kernel[1]):
            dx = j * dilation[1] - padding[1]
            x0, x1 = max(0, -dx), min(w_out, w_in - dx)
            if y0 >= y1 or x0 >= x1:
                continue  # the tap never leaves the padding
            g = grad_rows[:, y0:y1, x0:x1].reshape(-1, c_out)
            x = input_rows[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx].reshape(-1, c_in)
            torch.mm(g.t(), x, out=grad_weight[:, i, j])
    return grad_weight.permute(0, 3, 1, 2)  # [C_out, C_in, kh, kw], channels-last like the weight's


def _by_taps(weight, stride, groups, dilation, inputs):
    """Whether the weight's gradient is ``tap_weight_grad``'s: on the CPU only, where it replaces oneDNN's
    generic path (on CUDA it would be ~30 small kernels where cuDNN runs one)."""
    return (
        inputs.device.type == "cpu"
        and tuple(stride) == (1, 1)
        and groups == 1
        and kernel_exceeds_input(weight, dilation, inputs.shape[-2:])
    )


def conv_backward(grad_out, inputs, weight, bias, stride, padding, dilation, groups, mask):
    """(dL/dinput, dL/dweight, dL/dbias) of ``F.conv2d``; ``mask`` says which are wanted (else None).

    The weight's gradient by ``tap_weight_grad`` where the kernel is wider than the input (CPU); the rest by
    PyTorch's backward of the convolution over the overlapping taps (step 1; no step 2 here).
    """
    wants_input, wants_weight, wants_bias = mask
    grad_weight = None
    if wants_weight and _by_taps(weight, stride, groups, dilation, inputs):
        grad_weight, wants_weight = tap_weight_grad(grad_out, inputs, weight.shape[-2:], padding, dilation), False
    if not (wants_input or wants_weight or wants_bias):
        return None, grad_weight, None
    bias_sizes = None if bias is None else list(bias.shape)
    plan = conv_plan(inputs, weight, stride, padding, dilation, groups)
    crop = None if plan is None else plan.crop
    if crop is not None:
        inputs, kept, padding, dilation = crop.inputs(inputs), crop.weight(weight), plan.padding, plan.dilation
    grad_input, grad_kept, grad_bias = torch.ops.aten.convolution_backward(
        grad_out,
        inputs,
        weight if crop is None else kept,
        bias_sizes,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [wants_input, wants_weight, wants_bias],
    )
    if crop is not None:
        grad_input = None if grad_input is None else crop.grad_input(grad_input)
        grad_kept = None if grad_kept is None else crop.grad_weight(grad_kept, weight)
    return grad_input, grad_weight if grad_weight is not None else grad_kept, grad_bias


class _Conv2dFunction(torch.autograd.Function):
    """``conv2d`` whose backward is ``conv_backward``, keeping spikes in one byte."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, stride, padding, dilation, groups):
        stored_inputs, ctx.input_dtype = storable(inputs)  # spikes in one byte
        ctx.save_for_backward(stored_inputs, weight, bias)
        ctx.conv = stride, padding, dilation, groups
        return conv2d(inputs, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        stored_inputs, weight, bias = ctx.saved_tensors
        inputs = restored(stored_inputs, ctx.input_dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        return (*conv_backward(grad_out, inputs, weight, bias, *ctx.conv, mask), None, None, None, None)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) computed by ``conv2d`` (steps 1 and 2), and in
    training by ``_Conv2dFunction`` where its backward applies: an atrous kernel wider than its input,
    outside autocast (whose casts that function would not replay) and where step 2 is off."""

    def forward(self, x):
        if self.padding_mode != "zeros":
            return super().forward(x)
        if (
            torch.is_grad_enabled()
            and isinstance(self.padding, tuple)
            and not torch.is_autocast_enabled(x.device.type)
            and dilated_strategy(x) == "dilated"
            and _by_taps(self.weight, self.stride, self.groups, self.dilation, x)
        ):
            return _Conv2dFunction.apply(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _AvgPool2dFunction(torch.autograd.Function):
    """``F.avg_pool2d`` (zero padding counted, floor mode) that keeps only its input's shape and layout."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):
        ctx.shape, ctx.args = x.shape, (kernel, stride, padding)
        ctx.layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        return F.avg_pool2d(x, kernel, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        shape_only = torch.empty(
            ctx.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=ctx.layout
        )  # read for its size and layout, never its values
        grad = torch.ops.aten.avg_pool2d_backward(grad_out, shape_only, *ctx.args, False, True, None)
        return grad, None, None, None


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose backward keeps no activations (for the default options the network uses)."""

    def forward(self, x):
        if (
            torch.is_grad_enabled()
            and x.requires_grad
            and not self.ceil_mode
            and self.count_include_pad
            and self.divisor_override is None
        ):
            return _AvgPool2dFunction.apply(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)
