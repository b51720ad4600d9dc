"""Convolution and pooling layers with backward passes of our own, where PyTorch's cost memory.

``AvgPool2d`` keeps nothing for backward (its gradient depends only on the input's shape; PyTorch
keeps the input, which memory-saving mode's replay would store as float spikes).

``Conv2d`` has one special case in backward: atrous kernels wider than their input.

DeepLab's atrous layer (3x3, dilation 12) runs on a 16x16 map at 64x64 input: its dilated kernel spans
25 pixels, more than the map, so most of each outer tap lands in the padding. For such a convolution
oneDNN (PyTorch's CPU backend, v3.12) computes the weight gradient on a generic path that needs ~77 MB of
scratch for dl-vgg9 at T=10, batch 4 (independent of the batch size: it is the peak of the whole training
step) and twice the time of the taps' real work. We compute that weight gradient by hand instead: one
matrix product per tap over the output positions where the tap lands inside the input, on channels-last
views (no im2col). On this project's CPU: 64 ms and 24 MB (the 9.4 MB gradient included) instead of
129 ms and 86 MB. Every other convolution, and every other gradient, is oneDNN's: it is faster there
(``tests/test_convolution.py`` checks the taps against PyTorch's backward and a brute-force sum).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .storage import restored, storable


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
            x = input_rows[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx].reshape(-1, c_in)
            torch.mm(g.t(), x, out=grad_weight[:, i, j])
    return grad_weight.permute(0, 3, 1, 2)  # [C_out, C_in, kh, kw], channels-last like the weight's


def _by_taps(weight, stride, groups, dilation, in_hw):
    return tuple(stride) == (1, 1) and groups == 1 and kernel_exceeds_input(weight, dilation, in_hw)


def conv_backward(grad_out, inputs, weight, bias, stride, padding, dilation, groups, mask):
    """(dL/dinput, dL/dweight, dL/dbias) of ``F.conv2d``; ``mask`` says which are wanted (else None)."""
    wants_input, wants_weight, wants_bias = mask
    bias_sizes = None if bias is None else list(bias.shape)
    if wants_weight and _by_taps(weight, stride, groups, dilation, inputs.shape[-2:]):
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, inputs, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            [wants_input, False, wants_bias]) if (wants_input or wants_bias) else (None, None, None)
        return grad_input, tap_weight_grad(grad_out, inputs, weight.shape[-2:], padding, dilation), grad_bias
    return torch.ops.aten.convolution_backward(grad_out, inputs, weight, bias_sizes, stride, padding, dilation,
                                               False, [0, 0], groups, list(mask))


class _Conv2dFunction(torch.autograd.Function):
    """``F.conv2d`` whose backward is ``conv_backward``."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, stride, padding, dilation, groups):
        stored_inputs, ctx.input_dtype = storable(inputs)  # spikes in one byte
        ctx.save_for_backward(stored_inputs, weight, bias)
        ctx.conv = stride, padding, dilation, groups
        return F.conv2d(inputs, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        stored_inputs, weight, bias = ctx.saved_tensors
        inputs = restored(stored_inputs, ctx.input_dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        return (*conv_backward(grad_out, inputs, weight, bias, *ctx.conv, mask), None, None, None, None)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that takes ``conv_backward``'s special case in training.

    Only where it applies (an atrous kernel wider than its input) and outside autocast, whose casts the
    autograd function would not replay; elsewhere it is ``nn.Conv2d`` itself.
    """

    def forward(self, x):
        if (torch.is_grad_enabled() and self.padding_mode == 'zeros' and isinstance(self.padding, tuple)
                and not torch.is_autocast_enabled(x.device.type)
                and _by_taps(self.weight, self.stride, self.groups, self.dilation, x.shape[-2:])):
            return _Conv2dFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                         self.groups)
        return super().forward(x)


class _AvgPool2dFunction(torch.autograd.Function):
    """``F.avg_pool2d`` (zero padding counted, floor mode) that keeps only its input's shape and layout."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):
        ctx.shape, ctx.args = x.shape, (kernel, stride, padding)
        ctx.layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous() else torch.contiguous_format)
        return F.avg_pool2d(x, kernel, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        shape_only = torch.empty(ctx.shape, dtype=grad_out.dtype, device=grad_out.device,
                                 memory_format=ctx.layout)  # read for its size and layout, never its values
        grad = torch.ops.aten.avg_pool2d_backward(grad_out, shape_only, *ctx.args, False, True, None)
        return grad, None, None, None


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose backward keeps no activations (for the default options the network uses)."""

    def forward(self, x):
        if (torch.is_grad_enabled() and x.requires_grad and not self.ceil_mode and self.count_include_pad
                and self.divisor_override is None):
            return _AvgPool2dFunction.apply(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)
