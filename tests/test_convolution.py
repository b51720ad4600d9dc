"""The hand-written weight gradient of atrous convolutions wider than their input, against autograd's."""
import pytest
import torch
import torch.nn as nn

from models import build_model
from models.convolution import Conv2d, _Conv2dFunction, kernel_exceeds_input, tap_weight_grad


def reference_grads(conv, x, grad_out):
    """dL/dx, dL/dweight, dL/dbias of a plain nn.Conv2d with the same parameters (PyTorch's own backward)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                      dilation=conv.dilation, bias=conv.bias is not None).double()
    plain.load_state_dict(conv.state_dict())
    x = x.detach().requires_grad_()
    params = [x, plain.weight] + ([plain.bias] if plain.bias is not None else [])
    return torch.autograd.grad(plain(x), params, grad_out)


@pytest.mark.parametrize('size, dilation, bias, channels_last', [
    ((6, 6), 4, True, True),     # outer taps partly inside the input
    ((5, 7), 3, False, False),   # not square, NCHW input
    ((4, 4), 12, True, True),    # outer taps entirely in the padding: only the centre tap counts
])
def test_atrous_conv_gradients_equal_pytorchs(size, dilation, bias, channels_last):
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
    for got, expected in zip(torch.autograd.grad(out, params, grad_out), reference_grads(conv, x, grad_out)):
        torch.testing.assert_close(got, expected)


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
    assert conv(x).grad_fn.name() == 'ConvolutionBackward0'


def test_full_resolution_units_recompute_their_convolution():
    model = build_model(dict(arch='dl-vgg9', timesteps=2))
    assert [unit.recompute for unit in model.conv_units()] == [True, True] + [False] * 6
    fcn = build_model(dict(arch='fcn-vgg9', timesteps=2))
    assert [unit.recompute for unit in fcn.conv_units()][:3] == [True, True, False]


def saved_by(fn):
    """The tensors autograd keeps for backward while ``fn`` runs (outside any spike-compacting hook)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize('stride', [1, 2])
def test_avg_pool_keeps_nothing_and_has_pytorchs_gradient(stride):
    from models.convolution import AvgPool2d
    torch.manual_seed(2)
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, saved = saved_by(lambda: AvgPool2d(3, stride=stride, padding=1)(x))
    assert saved == []
    grad_out = torch.randn_like(out)
    got, = torch.autograd.grad(out, x, grad_out)
    x_ref = x.detach().requires_grad_()
    expected, = torch.autograd.grad(nn.functional.avg_pool2d(x_ref, 3, stride, 1), x_ref, grad_out)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)


def test_atrous_conv_keeps_its_spike_input_in_one_byte():
    """Even where no compact_spikes hook is active (memory-saving mode's replay stores through checkpoint's)."""
    from models.neurons import mark_spikes
    conv = Conv2d(4, 6, 3, padding=5, dilation=5)
    spikes = mark_spikes((torch.rand(2, 4, 6, 6) < 0.3).float().requires_grad_())
    _, saved = saved_by(lambda: conv(spikes))
    inputs = [t for t in saved if t.shape == spikes.shape]
    assert len(inputs) == 1 and inputs[0].dtype == torch.int8 and torch.equal(inputs[0].float(), spikes)
