"""Our spiking dl-vgg9 and fcn-vgg9 against the same networks written with SpikingJelly (a peer library), and
our dl-sew-resnet18 and fcn-sew-resnet18 against SpikingJelly's own sew_resnet18 (models.sew_resnet):
the same weights and the same Poisson draws give the same logits (float64, to rounding), the same BN
statistics, and the same gradients of every parameter, in training and in evaluation mode."""

import pytest
import torch
import torch.nn.functional as F

import models.parts
from benchmarks import peer_spikingjelly as peer_lib
from models import build_model

T, N, H, W, CLASSES = 3, 2, 20, 18, 4


def poisson_draws(x, timesteps, seed):
    """Signed rate coding written out here: s = sign(x) * [u <= |x|], u uniform, one draw per timestep,
    in the order our encoder draws them (one [T, N, C, H, W] tensor)."""
    torch.manual_seed(seed)
    fire = torch.rand((timesteps, *x.shape), dtype=x.dtype) <= x.abs()
    return fire * torch.sign(x)


def twin_networks(arch, seed=0):
    torch.manual_seed(seed)
    cfg = dict(arch=arch, timesteps=T, num_classes=CLASSES, encoder="poisson", **peer_lib.OUR_CONFIG)
    ours = build_model(cfg).double()
    with torch.no_grad():  # away from the initial values, so that every copied tensor matters
        for unit in ours.conv_units():
            unit.norm.weight.uniform_(0.5, 1.5)
            unit.norm.running_mean.normal_(0, 0.1)
            unit.norm.running_var.uniform_(0.5, 2.0)
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    peer = peer_lib.PEERS[arch](3, CLASSES, T).double()
    peer_lib.copy_weights(ours, peer)
    return ours, peer


def run_both(ours, peer, x, seed):
    torch.manual_seed(seed)
    our_logits = ours(x)
    peer_logits = peer(poisson_draws(x, T, seed), x.shape[-2:])
    return our_logits, peer_logits


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9", "dl-sew-resnet18", "fcn-sew-resnet18"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_bn_statistics_and_gradients_equal_spikingjelly(arch, mode, monkeypatch):
    ours, peer = twin_networks(arch)
    x = (torch.rand(N, 3, H, W, dtype=torch.float64) - 0.5) * 1.6  # |x| up to 0.8: dense input spikes
    if mode == "eval":  # running statistics of a batch (momentum 1), so that spikes reach the readout
        monkeypatch.setattr(models.parts, "BN_MOMENTUM", 1.0)
        with torch.no_grad():
            torch.manual_seed(1)
            ours.train()(x)
        monkeypatch.undo()
        peer_lib.copy_weights(ours, peer)
    ours.train(mode == "train")
    peer.train(mode == "train")
    labels = torch.randint(0, CLASSES, (N, H, W))
    our_logits, peer_logits = run_both(ours, peer, x, seed=7)
    assert our_logits.shape == peer_logits.shape == (N, CLASSES, H, W)
    torch.testing.assert_close(our_logits, peer_logits, rtol=0, atol=1e-12)
    assert our_logits.abs().max() > 1e-3  # spikes reached the readout

    # BN statistics moved the same way in training (and not at all in evaluation).
    for a, (_, bntt) in zip(ours.conv_units(), peer_lib.peer_units(peer)):
        running_mean = torch.stack([bn.running_mean for bn in bntt.bn_list])
        running_var = torch.stack([bn.running_var for bn in bntt.bn_list])
        torch.testing.assert_close(a.norm.running_mean, running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.norm.running_var, running_var, rtol=0, atol=1e-12)

    pairs = peer_lib.matching_parameters(ours, peer)
    our_params = [a for a, _ in pairs]
    peer_params = [p for _, b in pairs for p in (b if isinstance(b, list) else [b])]
    our_grads = torch.autograd.grad(F.cross_entropy(our_logits, labels), our_params)
    peer_grads = iter(torch.autograd.grad(F.cross_entropy(peer_logits, labels), peer_params))
    first_conv = our_grads[0]
    assert first_conv.abs().sum() > 0  # the gradient crossed every spiking layer to the first convolution
    for (a, b), grad in zip(pairs, our_grads):
        expected = torch.stack([next(peer_grads) for _ in b]) if isinstance(b, list) else next(peer_grads)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_the_lif_node_is_our_neuron_step_by_step():
    """SpikingJelly's node in the configuration used above, against the LIF equations written out:
    u = 0.99 u + x; spike where u > 1; u -= spike (its charge is V - V/tau + X with tau = 100)."""
    node = peer_lib.lif()
    x = torch.randn(6, 5, 7, dtype=torch.float64)
    spikes = node(x)
    u, expected = torch.zeros(5, 7, dtype=torch.float64), []
    for t in range(6):
        u = 0.99 * u + x[t]
        s = (u > 1.0).double()
        u = u - s
        expected.append(s)
    assert torch.equal(spikes, torch.stack(expected))
    assert 0 < spikes.mean() < 1


def test_the_benchmark_times_both_networks(capsys):
    result = peer_lib.main(["--timesteps", "2", "--batch_size", "1", "--img_size", "12", "--steps", "1",
                            "--eval_batches", "1", "--num_classes", "3"])  # fmt: skip
    for name in ("ours", "peer"):
        assert result[f"{name}_step_s"] > 0 and result[f"{name}_eval_img_per_s"] > 0
        assert f"{name}_step_rss_mb" in result
    assert result["spikingjelly"] == "2.0.0" and result["our_neuron_backend"] == "torch"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
