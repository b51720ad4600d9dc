"""LIF dynamics and surrogate gradients against hand-written loops and closed forms."""

import math

import pytest
import torch

from models.neurons import LIF, lif_sequence
from models.surrogates import SURROGATES, get_surrogate
from tests.reference_snn import heaviside_surrogate, lif_step


def hand_loop(currents, leak, theta, theta_neg=None):
    """Plain per-timestep loop over python lists of tensors: charge, fire, reset by subtraction."""
    mem, out = torch.zeros_like(currents[0]), []
    for current in currents:
        mem = leak * mem + current
        pos = (mem / theta - 1 > 0).to(mem.dtype)
        neg = torch.zeros_like(pos) if theta_neg is None else (mem / theta_neg - 1 > 0).to(mem.dtype)
        out.append(pos - neg)
        mem = mem - pos * theta - (0 if theta_neg is None else neg * theta_neg)
    return torch.stack(out)


THRESHOLDS = {
    "layer": lambda: 0.8,
    "channel": lambda: torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1),
    "neuron": lambda: torch.rand(3, 4, 5) + 0.3,
}


@pytest.mark.parametrize("kind", THRESHOLDS)
def test_lif_sequence_matches_hand_loop(kind):
    torch.manual_seed(0)
    currents = torch.rand(12, 2, 3, 4, 5) * 1.2 - 0.2
    theta = THRESHOLDS[kind]()
    spikes = lif_sequence(currents, leak=0.9, threshold=theta)
    assert torch.equal(spikes, hand_loop(currents, 0.9, theta))
    assert spikes.sum() > 0 and set(spikes.unique().tolist()) <= {0.0, 1.0}


def test_negative_threshold_emits_minus_one_spikes():
    torch.manual_seed(1)
    currents = torch.randn(15, 4, 6) * 0.6 - 0.1
    theta, alpha = 1.0, 0.5
    spikes = lif_sequence(currents, leak=1.0, threshold=theta, threshold_neg=-theta / alpha)
    assert torch.equal(spikes, hand_loop(currents, 1.0, theta, -theta / alpha))
    assert (spikes < 0).any()


def test_if_neuron_rate_equals_clipped_input():
    # With leak 1, reset by subtraction and a constant input c in [0, theta], the membrane stays in
    # [0, 2*theta], so after t steps the spike count differs from t*c/theta by at most 2.
    c = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=torch.float64)
    spikes = lif_sequence(c.expand(1000, 5).clone(), leak=1.0, threshold=1.0)
    assert ((spikes.sum(0) - 1000 * c).abs() <= 2).all()
    assert spikes[:, 0].sum() == 0


def test_gradient_matches_closed_form_through_time():
    # L = sum_t w_t s_t  =>  dL/dI_k = sum_{t>=k} w_t g(x_t)/theta * leak^(t-k) (reset carries no gradient).
    torch.manual_seed(2)
    T, leak, theta = 9, 0.8, 0.7
    currents = (torch.rand(T, 6, dtype=torch.float64) * 0.9).requires_grad_()
    weights = torch.randn(T, 6, dtype=torch.float64)
    (lif_sequence(currents, leak, theta) * weights).sum().backward()
    mem, x = torch.zeros(6, dtype=torch.float64), []
    for t in range(T):
        mem = leak * mem + currents[t].detach()
        x.append(mem / theta - 1)
        mem = mem - (x[-1] > 0).double() * theta
    expected = torch.zeros(T, 6, dtype=torch.float64)
    for k in range(T):
        for t in range(k, T):
            expected[k] += weights[t] * 0.3 * torch.clamp(1 - x[t].abs(), min=0) / theta * leak ** (t - k)
    torch.testing.assert_close(currents.grad, expected)


@pytest.mark.parametrize("negative", [False, True])
def test_gradient_matches_autograd_of_per_step_reference(negative):
    torch.manual_seed(3)
    T, leak = 7, 0.95
    theta = torch.rand(3, 1, 1, dtype=torch.float64) + 0.5
    theta_neg = -theta / 0.2 if negative else None
    currents = (torch.randn(T, 2, 3, 4, 4, dtype=torch.float64) * 0.8).requires_grad_()
    weights = torch.randn_like(currents)
    fast = lif_sequence(currents, leak, theta, threshold_neg=theta_neg)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), currents)
    mem, outs = 0, []
    surrogate = get_surrogate("linear")
    for t in range(T):
        s, mem = lif_step(mem, currents[t], leak, theta, surrogate.grad, theta_neg)
        outs.append(s)
    slow = torch.stack(outs)
    (g_slow,) = torch.autograd.grad((slow * weights).sum(), currents)
    assert torch.equal(fast.detach(), slow.detach())
    torch.testing.assert_close(g_fast, g_slow)


