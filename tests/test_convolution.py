"""models/convolution.py against PyTorch's convolution: the hand-written weight gradient of atrous
convolutions wider than their input, the convolution over the overlapping taps only (step 1) and the
dilated convolution as a dense one over its phases (step 2), in float64 and under bf16 autocast."""

import contextlib
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.convolution import (
    Conv2d,
    _Conv2dFunction,
    conv2d,
    conv_backward,
    conv_plan,
    dilated_strategy,
    kernel_exceeds_input,
    overlapping_taps,
    phase_conv2d,
    space_to_batch,
    tap_weight_grad,
)


def reference_grads(conv, x, grad_out):
    """dL/dx, dL/dweight, dL/dbias of a plain nn.Conv2d with the same parameters (PyTorch's own backward)."""
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    ).double()
    plain.load_state_dict(conv.state_dict())
    x = x.detach().requires_grad_()
    params = [x, plain.weight] + ([plain.bias] if plain.bias is not None else [])
    return torch.autograd.grad(plain(x), params, grad_out)


@pytest.mark.parametrize(
    "size, dilation, bias, channels_last, kept",
    [
        ((6, 6), 4, True, True, (3, 3)),  # outer taps partly inside the input
        ((5, 7), 3, False, False, (3, 3)),  # not square, NCHW input
        ((4, 4), 12, True, True, (1, 1)),  # outer taps entirely in the padding: only the centre tap counts
    ],
)
def test_atrous_conv_gradients_equal_pytorchs(size, dilation, bias, channels_last, kept):
    torch.manual_seed(0)
    conv = Conv2d(5, 7, 3, padding=dilation, dilation=dilation, bias=bias).double()
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert kernel_exceeds_input(conv.weight, conv.dilation, size)
    x.requires_grad_()
    out = conv(x)
    assert out.grad_fn.name().startswith(_Conv2dFunction.__name__)  # the hand-written backward is used
    grad_out = torch.randn_like(out)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    grads, convs = convolutions_run(lambda: torch.autograd.grad(out, params, grad_out))
    for got, expected in zip(grads, reference_grads(conv, x, grad_out)):
        torch.testing.assert_close(got, expected)
    assert {shape for shape, _, _ in convs} == {kept}  # backward's (input's gradient) over the kept taps
    _, convs = convolutions_run(lambda: conv(x))
    assert {shape for shape, _, _ in convs} == {kept}  # and forward


def test_tap_weight_grad_equals_a_brute_force_sum():
    """dW[o, i, a, b] = sum over n, y, x of g[n, o, y, x] * input[n, i, y + a*d - p, x + b*d - p] (0 outside)."""
    torch.manual_seed(1)
    g, x = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    d = p = 3
    expected = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            for y in range(5):
                for xx in range(5):
                    yi, xi = y + a * d - p, xx + b * d - p
                    if 0 <= yi < 5 and 0 <= xi < 5:
                        expected[:, :, a, b] += g[:, :, y, xx].t() @ x[:, :, yi, xi]
    torch.testing.assert_close(tap_weight_grad(g, x, (3, 3), (p, p), (d, d)), expected)


def test_ordinary_convolutions_keep_pytorchs_backward():
    conv = Conv2d(4, 4, 3, padding=2, dilation=2)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    assert not kernel_exceeds_input(conv.weight, conv.dilation, (8, 8))
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"


def test_full_resolution_units_recompute_their_convolution():
    model = build_model(dict(arch="dl-vgg9", timesteps=2))
    assert [unit.recompute for unit in model.conv_units()] == [True, True] + [False] * 6
    fcn = build_model(dict(arch="fcn-vgg9", timesteps=2))
    assert [unit.recompute for unit in fcn.conv_units()][:3] == [True, True, False]


