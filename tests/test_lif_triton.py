"""The Triton backend (models/triton/) against an independent float64 reference.

Running the kernels without a GPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs them with numpy
on CPU tensors. ``triton.jit`` reads the variable when a kernel is decorated, i.e. when
``models.triton`` is imported (not when triton is imported, nor at launch), so it is set below
before that import (tests/conftest.py also sets it when CUDA is unavailable). Nothing else is needed
in triton 3.8. Interpreter quirks met here: float32 -> bfloat16 casts truncate instead of rounding to
nearest (compiled kernels round), so bf16 results are compared with a tolerance; float64 -> bfloat16
casts are wrong (the kernels never do one); ``tl.div_rn`` takes float32 only.
On a GPU, ``TRITON_INTERPRET=0 python -m pytest tests/test_lif_triton.py`` runs the same tests on CUDA.

The reference: per-timestep ``F.batch_norm`` (batch statistics and running-statistics update) and a
plain LIF loop (``lif_step`` below: either reset) whose spike is an autograd function with the
surrogate's derivative (tests/reference_snn.py), differentiated by torch.autograd.
"""

import importlib
import math
import os
import sys
import types

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the triton backend needs the triton package")
from models import triton as triton_backend  # noqa: E402
from models.surrogates import get_surrogate  # noqa: E402
from models.triton import launch  # noqa: E402
from tests.reference_snn import heaviside_surrogate  # noqa: E402

DEVICE = "cpu" if launch._INTERPRETED else "cuda"
S, N, C, H, W = 3, 2, 3, 4, 4
LEAK, EPS, MOMENTUM = 0.9, 1e-4, 0.1

# The surrogates' derivatives written out again (not imported), with their default parameters.
REFERENCE_SURROGATES = {
    "linear": lambda x: 0.3 * torch.clamp(1 - x.abs(), min=0),
    "fast_sigmoid": lambda x: (100.0 * x.abs() + 1) ** -2,
    "exp": lambda x: 1.0 * torch.exp(-10.0 * x.abs()),
    "pass_through": lambda x: torch.ones_like(x),
    "atan": lambda x: 1.0 / (1 + (math.pi / 2 * 2.0 * x) ** 2),
    "sigmoid": lambda x: 4.0 * torch.sigmoid(4.0 * x) * (1 - torch.sigmoid(4.0 * x)),
}


def lif_step(u, current, leak, theta, grad_fn, theta_neg=None, hard_reset=False):
    """One step of the per-step equations -> (spike, membrane): charge, fire (spike in {-1, 0, 1}, the
    surrogate's derivative in backward), reset with the spike detached: minus theta * s (subtraction)
    or to 0 after any spike (hard: u * (1 - |s|))."""
    u = leak * u + current
    above = u / theta - 1
    spike = heaviside_surrogate(above, grad_fn)
    reset = (above > 0).to(u.dtype) * theta
    if theta_neg is not None:
        below = u / theta_neg - 1
        spike = spike - heaviside_surrogate(below, grad_fn)
        reset = reset + (below > 0).to(u.dtype) * theta_neg
    if hard_reset:
        return spike, u * (1 - spike.detach().abs())
    return spike, u - reset


def thresholds(kind, dtype=torch.float64, sign=1.0):
    """A layer-, channel- or neuron-wise threshold (``sign`` -1: a negative one)."""
    gen = torch.Generator().manual_seed(7)
    value = {
        "float": lambda: 0.7,
        "scalar": lambda: torch.tensor(0.6, dtype=dtype),
        "channel": lambda: (torch.rand(C, 1, 1, generator=gen) + 0.4).to(dtype),
        "neuron": lambda: (torch.rand(C, H, W, generator=gen) + 0.4).to(dtype),
    }[kind]()
    return sign * value


