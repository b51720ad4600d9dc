"""Two float64 twins of one SNN on two neuron backends, and the check that a training step gives both the
same logits, gradients, spike counts and BN statistics (tests/test_neuron_models.py,
tests/test_neuron_backends.py)."""

import torch

from models import build_model


def twin_models(backends=("generic", "torch"), **cfg):
    """The same float64 SNN on two backends (same weights, same buffers)."""
    base = dict(arch="dl-vgg9", timesteps=3, num_classes=3, in_channels=3, encoder="direct", def_threshold=0.4)
    base.update(cfg)
    models = []
    for name in backends:
        torch.manual_seed(0)
        models.append(build_model({**base, "neuron_backend": name}).double())
    models[1].load_state_dict(models[0].state_dict())
    return models


def run(model, x, target):
    """Logits, every parameter's gradient and every layer's spike count of one training step."""
    model.zero_grad()
    model.record_spikes(True)
    model.reset_spike_stats()
    torch.manual_seed(7)  # the same Poisson draws for both models
    out = model(x)
    torch.nn.functional.cross_entropy(out, target).backward()
    model.record_spikes(False)
    return out.detach(), [p.grad.clone() for p in model.parameters()], [s["spikes"] for s in model.spike_stats()]


def assert_same_run(models, size=8):
    torch.manual_seed(2)
    x = torch.rand(2, 3, size, size, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, 3, (2, size, size))
    (out_a, grads_a, spikes_a), (out_b, grads_b, spikes_b) = (run(m, x, target) for m in models)
    assert spikes_a == spikes_b and sum(spikes_a) > 0
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(models[0].buffers(), models[1].buffers()):  # BN's running statistics
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