def saved_by(fn):
    """The tensors autograd keeps for backward while ``fn`` runs (outside any spike-compacting hook)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_keeps_nothing_and_has_pytorchs_gradient(stride):
    from models.convolution import AvgPool2d

    torch.manual_seed(2)
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, saved = saved_by(lambda: AvgPool2d(3, stride=stride, padding=1)(x))
    assert saved == []
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    x_ref = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(nn.functional.avg_pool2d(x_ref, 3, stride, 1), x_ref, grad_out)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)


def test_atrous_conv_keeps_its_spike_input_in_one_byte():
    """Even where no compact_spikes hook is active (memory-saving mode's replay stores through checkpoint's)."""
    try:
        from models.spikes import mark
    except ImportError:  # before the spike protocol moved out of the neuron module
        from models.neurons import mark_spikes as mark
    conv = Conv2d(4, 6, 3, padding=5, dilation=5)
    spikes = mark((torch.rand(2, 4, 6, 6) < 0.3).float().requires_grad_())
    _, saved = saved_by(lambda: conv(spikes))
    inputs = [t for t in saved if t.shape == spikes.shape]
    assert len(inputs) == 1 and inputs[0].dtype == torch.int8 and torch.equal(inputs[0].float(), spikes)


# ---- Step 1 (only the taps that overlap the map) and step 2 (dilated as dense, over the phases). ----


def test_overlapping_taps_are_those_reading_inside_the_input():
    """Against the definition: tap i reads row y + i*d - p for the outputs y; both ends of the range exact."""
    for k, d, size in itertools.product((1, 2, 3, 5), range(1, 7), range(1, 9)):
        for p in range(0, d * (k - 1) + 3):
            out = size + 2 * p - d * (k - 1)
            if out < 1:
                continue
            reading = [i for i in range(k) if any(0 <= y + i * d - p < size for y in range(out))]
            first, last = overlapping_taps(k, p, d, size)
            assert list(range(first, last + 1)) == reading, (k, d, p, size)


def convolutions_run(fn):
    """fn's result and the (weight shape, padding, dilation) of each convolution it runs, backward included."""
    aten = torch.ops.aten

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # (input, weight, bias, stride, padding, dilation, ...); backward has grad_out first
            shift = {aten.convolution: 0, aten.convolution_backward: 1}.get(func.overloadpacket)
            if shift is not None:
                weight, padding, dilation = args[1 + shift], args[4 + shift], args[5 + shift]
                log.append((tuple(weight.shape[-2:]), tuple(padding), tuple(dilation)))
            return func(*args, **(kwargs or {}))

    log = []
    with Log():
        out = fn()
    return out, log


def assert_conv_equal(conv_fn, size, kernel, padding, dilation, channels_last, bias=True, channels=(3, 4)):
    """conv_fn(x, weight, bias) against F.conv2d in float64: output, its layout, and the gradients of x,
    weight and bias. Returns the convolutions conv_fn ran (``convolutions_run``)."""
    torch.manual_seed(sum(size) + 7 * dilation)
    x = torch.randn(2, channels[0], *size, dtype=torch.float64)
    weight = torch.randn(channels[1], channels[0], kernel, kernel, dtype=torch.float64)
    if channels_last:
        x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    b = torch.randn(channels[1], dtype=torch.float64) if bias else None
    params = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    expected = F.conv2d(x, weight, b, 1, padding, dilation)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad_out)

    def forward_backward():
        out = conv_fn(x, weight, b)
        return out, torch.autograd.grad(out, params, grad_out)

    (out, grads), convs = convolutions_run(forward_backward)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    return convs


# (map size, kernel, padding, dilation, taps kept (rows, cols), step 2 possible, channels-last)
CASES = {
    "centre tap only: a 1x1 convolution": ((12, 12), 3, 12, 12, (1, 1), False, True),
    "centre tap only, not square": ((5, 7), 3, 8, 8, (1, 1), False, False),
    "outer taps overlap by one row": ((13, 13), 3, 12, 12, (3, 3), True, True),
    "one row of taps": ((5, 13), 3, 6, 6, (1, 3), True, False),
    "the middle 3 of 5 taps, then phases": ((6, 6), 5, 8, 4, (3, 3), True, True),
    "all taps overlap: DeepLab at 64x64": ((16, 16), 3, 12, 12, (3, 3), True, True),
    "all overlap, map not a multiple of d": ((9, 11), 3, 3, 3, (3, 3), True, False),
    "padding not a multiple of d: no phases": ((9, 10), 3, 5, 3, (3, 3), False, True),
    "one tap, its padding negative: input trimmed": ((4, 4), 3, 3, 4, (1, 1), False, False),
}


@pytest.mark.parametrize("case", CASES)
def test_conv2d_equals_pytorchs_convolution(case):
    size, kernel, padding, dilation, kept, phases, channels_last = CASES[case]
    convs = assert_conv_equal(  # step 2 forced on (by default it is on only for CUDA in bf16 / fp16)
        lambda x, w, b: conv2d(x, w, b, 1, padding, dilation, dense="on"),
        size,
        kernel,
        padding,
        dilation,
        channels_last,
    )
    # The convolutions run are those of the overlapping taps only (forward and backward), dense if step 2.
    expected_dilation = tuple(1 if k == 1 or phases else dilation for k in kept)
    assert {(shape, dil) for shape, _, dil in convs} == {(kept, expected_dilation)}