def make_x(dtype=torch.float64, layout="channels_last", seed=0, scale=1.0, shift=0.0):
    """x [S, N, C, H, W]: each step channels-last (the networks' layout), plain contiguous, 'sliced'
    (every other column of a wider tensor: not dense) or 'transposed' (dense, w before h in memory): the
    kernels work on a contiguous copy of the last two, and the outputs come back in empty_like(x)'s layout."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S * N, C, H, 2 * W, generator=gen, dtype=torch.float64) * scale + shift
    if layout == "sliced":
        return x.to(dtype).view(S, N, C, H, 2 * W)[..., ::2]
    x = x[..., :W].contiguous()
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2).to(dtype).view(S, N, C, H, W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype).view(S, N, C, H, W)


def make_bn(n_bn, training, dtype=torch.float64, momentum=MOMENTUM, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(
        weight=(torch.rand(n_bn * C, generator=gen) + 0.5).to(dtype),
        running_mean=(torch.randn(n_bn * C, generator=gen) * 0.3).to(dtype),
        running_var=(torch.rand(n_bn * C, generator=gen) + 0.5).to(dtype),
        training=training,
        momentum=momentum,
        eps=EPS,
        steps=n_bn,
    )


def clone_bn(bn, device):
    if bn is None:
        return None
    return types.SimpleNamespace(**{k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in vars(bn).items()})


def on(device, value):
    """``value`` on ``device``; a tensor expanded over time (stride 0) stays expanded."""
    if not torch.is_tensor(value):
        return value
    if value.dim() > 1 and value.shape[0] > 1 and value.stride(0) == 0:
        return value[0].to(device).expand(value.shape)
    return value.to(device)


def reference(x, u0, theta, theta_neg, surrogate, bn, leak=LEAK, hard_reset=False):
    """Spikes, final membrane, BN statistics and the graph to differentiate, one step at a time.
    ``bn``'s running statistics are updated in place (as F.batch_norm does)."""
    grad_fn = REFERENCE_SURROGATES[surrogate]
    u = torch.zeros_like(x[0]) if u0 is None else u0
    n_bn = 0 if bn is None else bn.steps
    spikes, means, invstds = [], [], []
    for t in range(x.shape[0]):
        current = x[t]
        if t < n_bn:
            k = slice(t * C, (t + 1) * C)
            if bn.training:
                means.append(current.mean(dim=(0, 2, 3)))
                invstds.append((current.var(dim=(0, 2, 3), unbiased=False) + EPS).rsqrt())
            current = F.batch_norm(
                current, bn.running_mean[k], bn.running_var[k], bn.weight[k], None, bn.training, bn.momentum, EPS
            )
        spike, u = lif_step(u, current, leak, theta, grad_fn, theta_neg, hard_reset)
        spikes.append(spike)
    if bn is not None and not bn.training:
        means, invstds = [bn.running_mean], [(bn.running_var + EPS).rsqrt()]
    stats = (torch.cat(means), torch.cat(invstds)) if n_bn else (None, None)
    return torch.stack(spikes), u, stats


def params_of(theta, theta_neg, surrogate, device, leak=LEAK, hard_reset=False):
    return types.SimpleNamespace(
        leak=leak,
        theta=on(device, theta),
        theta_neg=on(device, theta_neg),
        surrogate=get_surrogate(surrogate),
        hard_reset=hard_reset,
    )


def upstream(like, mode, seed=3):
    """dL/dspikes: a full tensor, None, or one step expanded over time (stride 0: a sum's gradient)."""
    gen = torch.Generator().manual_seed(seed)
    if mode is None:
        return None
    if mode == "expanded":
        return torch.randn(like.shape[1:], generator=gen, dtype=like.dtype).expand(like.shape)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype)


