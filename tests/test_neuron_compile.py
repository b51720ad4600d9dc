"""torch.compile sees through the fused neurons: they are torch.library custom ops (``snnseg::spiking_layer``
and its backward), so a dl-vgg9 training step compiles with fullgraph=True (no graph break) and gives the
eager step's loss, gradients and BN statistics."""

import pytest
import torch

from models import build_model
from models.fused import spiking_layer
from models.surrogates import get_surrogate

torch.set_num_threads(2)


def op_args(backend="torch", bn=True, u0=False, hard=False, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 5, 5, dtype=dtype)
    surrogate = get_surrogate("atan")
    return (
        x.requires_grad_(),
        (torch.rand(2, 4, 5, 5, dtype=dtype) * 0.5).requires_grad_() if u0 else None,
        torch.rand(4, 1, 1, dtype=dtype) + 0.3,
        None,
        (torch.rand(2 * 4, dtype=dtype) + 0.5).requires_grad_() if bn else None,
        torch.zeros(2 * 4, dtype=dtype) if bn else None,
        torch.ones(2 * 4, dtype=dtype) if bn else None,
        0.9,
        hard,
        surrogate.name,
        list(surrogate.params.values()),
        2 if bn else 0,
        True,
        0.1,
        1e-4,
        backend,
    )


@pytest.mark.parametrize("bn, u0, hard", [(True, True, False), (False, False, True)])
def test_custom_op_registration_passes_opcheck(bn, u0, hard):
    """torch.library.opcheck: schema (no hidden mutation), fake tensor shapes, autograd registration."""
    torch.library.opcheck(spiking_layer, op_args(bn=bn, u0=u0, hard=hard))


@pytest.mark.parametrize(
    "neuron, backend, reset", [("lif", "torch", "zero"), ("plif", "generic", "subtract")], ids=["torch-op", "generic"]
)
def test_compiled_training_step_has_no_graph_break_and_matches_eager(neuron, backend, reset):
    """The torch loops through the custom op; PLIF on the generic path traces as ordinary autograd."""
    cfg = dict(arch="dl-vgg9", timesteps=2, num_classes=3, encoder="direct", neuron=neuron, neuron_backend=backend)
    cfg["reset"] = reset
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg))
    x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))

    def loss_of(model):
        return lambda x, y: torch.nn.functional.cross_entropy(model(x), y)

    eager = loss_of(models[0])(x, y)
    eager.backward()
    compiled = torch.compile(loss_of(models[1]), fullgraph=True)  # a graph break is an error here
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    for a, b in zip(models[0].buffers(), models[1].buffers()):  # BN running statistics, batches counted
        torch.testing.assert_close(b, a)
    assert any(p.grad.abs().sum() > 0 for p in models[1].parameters())
    assert int(models[1].body[0].norm.num_batches_tracked) == 1


def test_the_op_dispatches_to_the_triton_kernels_by_name():
    """The same op with backend 'triton' (the kernels in Triton's interpreter on CPU) against 'torch'."""
    kernels = pytest.importorskip("models.triton", reason="triton is not installed")
    if not kernels._INTERPRETED:
        pytest.skip("runs the triton backend on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")
    results = []
    for backend in ("torch", "triton"):
        args = op_args(backend=backend, u0=True)
        spikes, _, u, _, _, mean, var = spiking_layer(*args)
        weights = torch.randn_like(spikes, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((spikes * weights).sum() + u.square().sum(), (args[0], args[1], args[4]))
        results.append((spikes, u, mean, var, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert results[0][0].abs().sum() > 0


def test_bench_runs_with_compile_flags_and_another_neuron(capsys):
    import json

    from benchmarks.bench import main

    tiny = ["--timesteps", "2", "--batch_size", "1", "--img_size", "16", "--steps", "1", "--eval_batches", "1"]
    main([*tiny, "--no_floor", "--no_profile", "--compile", "--compile_model", "--neuron", "if", "--reset", "zero"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["compile"] and result["compile_model"] and (result["neuron"], result["reset"]) == ("if", "zero")
    assert result["step_s"] > 0