FORMULAS = {
    "linear": lambda x: 0.3 * max(0.0, 1 - abs(x)),
    "fast_sigmoid": lambda x: 1 / (100 * abs(x) + 1) ** 2,
    "exp": lambda x: 1.0 * math.exp(-10 * abs(x)),
    "pass_through": lambda x: 1.0,
    "atan": lambda x: 1 / (1 + (math.pi * x) ** 2),
    "sigmoid": lambda x: 4 * (1 / (1 + math.exp(-4 * x))) * (1 - 1 / (1 + math.exp(-4 * x))),
    "rect": lambda x: 1.0 if abs(x) < 0.5 else 0.0,
    "clamped_tanh": lambda x: 1.5 * (1 - math.tanh(1.5 * x) ** 2) / (2 * math.tanh(1.5)) if abs(x) < 1 else 0.0,
}


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_surrogate_derivative_matches_formula(name):
    theta = 2.0
    currents = torch.linspace(-1, 5, 61, dtype=torch.float64).view(1, -1).requires_grad_()
    lif_sequence(currents, 0.99, theta, surrogate=name).sum().backward()
    expected = torch.tensor(
        [FORMULAS[name](c / theta - 1) / theta for c in currents.detach().view(-1).tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(currents.grad.view(-1), expected)


@pytest.mark.parametrize("name", sorted(SURROGATES))
@pytest.mark.parametrize("theta", [0.5, 0.3])
def test_surrogate_spike_backward_is_the_chain_rule(name, theta):
    """grad * g(u / theta - 1) / theta, a surrogate's own shorter form included; u at the window's edges too."""
    u = torch.tensor([0.0, theta, 2 * theta, -theta, 3 * theta, 0.77 * theta, 1.3 * theta], dtype=torch.float64)
    grad = torch.linspace(-2.0, 3.0, len(u), dtype=torch.float64)
    expected = [g * FORMULAS[name](v / theta - 1) / theta for g, v in zip(grad.tolist(), u.tolist())]
    got = get_surrogate(name).spike_backward(grad, u, theta)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_surrogate_hyperparameters_are_configurable():
    currents = torch.tensor([[1.5]], requires_grad=True)  # x = 0.5
    lif_sequence(currents, threshold=1.0, surrogate="linear", gamma=1.0).sum().backward()
    assert currents.grad.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown parameter.*'scale'"):
        get_surrogate("linear", scale=3)


def test_unknown_surrogate_lists_choices():
    with pytest.raises(ValueError, match="unknown surrogate 'tanh'.*fast_sigmoid.*linear"):
        lif_sequence(torch.zeros(2, 3), surrogate="tanh")


def test_lif_module_folds_time_and_records_spikes():
    torch.manual_seed(4)
    lif = LIF(leak=0.9, threshold=0.6)
    currents = torch.rand(5, 2, 3, 4, 4)  # [T, N, C, H, W]: time-major
    lif.recording = True
    out = lif(currents.flatten(0, 1), steps=5).view(5, 2, 3, 4, 4)
    expected = hand_loop(currents, 0.9, 0.6)
    assert torch.equal(out, expected)
    stats = lif.spike_stats()
    assert stats["spikes"] == expected.sum().item() and stats["neurons"] == 48 and stats["images"] == 2


def test_lif_threshold_of_any_shape_survives_state_dict_round_trip():
    lif = LIF()
    lif.set_threshold(torch.arange(1, 4.0).view(3, 1, 1))
    other = LIF()
    other.load_state_dict(lif.state_dict())
    assert torch.equal(other.threshold, torch.arange(1, 4.0).view(3, 1, 1))


def test_spike_function_reference_is_heaviside():
    x = torch.tensor([-0.1, 0.0, 1e-7])
    assert torch.equal(heaviside_surrogate(x, lambda v: v), torch.tensor([0.0, 0.0, 1.0]))


def test_compiled_steps_are_a_per_model_setting_with_identical_spikes_and_matching_gradients():
    """``compile`` (config key) torch.compile's the torch backend's steps for that model only."""
    torch.manual_seed(6)
    currents = (torch.rand(6 * 2, 3, 5, 5) * 2.4 - 1.2).requires_grad_()
    theta = torch.rand(3, 1, 1) + 0.5
    weights = torch.randn(6 * 2, 3, 5, 5)
    results = []
    for compiled in (False, True):
        lif = LIF(0.9, alpha=2.0, backend="torch")
        lif.set_threshold(theta)
        lif.compile = compiled
        spikes = lif(currents, steps=6)
        results.append((spikes, *torch.autograd.grad((spikes * weights).sum(), currents)))
    (eager, g_eager), (fused, g_fused) = results
    assert torch.equal(eager, fused) and (eager < 0).any() and (eager > 0).any()
    torch.testing.assert_close(g_eager, g_fused)
    assert LIF(0.9).lif_params().compile is False  # other models are untouched


def test_time_sum_of_a_neuron_layer_sums_its_spikes_directly():
    """The readout's sum over time: same values and gradients as summing the time-folded view, taken on
    the neurons' own [S, N, ...] output so that their backward gets a broadcast (uncopied) gradient."""
    from models.neurons import time_split, time_sum

    torch.manual_seed(5)
    currents = torch.randn(4 * 2, 3, 5, 5, requires_grad=True)  # [T*N, C, H, W], T=4, N=2
    spikes = LIF(leak=0.9, threshold=0.5)(currents * 2, steps=4)
    total, plain = time_sum(spikes, 4), time_split(spikes, 4).sum(0)
    assert torch.equal(total, plain)
    weights = torch.randn_like(total)
    (grad,) = torch.autograd.grad((total * weights).sum(), currents, retain_graph=True)
    (expected,) = torch.autograd.grad((plain * weights).sum(), currents)
    assert torch.equal(grad, expected)
    node = total.grad_fn.next_functions[0][0]  # SumBackward's input: the neurons' own backward
    assert type(node).__name__ == "_SpikingLayerBackward"