def run_case(
    surrogate="linear",
    theta="float",
    theta_neg=None,
    n_bn=S,
    training=True,
    with_u0=False,
    with_grad_u_end=True,
    grad_spikes="full",
    layout="channels_last",
    bn=True,
    leak=LEAK,
    hard_reset=False,
):
    """Triton forward + backward against the reference, all in float64."""
    theta_value = thresholds(theta)
    neg_value = None if theta_neg is None else thresholds(theta_neg, sign=-1.3)
    x = make_x(layout=layout)
    gen = torch.Generator().manual_seed(5)
    u0 = (torch.rand(N, C, H, W, generator=gen, dtype=torch.float64) * 0.5) if with_u0 else None
    norm = make_bn(n_bn, training) if (bn and n_bn) else None

    # Reference (autograd through the per-step loop).
    x_ref = x.detach().clone().requires_grad_()
    u0_ref = None if u0 is None else u0.clone().requires_grad_()
    bn_ref = clone_bn(norm, "cpu")
    if bn_ref is not None:
        bn_ref.weight.requires_grad_()
    spikes_ref, u_ref, (mean_ref, invstd_ref) = reference(
        x_ref, u0_ref, theta_value, neg_value, surrogate, bn_ref, leak, hard_reset
    )
    grad_spikes_value = upstream(spikes_ref, grad_spikes)
    grad_u_end = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) if with_grad_u_end else None
    loss = (u_ref * grad_u_end).sum() if with_grad_u_end else u_ref.sum() * 0
    if grad_spikes_value is not None:
        loss = loss + (spikes_ref * grad_spikes_value).sum()
    inputs = [t for t in (x_ref, u0_ref, None if bn_ref is None else bn_ref.weight) if t is not None]
    grads_ref = torch.autograd.grad(loss, inputs, allow_unused=True)

    # Triton.
    params = params_of(theta_value, neg_value, surrogate, DEVICE, leak, hard_reset)
    bn_tri = clone_bn(norm, DEVICE)
    x_tri, u0_tri = x.to(DEVICE), on(DEVICE, u0)
    spikes, compact, u, mean, invstd = triton_backend.forward(x_tri, u0_tri, params, bn_tri, True)
    assert spikes.stride() == torch.empty_like(x_tri).stride() and spikes.dtype == x.dtype
    assert torch.equal(spikes.cpu(), spikes_ref.detach()), "spikes differ"
    assert torch.equal(compact.cpu(), spikes_ref.detach().to(torch.int8))
    assert (spikes == 1).any() and (theta_neg is None or (spikes == -1).any()), "the case tests nothing"
    torch.testing.assert_close(u.cpu(), u_ref.detach(), rtol=0, atol=1e-10)
    assert u.dtype == torch.float64
    if bn_tri is not None:
        torch.testing.assert_close(mean.cpu(), mean_ref.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(invstd.cpu(), invstd_ref.detach(), rtol=1e-10, atol=0)
        torch.testing.assert_close(bn_tri.running_mean.cpu(), bn_ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn_tri.running_var.cpu(), bn_ref.running_var, rtol=0, atol=1e-12)
    else:
        assert mean.numel() == 0 and invstd.numel() == 0

    grad_x, grad_u0, grad_weight = triton_backend.backward(
        x_tri,
        u0_tri,
        compact,
        mean,
        invstd,
        None if bn_tri is None else bn_tri.weight,
        on(DEVICE, grad_spikes_value),
        on(DEVICE, grad_u_end),
        params,
        bn_tri,
    )
    assert grad_x.stride() == torch.empty_like(x_tri).stride() and grad_x.dtype == x.dtype
    expected = list(grads_ref)
    torch.testing.assert_close(grad_x.cpu(), expected.pop(0), rtol=0, atol=1e-10)
    if with_u0:
        torch.testing.assert_close(grad_u0.cpu(), expected.pop(0), rtol=0, atol=1e-10)
    else:
        assert grad_u0 is None
    if bn_tri is not None:
        torch.testing.assert_close(grad_weight.cpu(), expected.pop(0), rtol=0, atol=1e-10)
    else:
        assert grad_weight is None


@pytest.mark.parametrize("hard_reset", [False, True], ids=["subtract", "hard"])
@pytest.mark.parametrize("surrogate", sorted(REFERENCE_SURROGATES))
def test_every_surrogate(surrogate, hard_reset):
    run_case(surrogate=surrogate, hard_reset=hard_reset)


@pytest.mark.parametrize(
    "case",
    [
        dict(theta="scalar", theta_neg="float", n_bn=S - 1, with_u0=True),
        dict(theta="channel", theta_neg="channel", training=False, grad_spikes="expanded"),
        dict(theta="neuron", theta_neg="neuron", n_bn=1, layout="contiguous", with_u0=True),
        dict(theta="neuron", theta_neg="scalar", bn=False, grad_spikes=None, with_u0=True),
        dict(
            theta="channel",
            surrogate="atan",
            training=False,
            n_bn=S - 1,
            layout="contiguous",
            grad_spikes="expanded",
            with_grad_u_end=False,
        ),
        dict(theta="float", surrogate="sigmoid", bn=False, layout="contiguous", grad_spikes="expanded"),
        dict(theta="scalar", surrogate="exp", n_bn=2, grad_spikes=None, with_u0=True),
        dict(theta="channel", theta_neg="float", layout="sliced", grad_spikes="expanded"),
        dict(theta="neuron", layout="transposed", training=False, with_u0=True),
        # Hard reset, with and without BN, the negative threshold, u0 in and dL/du_end, no dL/dspikes.
        dict(hard_reset=True, theta="scalar", theta_neg="float", n_bn=S - 1, with_u0=True),
        dict(hard_reset=True, theta="channel", theta_neg="channel", training=False, grad_spikes="expanded"),
        dict(hard_reset=True, theta="neuron", theta_neg="neuron", bn=False, with_u0=True, grad_spikes=None),
        dict(hard_reset=True, theta="neuron", surrogate="atan", layout="sliced", bn=False, with_grad_u_end=False),
        dict(hard_reset=True, theta="float", surrogate="exp", n_bn=1, layout="contiguous", with_u0=True),
        # IF neurons (leak 1), both resets.
        dict(leak=1.0, theta="channel", theta_neg="float", with_u0=True),
        dict(leak=1.0, hard_reset=True, theta="neuron", theta_neg="scalar", n_bn=S - 1, with_u0=True),
        dict(leak=1.0, hard_reset=True, theta="float", bn=False, grad_spikes="expanded", with_u0=True),
    ],
    ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()),
)
def test_matches_reference(case):
    """Thresholds of every granularity, the negative threshold, BN's tail, eval BN, u0, no / expanded
    dL/dspikes, no dL/du_end, every layout; both resets; IF (leak 1)."""
    run_case(**case)


