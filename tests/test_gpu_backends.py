"""On a CUDA GPU: the compiled Triton kernels against the torch backend, on whole networks.

The other Triton tests run the kernels in Triton's interpreter on CPU tensors, so they skip on a GPU
machine; this file is the one that checks what the GPU itself runs (and skips without CUDA).
benchmarks/gpu_suite.sh runs it first, before any timing.

dl-vgg9 and fcn-vgg9, in training and in evaluation mode, the same weights and input on both backends:
- float64 (IEEE division in the kernels): every layer's spikes equal, logits and every gradient equal to
  float64 rounding, and the BN running statistics too;
- float32 (what training runs): float32 rounding of the BN statistics may flip a spike whose membrane is
  within rounding of the threshold, so at most 1 in 10^4 spikes of a layer may differ, and the logits and
  every gradient must agree to 1e-3 of their norm.
"""

import pytest
import torch
import torch.nn.functional as F

import models.parts as parts
from models import build_model

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the interpreted Triton tests cover CPU machines)", allow_module_level=True)
lif_triton = pytest.importorskip("models.lif_triton", reason="triton is not installed")
if lif_triton._INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled", allow_module_level=True)

DEVICE = torch.device("cuda")
T, N, SIZE, CLASSES = 4, 2, 32, 5


def twin_models(arch, dtype, mode, monkeypatch):
    """The same SNN on the torch and on the triton backend. For evaluation, running statistics of one
    training batch (momentum 1), so that the evaluation-mode currents are of the training scale."""
    cfg = dict(arch=arch, timesteps=T, num_classes=CLASSES, in_channels=3, encoder="poisson", def_threshold=0.5)
    torch.manual_seed(0)
    nets = [build_model({**cfg, "neuron_backend": b}).to(DEVICE, dtype) for b in ("torch", "triton")]
    if mode == "eval":
        monkeypatch.setattr(parts, "BN_MOMENTUM", 1.0)
        with torch.no_grad():
            torch.manual_seed(1)
            nets[0].train()(torch.rand(N, 3, SIZE, SIZE, device=DEVICE, dtype=dtype) - 0.5)
        monkeypatch.undo()
    nets[1].load_state_dict(nets[0].state_dict())
    assert [m.neuron_backend for m in nets] == ["torch", "triton"]
    for m in nets:
        m.train(mode == "train")
    return nets


def run(model, x, labels):
    """(per-layer spikes, logits, gradients) of one forward and backward, Poisson draws from seed 7."""
    spikes = []
    hooks = [unit.register_forward_hook(lambda m, a, out: spikes.append(out.detach())) for unit in model.conv_units()]
    try:
        torch.manual_seed(7)
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(logits.float(), labels), params)
    return spikes, logits.detach(), grads


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_triton_kernels_on_the_gpu_match_the_torch_backend(arch, mode, dtype, monkeypatch):
    nets = twin_models(arch, dtype, mode, monkeypatch)
    torch.manual_seed(2)
    x = (torch.rand(N, 3, SIZE, SIZE, device=DEVICE, dtype=dtype) - 0.5) * 1.6
    labels = torch.randint(0, CLASSES, (N, SIZE, SIZE), device=DEVICE)
    (spikes_t, logits_t, grads_t), (spikes_k, logits_k, grads_k) = (run(m, x, labels) for m in nets)

    assert len(spikes_t) == len(spikes_k) == len(nets[0].conv_units())
    assert all(s.sum() > 0 for s in spikes_t[:3])  # the first layers fire (so the comparison means something)
    assert logits_t.abs().max() > 0
    if dtype == torch.float64:
        for layer, (a, b) in enumerate(zip(spikes_t, spikes_k)):
            assert torch.equal(a, b), f"layer {layer}: {int((a != b).sum())} spikes differ"
        torch.testing.assert_close(logits_k, logits_t, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_k, grads_t):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        for a, b in zip(nets[1].buffers(), nets[0].buffers()):  # BN running statistics
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        for layer, (a, b) in enumerate(zip(spikes_t, spikes_k)):
            differ = int((a != b).sum())
            assert differ <= max(1, a.numel() // 10_000), f"layer {layer}: {differ} of {a.numel()} spikes differ"
        assert relative_error(logits_k, logits_t) < 1e-3
        for k, (a, b) in enumerate(zip(grads_k, grads_t)):
            if b.abs().max() > 0:
                assert relative_error(a, b) < 1e-3, f"gradient {k}: relative error {relative_error(a, b):.2e}"
        for a, b in zip(nets[1].buffers(), nets[0].buffers()):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in grads_t[:1])  # the gradient reached the first convolution
