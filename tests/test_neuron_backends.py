"""The two neuron backends run the same model: the Triton kernels (through Triton's interpreter on CPU
tensors, as ``tests/conftest.py`` sets it up) against the torch loops and the per-timestep reference.

Whole networks in float64, where a spike flip between two correct implementations is practically
impossible: spikes must agree exactly, logits and every gradient to float64 rounding.
"""

import pytest
import torch

import models.neurons as neurons
from models import build_model, lif_sequence, lif_torch
from models.surrogates import SURROGATES
from tests.backend_twins import assert_same_run
from tests.backend_twins import twin_models as _twins
from tests.reference_snn import per_timestep_forward

triton_backend = pytest.importorskip("models.triton", reason="triton is not installed")
if not triton_backend._INTERPRETED:  # on a GPU machine conftest leaves the interpreter off
    pytest.skip(
        "these tests run the triton backend on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)",
        allow_module_level=True,
    )
torch.set_num_threads(2)


def twin_models(**cfg):
    """The same float64 SNN twice, on the torch and the triton backend."""
    return _twins(("torch", "triton"), **cfg)


def record_inputs(model):
    """Each neuron layer's input shape, from one forward (for threshold maps of the right shape)."""
    shapes = {}

    def remember(module, args):
        shapes.setdefault(module, args[0].shape[1:])  # returns None: the arguments stay as they are

    hooks = [lif.register_forward_pre_hook(remember) for lif in model.neuron_layers()]
    with torch.no_grad():
        model.eval()(torch.rand(2, 3, 8, 8, dtype=torch.float64))  # eval: the running statistics stay
    model.train()
    for hook in hooks:
        hook.remove()
    return shapes


def set_thresholds(models, kind):
    torch.manual_seed(1)
    shapes = record_inputs(models[0])
    for lifs in zip(*(m.neuron_layers() for m in models)):
        c, h, w = shapes[lifs[0]]
        theta = torch.rand(c, 1, 1) * 0.6 + 0.2 if kind == "channel" else torch.rand(c, h, w) * 0.6 + 0.2
        for lif in lifs:
            lif.set_threshold(theta.double())


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
def test_triton_backend_trains_like_the_torch_backend(arch):
    models = twin_models(arch=arch)
    assert [m.neuron_backend for m in models] == ["torch", "triton"]
    assert_same_run(models)


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_every_surrogate_through_lif_sequence(surrogate):
    """Each surrogate's slope on both backends (the whole networks below use the default one)."""
    torch.manual_seed(3)
    currents = (torch.rand(5, 2, 3, 4, 4, dtype=torch.float64) * 1.5 - 0.3).requires_grad_()
    theta = torch.rand(3, 1, 1, dtype=torch.float64) + 0.5
    weights = torch.randn_like(currents)
    results = []
    for backend in ("torch", "triton"):
        spikes = lif_sequence(currents, 0.9, theta, surrogate, threshold_neg=-theta / 0.5, backend=backend)
        results.append((spikes, *torch.autograd.grad((spikes * weights).sum(), currents)))
    (spikes_a, grad_a), (spikes_b, grad_b) = results
    assert torch.equal(spikes_a, spikes_b) and spikes_a.abs().sum() > 0
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-10, atol=1e-12)
    assert grad_a.abs().sum() > 0


@pytest.mark.parametrize("kind", ["channel", "neuron"])
def test_channel_and_neuron_thresholds(kind):
    models = twin_models()
    set_thresholds(models, kind)
    assert_same_run(models)


def test_imbalanced_negative_threshold_and_full_propagation():
    assert_same_run(twin_models(arch="fcn-vgg9", leaky=True, alpha=0.5, full_prop=True, encoder="poisson"))


def test_memory_saving_blocks_carry_the_membrane():
    assert_same_run(twin_models(memory_saving=True, memory_block=2, timesteps=4))


def test_eval_mode_uses_running_statistics():
    models = twin_models()
    assert_same_run(models)  # one training forward moves the running statistics off their initial values
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out_a, out_b = (m.eval()(x) for m in models)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)


