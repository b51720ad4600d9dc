"""Convolution and pooling layers with passes of our own, where PyTorch's cost time or memory.

``conv2d`` is ``F.conv2d`` (same arguments, same result up to float rounding, autograd through it); for
stride-1, ungrouped convolutions with numeric padding it reformulates dilated ones, in two steps:

1. Only the taps that overlap the map (``tap_crop``): taps whose reads all land in the padding are
   dropped and the padding reduced to match (where one tap is left, a 1x1 convolution). Exact on every
   device: it removes only products with zeros.
2. Dilated as dense, over the dilation's phases (``phase_conv2d``, space-to-batch): phase r of the
   output (rows r, r+d, ...) is a dense convolution of phase r of the input, so the d*d phases run as one
   dense convolution over a batch of sub-images. Where ``dilated_strategy`` says so: the model's
   ``dilated_as_dense`` setting, by default CUDA in bf16 / fp16, where cuDNN's kernel for the atrous layer
   is slow.

``Conv2d`` computes, on the CPU, the weight gradient of an atrous kernel wider than its input by hand
(``tap_weight_grad``: one matrix product per tap over the positions where it lands inside the input),
where oneDNN's generic path needs much more memory and time; it keeps its input in one byte where it
is spikes. ``AvgPool2d`` keeps nothing for backward (its gradient depends only on the input's shape).
Why each exists, with the measurements: docs/gpu.md (mixed precision) and docs/performance.md.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .spikes import restored, storable

# Where dilated convolutions run as dense ones over their phases (step 2): 'auto' on CUDA in bf16 / fp16
# (autocast's dtype where it is on), 'on' everywhere, 'off' nowhere. A model's setting: Conv2d.dense.
DENSE_CHOICES = ("auto", "on", "off")
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


def dilated_strategy(x, dense: str = "auto") -> str:
    """'phases' where a dilated convolution of ``x`` runs as a dense one over its phases, else 'dilated'."""
    if dense not in DENSE_CHOICES:
        raise ValueError(f"dilated_as_dense must be one of {DENSE_CHOICES}, got {dense!r}")
    if dense != "auto":
        return "phases" if dense == "on" else "dilated"
    dtype = torch.get_autocast_dtype(x.device.type) if _autocasts(x) else x.dtype
    return "phases" if x.device.type == "cuda" and dtype in LOW_PRECISION else "dilated"


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


def conv_plan(inputs, weight, stride, padding, dilation, groups, dense="auto") -> Optional[ConvPlan]:
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
        and dilated_strategy(inputs, dense) == "phases"
    )
    return ConvPlan(crop, padding, dilation, phases) if crop is not None or phases else None


def conv2d(inputs, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, dense="auto"):
    """``F.conv2d`` (autocast included) through steps 1 and 2 where they apply (``conv_plan``; ``dense``:
    where step 2 applies, see ``dilated_strategy``)."""
    plan = conv_plan(inputs, weight, stride, padding, dilation, groups, dense)
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
    outside autocast (whose casts that function would not replay) and where step 2 is off.
    ``dense`` (an execution setting, not state): where step 2 applies, see ``dilated_strategy``."""

    dense = "auto"

    def forward(self, x):
        if self.padding_mode != "zeros":
            return super().forward(x)
        if (
            torch.is_grad_enabled()
            and isinstance(self.padding, tuple)
            and not torch.is_autocast_enabled(x.device.type)
            and dilated_strategy(x, self.dense) == "dilated"
            and _by_taps(self.weight, self.stride, self.groups, self.dilation, x)
        ):
            return _Conv2dFunction.apply(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.dense)


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