@pytest.mark.parametrize("case", CASES)
def test_conv_backward_equals_pytorchs(case):
    """conv_backward (used by the neurons' recomputing backward and Conv2d's): over the kept taps."""
    size, kernel, padding, dilation = CASES[case][:4]
    torch.manual_seed(3)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, weight, b, 1, padding, dilation)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (x, weight, b), grad_out)
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        got = conv_backward(
            grad_out, x.detach(), weight.detach(), b, (1, 1), (padding, padding), (dilation, dilation), 1, mask
        )
        for wanted, g, e in zip(mask, got, expected):
            assert (g is None) != wanted
            if wanted:
                torch.testing.assert_close(g, e)


def test_space_to_batch_puts_each_phase_in_its_batch_slot():
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    phases = space_to_batch(x, (3, 4))
    padded = F.pad(x, (0, 2, 0, 2))  # up to 9 x 12
    assert phases.shape == (3 * 4 * 2, 3, 3, 3)
    for r, c, n in itertools.product(range(3), range(4), range(2)):
        assert torch.equal(phases[(r * 4 + c) * 2 + n], padded[n, :, r::3, c::4])


@pytest.mark.parametrize(
    "size, dilation, padding, channels_last",
    [((7, 10), 2, 2, True), ((5, 5), 3, 3, False), ((11, 6), 5, 5, True), ((8, 9), 3, 6, False), ((6, 7), 2, 0, True)],
)
def test_phase_conv2d_is_the_dilated_convolution(size, dilation, padding, channels_last):
    assert_conv_equal(
        lambda x, w, b: phase_conv2d(x, w, b, (padding, padding), (dilation, dilation)),
        size,
        3,
        padding,
        dilation,
        channels_last,
        bias=dilation != 3,
    )


def test_phases_follow_the_setting_and_the_padding():
    x, weight = torch.randn(1, 2, 9, 9), torch.randn(2, 2, 3, 3)
    assert conv_plan(x, weight, 1, 2, 2, 1) is None  # auto: step 2 only on CUDA in bf16 / fp16
    assert conv_plan(x.bfloat16(), weight.bfloat16(), 1, 2, 2, 1) is None
    assert conv_plan(x, weight, 1, 2, 2, 1, "on").phases
    assert conv_plan(x.bfloat16(), weight.bfloat16(), 1, 2, 2, 1, "off") is None
    assert dilated_strategy(x, "auto") == "dilated" and dilated_strategy(x, "on") == "phases"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_plan(x, weight, 1, 2, 2, 1) is None
        assert conv_plan(x, weight, 1, 2, 2, 1, "on").phases
        assert conv_plan(x, weight, 1, 3, 2, 1, "on") is None  # padding not a multiple of the dilation
        assert conv_plan(x, weight, 2, 2, 2, 1, "on") is None  # strided
        assert conv_plan(x, weight, 1, 1, 1, 1, "on") is None  # not dilated
    with pytest.raises(ValueError, match="dilated_as_dense must be one of"):
        conv_plan(x, weight, 1, 2, 2, 1, "sometimes")