def test_triton_backend_matches_the_per_timestep_reference():
    """The independent twin: every layer once per timestep, autograd through time (tests/reference_snn.py)."""
    model = twin_models(encoder="direct")[1]
    frames = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1).expand(3, -1, -1, -1, -1)
    out = model(frames[0])
    reference = per_timestep_forward(model, frames)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    weights = [u.conv.weight for u in model.conv_units()]
    grads = torch.autograd.grad(out.square().sum(), weights)
    expected = torch.autograd.grad(reference.square().sum(), weights)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_backend_is_not_part_of_the_checkpoint():
    """A model trained on one backend evaluates unchanged on the other: same state dict keys and tensors."""
    torch_model, triton_model = twin_models()
    assert_same_run([torch_model, triton_model])
    state = triton_model.state_dict()
    assert list(state) == list(torch_model.state_dict())
    fresh = build_model(dict(torch_model.config, neuron_backend="torch")).double()
    fresh.load_state_dict(state)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), triton_model.eval()(x), rtol=1e-10, atol=1e-12)


def test_backend_choice_is_made_in_one_place(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert neurons.backend_for("torch", cuda) is lif_torch
    assert neurons.backend_for("auto", cpu) is lif_torch
    assert neurons.backend_for("auto", cuda) is triton_backend
    assert neurons.backend_for("triton", cpu) is triton_backend  # the interpreter is on in the tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(UserWarning, match="runs on CUDA tensors"):
        neurons._warn_triton_fallback.cache_clear()
        assert neurons.backend_for("triton", cpu) is lif_torch
    with pytest.raises(ValueError, match="unknown neuron_backend 'cuda'"):
        build_model(dict(arch="dl-vgg9", timesteps=2, neuron_backend="cuda"))


def test_switching_backends_keeps_the_weights():
    model = twin_models()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_neuron_backend("triton")
    assert model.neuron_backend == "triton" and model.config["neuron_backend"] == "triton"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def work_per_training_step(timesteps, backend):
    """Operations that launch work in one SGD step of dl-vgg9: aten ops (views and allocations aside) plus
    Triton kernel launches; what the interpreter itself does with the kernels' arguments (absent on a GPU)
    is not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    free = {
        "view",
        "as_strided",
        "select",
        "slice",
        "permute",
        "t",
        "expand",
        "reshape",
        "_unsafe_view",
        "alias",
        "unsqueeze",
        "squeeze",
        "detach",
        "transpose",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "promote_types",
        "result_type",
        "_record_function_enter_new",
        "_record_function_exit",
        "set_",
    }
    counted, interpreting = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not interpreting and func.overloadpacket.__name__ not in free:
                counted.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def launch(self, *args, **kwargs):
        counted.append(self.fn.__name__)
        interpreting.append(True)
        try:
            return run(self, *args, **kwargs)
        finally:
            interpreting.pop()

    torch.manual_seed(0)
    model = build_model(dict(arch="dl-vgg9", timesteps=timesteps, num_classes=4, neuron_backend=backend))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    x, y = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # the optimizer's state exists from now on
    run = InterpretedFunction.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InterpretedFunction, "run", launch)
        with Count():
            step()
    return counted


def test_triton_backend_work_per_step_does_not_grow_with_timesteps():
    """The fused kernels loop over time inside: a training step launches as much work at T=4 as at T=2
    (the torch backend launches a few ops per timestep and layer), and stays well under 300."""
    short, long = work_per_training_step(2, "triton"), work_per_training_step(4, "triton")
    assert sorted(short) == sorted(long) and len(long) < 300
    assert long.count("_lif_forward_kernel") == long.count("_lif_backward_kernel") == 8  # one per layer
    assert len(work_per_training_step(4, "torch")) > 1.5 * len(work_per_training_step(2, "torch"))


def test_bf16_autocast_on_the_triton_backend():
    """Convolutions in bf16, the membrane in float32: per layer, the spike counts stay within a few per cent
    of the float32 run's on both backends (the torch backend also rounds BN's output to bf16, the kernels
    normalise in float32, so the two flip different neurons), and every parameter gets a finite gradient."""
    torch.manual_seed(0)
    models = [
        build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, neuron_backend=name, def_threshold=0.4))
        for name in ("torch", "triton")
    ]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.rand(2, 3, 8, 8)

    def spike_counts(model, amp):
        model.zero_grad()
        model.reset_spike_stats()
        model.record_spikes(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        out.float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        return torch.tensor([s["spikes"] for s in model.spike_stats()])

    exact = spike_counts(models[0], False)
    assert exact.min() > 100
    for model in models:
        assert ((spike_counts(model, True) - exact).abs() / exact).max() < 0.05
