"""CLIF, GLIF and I-LIF against SpikingJelly 2.0's nodes of the same name (ComplementaryLIFNode, GatedLIFNode,
ILIFNode with MultiLevelSpikeCount), in float64: the spikes of every step, the states of every step (or the
final one, where SpikingJelly keeps no trace), and the gradients of a loss of spikes and states with respect to
the input currents and every learned parameter. The published models pass the spike's gradient through the
reset (our ``detach_reset: false``); SpikingJelly's ILIFNode also has ``detach_reset=True``, compared too."""

import pytest
import torch

from models.neurons import CLIF, GLIF, ILIF

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")

T, SHAPE = 6, (2, 3, 4, 4)
EXACT = dict(rtol=0, atol=1e-12)


def our_trajectory(neuron, x):
    """Our spikes [T, ...] and the state after each step, one step at a time through the carried state."""
    state, spikes, states = None, [], []
    for t in range(x.shape[0]):
        s, state = neuron.run_generic(x[t : t + 1], state)
        spikes.append(s[0])
        states.append(state)
    return torch.stack(spikes), states


def currents(scale, seed):
    torch.manual_seed(seed)
    return (torch.rand(T, *SHAPE, dtype=torch.float64) * scale).requires_grad_()


def loss_weights(seed, count):
    torch.manual_seed(seed)
    return [torch.randn(T, *SHAPE, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize(
    "leak, threshold, surrogate, peer_surrogate",
    [
        (0.5, 1.0, ("rect", {}), lambda: sj_surrogate.Rect(alpha=1.0)),  # SpikingJelly's defaults (tau 2)
        (0.75, 0.75, ("sigmoid", {"alpha": 4.0}), lambda: sj_surrogate.Sigmoid(alpha=4.0)),
    ],
    ids=["tau2-rect", "tau4-sigmoid"],
)
def test_clif_equals_complementary_lif_node(leak, threshold, surrogate, peer_surrogate):
    x = currents(1.5 * threshold, seed=0)
    ours = CLIF(leak, threshold, surrogate[0], surrogate[1], detach_reset=False, backend="generic").double()
    peer = sj_neuron.ComplementaryLIFNode(
        tau=1 / (1 - leak), v_threshold=threshold, surrogate_function=peer_surrogate(), step_mode="m"
    ).double()
    peer.store_state_seqs = True
    spikes, states = our_trajectory(ours, x)
    peer_spikes = peer(x)
    v, m = (torch.stack([s[i] for s in states]) for i in (0, 1))
    peer_v, peer_m = peer.state_seqs
    assert torch.equal(spikes, peer_spikes) and 0.1 < spikes.mean() < 0.9
    torch.testing.assert_close(v, peer_v, **EXACT)
    torch.testing.assert_close(m, peer_m, **EXACT)
    w = loss_weights(1, 3)
    (grad_s,) = torch.autograd.grad((spikes * w[0]).sum(), x, retain_graph=True)
    (grad,) = torch.autograd.grad((spikes * w[0] + v * w[1] + m * w[2]).sum(), x)
    (peer_grad,) = torch.autograd.grad((peer_spikes * w[0] + peer_v * w[1] + peer_m * w[2]).sum(), x)
    torch.testing.assert_close(grad, peer_grad, **EXACT)
    assert grad.abs().max() > 0.1
    # The default detach_reset (true) is another gradient, the same forward.
    detached = CLIF(leak, threshold, surrogate[0], surrogate[1], backend="generic").double()
    spikes_d, _ = our_trajectory(detached, x)
    (grad_d,) = torch.autograd.grad((spikes_d * w[0]).sum(), x)
    assert torch.equal(spikes_d, spikes) and not torch.allclose(grad_d, grad_s)


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("levels", [4, 2])
def test_ilif_equals_ilif_node(levels, detach):
    threshold = 0.75  # exact in the float32 threshold buffer
    x = currents(levels * threshold * 1.2, seed=2)
    ours = ILIF(0.25, threshold, spike_levels=levels, detach_reset=detach, backend="generic").double()
    peer = sj_neuron.ILIFNode(
        tau=4.0 / 3.0,
        v_threshold=threshold,
        surrogate_function=sj_surrogate.MultiLevelSpikeCount(levels),
        detach_reset=detach,
        step_mode="s",
    ).double()
    spikes, states = our_trajectory(ours, x)
    peer_spikes, peer_v = [], []
    for t in range(T):
        peer_spikes.append(peer(x[t]))
        peer_v.append(peer.v)
    peer_spikes, peer_v = torch.stack(peer_spikes), torch.stack(peer_v)
    v = torch.stack([s[0] for s in states])
    assert torch.equal(spikes, peer_spikes)
    assert set(spikes.unique().tolist()) == set(range(levels + 1))
    torch.testing.assert_close(v, peer_v, **EXACT)
    w = loss_weights(3, 2)
    (grad,) = torch.autograd.grad((spikes * w[0] + v * w[1]).sum(), x)
    (peer_grad,) = torch.autograd.grad((peer_spikes * w[0] + peer_v * w[1]).sum(), x)
    torch.testing.assert_close(grad, peer_grad, **EXACT)
    assert grad.abs().max() > 0.1


GLIF_PARAMETERS = [  # ours -> SpikingJelly's (all logits of a sigmoid)
    ("gate_alpha", "alpha"),
    ("gate_beta", "beta"),
    ("gate_gamma", "gamma"),
    ("tau_logit", "tau"),
    ("threshold_logit", "v_threshold"),
    ("decay_logit", "linear_decay"),
    ("subreset_logit", "v_subreset"),
    ("conduct_logit", "conduct"),
]


def test_glif_equals_gated_lif_node():
    torch.manual_seed(4)
    ours = GLIF(surrogate="sigmoid", timesteps=T, detach_reset=False, backend="generic").double()
    peer = sj_neuron.GatedLIFNode(T=T, surrogate_function=sj_surrogate.Sigmoid(alpha=4.0)).double()
    for name, peer_name in GLIF_PARAMETERS:  # the same initial values, but for the random gates
        ours_p, peer_p = getattr(ours, name), getattr(peer, peer_name)
        if not name.startswith("gate_"):
            assert torch.equal(ours_p, peer_p), name
        with torch.no_grad():
            ours_p.uniform_(-1, 1)  # away from the initial values, so that each parameter matters
            peer_p.copy_(ours_p)
    x = currents(1.5, seed=5)
    spikes, states = our_trajectory(ours, x)
    peer_spikes = peer(x)
    assert torch.equal(spikes, peer_spikes) and 0.1 < spikes.mean() < 0.9
    torch.testing.assert_close(states[-1][0], peer.v, **EXACT)  # SpikingJelly keeps the final membrane only
    w = loss_weights(6, 1)[0]
    ours_params = [getattr(ours, name) for name, _ in GLIF_PARAMETERS]
    peer_params = [getattr(peer, name) for _, name in GLIF_PARAMETERS]
    grads = torch.autograd.grad((spikes * w).sum() + (states[-1][0] * w[0]).sum(), [x, *ours_params])
    peer_grads = torch.autograd.grad((peer_spikes * w).sum() + (peer.v * w[0]).sum(), [x, *peer_params])
    for (name, _), grad, peer_grad in zip([("x", "")] + GLIF_PARAMETERS, grads, peer_grads):
        torch.testing.assert_close(grad, peer_grad, **EXACT, msg=name)
        assert grad.abs().max() > 1e-3, name