@pytest.mark.parametrize("size", [(16, 16), (12, 12), (5, 13)])
def test_conv2d_module_through_the_phases(size):
    """Conv2d with step 2 forced on: autograd through it (not _Conv2dFunction), PyTorch's results."""
    conv = Conv2d(3, 4, 3, padding=12, dilation=12).double()
    conv.dense = "on"
    out = conv(torch.randn(1, 3, *size, dtype=torch.float64, requires_grad=True))
    assert not out.grad_fn.name().startswith(_Conv2dFunction.__name__)

    def module(x, weight, bias):  # conv(x) with assert_conv_equal's parameters (it takes their gradients)
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,))

    convs = assert_conv_equal(module, size, 3, 12, 12, channels_last=True)
    assert all(dil == (1, 1) for _, _, dil in convs)  # no dilated convolution left


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("phases", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (12, 12)])
def test_bf16_autocast_is_close_to_fp32(size, phases):
    torch.manual_seed(4)
    conv = Conv2d(16, 8, 3, padding=12, dilation=12).to(memory_format=torch.channels_last)
    conv.dense = "on" if phases else "off"
    x = torch.randn(2, 16, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    params = (x, conv.weight, conv.bias)
    expected = F.conv2d(x, conv.weight, conv.bias, 1, 12, 12)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, expected) < 0.01  # bf16's rounding: ~0.3 %
    grads = torch.autograd.grad(out, params, grad_out.bfloat16())
    # Through the phases (288 images of 2x2) oneDNN's bf16 weight gradient is ~2 % off here (~0.3 %
    # dilated), growing with the batch (8 % at 32 images): its reduction over the batch is not fp32.
    tolerances = [0.01, 0.05 if phases and size == (16, 16) else 0.01, 0.01]
    for got, want, tolerance in zip(grads, expected_grads, tolerances):
        assert got.dtype == torch.float32  # back through autocast's casts to the parameters' dtype
        assert relative_error(got, want) < tolerance


VIEWS = {"view", "_unsafe_view", "permute", "unsqueeze", "squeeze", "slice", "expand", "detach", "alias"}


def kernel_ops(fn):
    """The aten ops fn runs that are not views (each at least one kernel on a GPU)."""

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEWS:
                log.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    log = []
    with Log():
        out = fn()
    return out, log


def test_phases_add_four_copies_each_way_for_deeplabs_atrous_layer():
    """dl-vgg9's atrous layer (no bias) on a 16x16 map under bf16 autocast: the ops step 2 adds."""
    conv = Conv2d(8, 16, 3, padding=12, dilation=12, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    counts = {}
    for phases in (False, True):
        conv.dense = "on" if phases else "off"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, forward = kernel_ops(lambda: conv(x))
        grad_out = torch.ones_like(out)
        _, backward = kernel_ops(lambda: torch.autograd.grad(out, (x, conv.weight), grad_out))
        counts[phases] = forward, backward
    assert counts[False] == (["_to_copy", "_to_copy", "convolution"], ["convolution_backward", "_to_copy", "_to_copy"])
    # zero fill, split, convolution, interleave, crop; and their backward in reverse order.
    assert counts[True] == (
        ["_to_copy", "_to_copy", "constant_pad_nd", "clone", "convolution", "clone", "constant_pad_nd"],
        ["constant_pad_nd", "clone", "convolution_backward", "clone", "constant_pad_nd", "_to_copy", "_to_copy"],
    )


def atrous_layer_under_bf16(device, batch, hw, channels=(256, 1024)):
    """dl-vgg9's atrous layer (3x3, d=12, bias-free, channels-last) forward and backward under bf16
    autocast: the names of the GPU kernels it ran (None off CUDA), and the relative errors of the output
    and of the input's and weight's gradients against fp32 (TF32 off)."""
    torch.manual_seed(5)
    conv = Conv2d(*channels, 3, padding=12, dilation=12, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, channels[0], *hw, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(batch, channels[1], *hw, device=device).bfloat16()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = F.conv2d(x, conv.weight, None, 1, 12, 12)
        expected_grads = torch.autograd.grad(expected, (x, conv.weight), grad_out.float())
    on_cuda = device == "cuda"
    profiling = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if on_cuda else None
    with profiling or contextlib.nullcontext():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = conv(x)
        grads = torch.autograd.grad(out, (x, conv.weight), grad_out)
        if on_cuda:
            torch.cuda.synchronize()
    kernels = [event.key for event in profiling.key_averages()] if on_cuda else None
    assert out.dtype == torch.bfloat16
    errors = [relative_error(out, expected)] + [relative_error(g, e) for g, e in zip(grads, expected_grads)]
    return kernels, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch, hw", [(40, (16, 16)), (160, (50, 87))])  # 64x64 T=10 b=4; DDD17 T=20 b=8
def test_cuda_bf16_atrous_layer_avoids_the_grouped_direct_kernel(batch, hw):
    """What step 2 is for. NEVER RUN YET: written without a GPU. At the two measured shapes no
    conv2d_grouped_direct_kernel runs, and bf16's errors stay near its rounding (the weight's gradient
    too: on CPU, oneDNN's was 2-8 % off through the phases)."""
    kernels, errors = atrous_layer_under_bf16("cuda", batch, hw)
    assert not any("grouped_direct" in name for name in kernels), kernels
    assert max(errors) < 0.01, errors
