"""The worked example of docs/neurons.md (an adaptive-threshold neuron) is run from the page itself, so the
documentation and the test cannot drift apart: its spikes against a hand-written loop, and a whole
network with it (training, memory-saving mode, spike counts, energy, checkpoints, backend refusal)."""

from pathlib import Path

import pytest
import torch

from models import NEURONS, build_model
from tests.doc_examples import run_example

DOC = Path(__file__).resolve().parents[1] / "docs" / "neurons.md"


@pytest.fixture
def alif():
    """The ALIF class as the page defines it, registered for the test's duration."""
    with run_example(DOC, NEURONS, "ALIF") as cls:
        yield cls


def hand_alif(currents, leak, theta, rho, b, hard=False):
    """Adaptive LIF, one step at a time, without the model code."""
    u = torch.zeros_like(currents[0])
    a = torch.zeros_like(u)
    out = []
    for current in currents:
        u = leak * u + current
        a = rho * a
        threshold = theta + b * a
        s = (u / threshold - 1 > 0).to(u.dtype)
        u = u * (1 - s) if hard else u - threshold * s
        a = a + s
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_alif_spikes_match_the_hand_loop(alif, reset):
    torch.manual_seed(0)
    currents = torch.rand(12, 2, 3, 4, 4, dtype=torch.float64) * 0.9
    neuron = alif(leak=0.95, threshold=0.6, reset=reset).double()
    spikes = neuron(currents.flatten(0, 1), steps=12).view_as(currents)
    expected = hand_alif(currents, 0.95, 0.6, alif.rho, alif.b, hard=reset == "zero")
    assert torch.equal(spikes, expected) and spikes.sum() > 20
    plain = hand_alif(currents, 0.95, 0.6, alif.rho, 0.0, hard=reset == "zero")
    assert spikes.sum() < plain.sum()  # the adaptation does something


def alif_net(**cfg):
    torch.manual_seed(0)
    base = dict(arch="dl-vgg9", timesteps=4, num_classes=3, encoder="direct", def_threshold=0.3, neuron="alif")
    return build_model({**base, **cfg}).double()


def test_alif_network_memory_saving_carries_both_states(alif):
    """Blocks of 2 timesteps replayed in backward (the membrane and the adaptation carried across blocks)
    give the logits, gradients and BN statistics of one pass over all 4."""
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, 3, (2, 8, 8))
    results = []
    for saving in (False, True):
        model = alif_net(memory_saving=saving, memory_block=2)
        assert type(model.neuron_layers()[0]) is alif and model.neuron_backend == "generic"
        out = model(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        results.append((out.detach(), [p.grad for p in model.parameters()], list(model.buffers())))
    (out_a, grads_a, buffers_a), (out_b, grads_b, buffers_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a + buffers_a, grads_b + buffers_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_alif_network_counts_spikes_and_energy_and_round_trips_a_checkpoint(alif, tmp_path):
    from utils.checkpoint import load_model, save_checkpoint
    from utils.energy import OpCounter

    model = alif_net().eval()
    model.record_spikes(True)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64) - 0.5
    with torch.no_grad(), OpCounter(model) as counter:
        out = model(x)
    spikes = sum(s["spikes"] for s in model.spike_stats())
    assert spikes > 0 and counter.summary()["sops"] > 0
    path = tmp_path / "alif.pth"
    save_checkpoint(path, {"format": "snnseg-1", "config": model.config, "state_dict": model.state_dict()})
    loaded = load_model(path).double()
    assert type(loaded.neuron_layers()[0]) is alif
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)


def test_alif_has_no_accelerator(alif):
    with pytest.raises(ValueError, match="neuron_backend 'torch' does not support neuron 'alif'"):
        alif_net(neuron_backend="torch")