def test_many_tiles_and_chunks(monkeypatch):
    """Tiny tiles, so that a layer spans several programs: H = W = 5 gives M = 50 rows, 7 tiles of 8
    (the last of 2 rows) in 3 chunks of 24, 24 and 2 rows. The statistics merge tiles within a chunk and
    chunks in the finish kernel (2 at a time: the second pair half masked), and backward sums 7 tiles'
    partials."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "H", 5)
    monkeypatch.setattr(module, "W", 5)
    for name, value in (("_TILE", 32), ("_MIN_TILE", 32), ("_MAX_CHUNKS", 3), ("_FINISH_CHUNKS", 2)):
        monkeypatch.setattr(launch, name, value)
    for hard_reset in (False, True):
        run_case(
            theta="neuron", theta_neg="channel", n_bn=S - 1, with_u0=True, grad_spikes="expanded", hard_reset=hard_reset
        )
    test_statistics_of_data_with_a_large_mean()


def test_momentum_zero_leaves_running_statistics():
    x = make_x().to(DEVICE)
    bn = clone_bn(make_bn(S, True, momentum=0.0), DEVICE)
    before = bn.running_mean.clone(), bn.running_var.clone()
    triton_backend.forward(x, None, params_of(0.7, None, "linear", DEVICE), bn, False)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_statistics_of_data_with_a_large_mean():
    """float32 batch statistics where mean >> std (1e5 vs 1): a sum of squares would lose the variance
    entirely, a float32 Welford (torch's CPU BN) loses ~1e-4 of it; the shifted statistics ~1e-7."""
    x = make_x(torch.float32, scale=1.0, shift=1e5).to(DEVICE)
    bn = clone_bn(make_bn(S, True, torch.float32), DEVICE)
    _, _, _, mean, invstd = triton_backend.forward(x, None, params_of(0.7, None, "linear", DEVICE), bn, False)
    x64 = x.cpu().double()
    var = x64.var(dim=(1, 3, 4), unbiased=False).flatten()
    torch.testing.assert_close(mean.cpu().double(), x64.mean(dim=(1, 3, 4)).flatten(), rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.cpu().double(), (var + EPS).rsqrt(), rtol=1e-6, atol=0)


def test_bfloat16_close_to_float32():
    """bf16 x: spikes in bf16, the membrane and statistics in float32, results close to float32's."""
    params = params_of(thresholds("channel", torch.float32), None, "linear", DEVICE)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x(torch.float32).to(torch.bfloat16).to(dtype).to(DEVICE)  # the same (bf16) values
        bn = clone_bn(make_bn(S, True, torch.float32), DEVICE)
        spikes, compact, u, mean, invstd = triton_backend.forward(x, None, params, bn, True)
        grad_spikes = upstream(spikes.float(), "full").to(dtype).to(DEVICE)
        grad_x, _, grad_weight = triton_backend.backward(
            x, None, compact, mean, invstd, bn.weight, grad_spikes, None, params, bn
        )
        assert spikes.dtype == dtype and grad_x.dtype == dtype and u.dtype == torch.float32
        assert mean.dtype == torch.float32 and grad_weight.dtype == torch.float32
        results[dtype] = [t.float().cpu() for t in (spikes, u, grad_x, grad_weight, bn.running_var)]
    for ours, full in zip(results[torch.bfloat16], results[torch.float32]):
        torch.testing.assert_close(ours, full, rtol=2e-2, atol=2e-2)


def test_flat_input_without_bn():
    """Without BN, x may have any shape [S, ...]; a neuron-wise threshold broadcasts against one step."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)[:, :, ::2]  # not dense: copied
    theta = torch.rand(5, 1, generator=gen, dtype=torch.float64) + 0.3
    spikes_ref, u_ref, _ = reference(x.clone().requires_grad_(), None, theta, None, "linear", None)
    params = params_of(theta, None, "linear", DEVICE)
    spikes, compact, u, _, _ = triton_backend.forward(x.to(DEVICE), None, params, None, True)
    assert torch.equal(spikes.cpu(), spikes_ref.detach()) and spikes.shape == x.shape
    torch.testing.assert_close(u.cpu(), u_ref.detach(), rtol=0, atol=1e-12)

    x_ref = x.clone().requires_grad_()
    spikes_ref, _, _ = reference(x_ref, None, theta, None, "linear", None)
    grad_spikes = upstream(spikes_ref, "expanded")
    (expected,) = torch.autograd.grad((spikes_ref * grad_spikes).sum(), x_ref)
    grad_x, _, _ = triton_backend.backward(
        x.to(DEVICE), None, compact, None, None, None, on(DEVICE, grad_spikes), None, params, None
    )
    torch.testing.assert_close(grad_x.cpu(), expected, rtol=0, atol=1e-12)


def test_integrate_and_fire_closed_form():
    """IF neurons (leak 1), float32, a constant current 0.75 and threshold 1 (every value exact): by
    subtraction the membrane runs 0.75, 1.5 (spike) -> 0.5, 1.25 (spike) -> 0.25, 1.0 (no spike: u / theta
    must exceed 1), 1.75 (spike) -> 0.75, 1.5 (spike) -> 0.5; hard reset: a spike every second step and
    0 after it. Backward with the pass-through surrogate (ds/du = 1 / theta = 1) and dL/ds = 1:
    dL/du[t] = 1 + factor[t] * dL/du[t+1], factor 1 (subtraction) or 1 - |s[t]| (hard), and the
    carried-in dL/du_end = 10 enters the last step through the same factor."""
    x = torch.full((6, 1), 0.75)
    expected = {
        False: ([0, 1, 1, 0, 1, 1], 0.5, [16, 15, 14, 13, 12, 11]),
        True: ([0, 1, 0, 1, 0, 1], 0.0, [2, 1, 2, 1, 2, 1]),
    }
    for hard_reset, (spikes_expected, u_expected, grad_expected) in expected.items():
        params = params_of(1.0, None, "pass_through", DEVICE, leak=1.0, hard_reset=hard_reset)
        spikes, compact, u, _, _ = triton_backend.forward(x.to(DEVICE), None, params, None, True)
        assert spikes.flatten().tolist() == spikes_expected and u.item() == u_expected
        grad_x, _, _ = triton_backend.backward(
            x.to(DEVICE),
            None,
            compact,
            None,
            None,
            None,
            torch.ones_like(x).to(DEVICE),
            torch.full((1,), 10.0).to(DEVICE),
            params,
            None,
        )
        assert grad_x.flatten().tolist() == grad_expected


@pytest.mark.parametrize("hard_reset", [False, True], ids=["subtract", "hard"])
def test_blocks_chain_like_one_run(hard_reset):
    """Memory-saving mode's blocks: steps [0, 2) then [2, 3), the membrane carried forward (u0) and its
    gradient back (block 2's dL/du0 is block 1's dL/du_end), give the one-run reference's spikes, membrane
    and gradients (BN in training, the negative threshold, a membrane carried in at the start)."""
    theta, theta_neg = thresholds("channel"), thresholds("float", sign=-1.3)
    x = make_x()
    gen = torch.Generator().manual_seed(5)
    u0 = torch.rand(N, C, H, W, generator=gen, dtype=torch.float64) * 0.5
    grad_u_end = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    norm = make_bn(S, True)
    grad_spikes = upstream(x, "full")

    x_ref, u0_ref, bn_ref = x.clone().requires_grad_(), u0.clone().requires_grad_(), clone_bn(norm, "cpu")
    bn_ref.weight.requires_grad_()
    spikes_ref, u_ref, _ = reference(x_ref, u0_ref, theta, theta_neg, "sigmoid", bn_ref, hard_reset=hard_reset)
    loss = (spikes_ref * grad_spikes).sum() + (u_ref * grad_u_end).sum()
    expected = torch.autograd.grad(loss, [x_ref, u0_ref, bn_ref.weight])

    params = params_of(theta, theta_neg, "sigmoid", DEVICE, hard_reset=hard_reset)
    bn = clone_bn(norm, DEVICE)
    blocks = [(0, 2), (2, 3)]
    block_bn = [
        types.SimpleNamespace(
            **{
                **vars(bn),
                **{key: getattr(bn, key)[start * C : end * C] for key in ("weight", "running_mean", "running_var")},
                "steps": end - start,
            }
        )
        for start, end in blocks
    ]
    xd, u, saved = x.to(DEVICE), u0.to(DEVICE), []
    for (start, end), block in zip(blocks, block_bn):
        spikes, compact, u_next, mean, invstd = triton_backend.forward(xd[start:end], u, params, block, True)
        saved.append((u, spikes, compact, mean, invstd))
        u = u_next
    torch.testing.assert_close(u.cpu(), u_ref.detach(), rtol=0, atol=1e-10)
    assert torch.equal(torch.cat([block[1] for block in saved]).cpu(), spikes_ref.detach())
    carry, grad_x, grad_weight = grad_u_end.to(DEVICE), [None, None], [None, None]
    for i in reversed(range(len(blocks))):
        (start, end), (u_in, _, compact, mean, invstd) = blocks[i], saved[i]
        grad_x[i], carry, grad_weight[i] = triton_backend.backward(
            xd[start:end],
            u_in,
            compact,
            mean,
            invstd,
            block_bn[i].weight,
            grad_spikes[start:end].to(DEVICE),
            carry,
            params,
            block_bn[i],
        )
    torch.testing.assert_close(torch.cat(grad_x).cpu(), expected[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(carry.cpu(), expected[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(grad_weight).cpu(), expected[2], rtol=0, atol=1e-10)


def _torch_backend_has_hard_reset():
    """The neuron parameters have the hard reset field (added with the torch backend's hard reset)."""
    from models import neurons

    return "hard_reset" in getattr(neurons.LIFParams, "__dataclass_fields__", {})


@pytest.mark.parametrize(
    "training, leak, hard_reset",
    [(True, LEAK, False), (False, LEAK, False), (True, 1.0, False), (True, LEAK, True), (False, 1.0, True)],
)
def test_matches_torch_implementation_float32(training, leak, hard_reset):
    """Bit-identical spikes, close membranes, statistics and gradients against models/lif_torch.py. (Both
    backends' float32 gradients are ~1e-5 of the largest gradient away from float64's here.)"""
    from models import lif_torch

    if hard_reset and not _torch_backend_has_hard_reset():
        pytest.skip("the torch backend has no hard reset yet (neurons.LIFParams.hard_reset)")
    x = make_x(torch.float32)
    params = params_of(thresholds("channel", torch.float32), -0.9, "fast_sigmoid", "cpu")
    gen = torch.Generator().manual_seed(9)
    u0 = torch.rand(N, C, H, W, generator=gen) * 0.5
    grad_spikes, grad_u_end = upstream(x, "full"), torch.randn(N, C, H, W, generator=gen)
    results = []
    for run_forward, run_backward, device in (
        (lif_torch.forward, lif_torch.backward, "cpu"),
        (triton_backend.forward, triton_backend.backward, DEVICE),
    ):
        bn = clone_bn(make_bn(S, training, torch.float32), device)
        p = params_of(params.theta, params.theta_neg, "fast_sigmoid", device, leak, hard_reset)
        xd, u0d = x.to(device), u0.to(device)
        spikes, compact, u, mean, invstd = run_forward(xd, u0d, p, bn, True)
        grads = run_backward(
            xd, u0d, compact, mean, invstd, bn.weight, grad_spikes.to(device), grad_u_end.to(device), p, bn
        )
        results.append([t.cpu() for t in (spikes, u, mean, invstd, bn.running_mean, bn.running_var, *grads)])
    (spikes_t, *rest_t), (spikes_k, *rest_k) = results
    assert torch.equal(spikes_t, spikes_k) and (spikes_t == 1).any() and (spikes_t == -1).any()
    for ours, theirs in zip(rest_k, rest_t):  # float32 rounding, relative to the tensor's largest entry
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * max(1.0, theirs.abs().max().item()))


def test_import_without_triton_is_a_clear_import_error(monkeypatch):
    """models/fused.py catches it and falls back to the torch backend."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    for module in [m for m in sys.modules if m.startswith("models.triton")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match="neuron_backend 'triton' needs the triton package"):
        importlib.import_module("models.triton")


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRETED", False)
    params = params_of(1.0, None, "linear", "cpu")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors .set TRITON_INTERPRET=1"):
        triton_backend.forward(torch.zeros(2, 3), None, params, None, False)
