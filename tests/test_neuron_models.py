"""Neuron models (models/neurons/): the generic path against hand-written loops and closed forms, the
fused accelerators against the generic path (whole networks in float64), PLIF's learnable leak, the
hard reset, backend choice and its errors, checkpoints of one neuron loaded as another."""

import math

import pytest
import torch

from models import NEURONS, build_model
from models.neurons import IF, LIF, PLIF, backend_name, lif_sequence
from tests.backend_twins import assert_same_run, twin_models
from tests.reference_snn import heaviside_surrogate, linear_grad

torch.set_num_threads(2)


# --------------------------------------------------------------------------- hand-written references
def hand_loop(currents, leak, theta, hard=False, theta_neg=None):
    """Per-timestep loop: charge, fire, reset by subtraction or to zero (no autograd)."""
    mem, out = torch.zeros_like(currents[0]), []
    for current in currents:
        mem = leak * mem + current
        pos = (mem / theta - 1 > 0).to(mem.dtype)
        neg = torch.zeros_like(pos) if theta_neg is None else (mem / theta_neg - 1 > 0).to(mem.dtype)
        spike = pos - neg
        out.append(spike)
        if hard:
            mem = torch.where(spike != 0, torch.zeros_like(mem), mem)
        else:
            mem = mem - pos * theta - (0 if theta_neg is None else neg * theta_neg)
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["generic", "torch"])
@pytest.mark.parametrize("negative", [False, True])
def test_hard_reset_spikes_match_the_hand_loop(backend, negative):
    torch.manual_seed(0)
    currents = torch.rand(10, 2, 3, 4, 4, dtype=torch.float64) * 2.4 - 1.0
    theta = torch.tensor([0.5, 0.8, 1.1], dtype=torch.float64).view(3, 1, 1)
    theta_neg = -theta / 2 if negative else None
    spikes = lif_sequence(currents, 0.9, theta, threshold_neg=theta_neg, backend=backend, reset="zero")
    expected = hand_loop(currents, 0.9, theta, hard=True, theta_neg=theta_neg)
    assert torch.equal(spikes, expected) and spikes.abs().sum() > 10
    assert (spikes < 0).any() == negative
    assert not torch.equal(expected, hand_loop(currents, 0.9, theta, hard=False, theta_neg=theta_neg))


@pytest.mark.parametrize("backend", ["generic", "torch"])
def test_hard_reset_gradient_matches_closed_form(backend):
    # L = sum_t w_t s_t, u_t = leak * k_{t-1} * u_{t-1} + I_t with k_j = 1 - s_j (the spike detached):
    # dL/dI_k = sum_{t>=k} w_t g(x_t) / theta * prod_{j=k}^{t-1} leak * k_j.
    torch.manual_seed(2)
    T, leak, theta = 9, 0.8, 0.7
    currents = (torch.rand(T, 6, dtype=torch.float64) * 0.9).requires_grad_()
    weights = torch.randn(T, 6, dtype=torch.float64)
    spikes = lif_sequence(currents, leak, theta, backend=backend, reset="zero")
    (grad,) = torch.autograd.grad((spikes * weights).sum(), currents)
    mem, x, keep = torch.zeros(6, dtype=torch.float64), [], []
    for t in range(T):
        mem = leak * mem + currents[t].detach()
        x.append(mem / theta - 1)
        keep.append(1 - (x[-1] > 0).double())
        mem = mem * keep[-1]
    assert sum(k.sum() for k in keep) < T * 6 - 5  # some resets happened
    expected = torch.zeros(T, 6, dtype=torch.float64)
    for k in range(T):
        factor = torch.ones(6, dtype=torch.float64)
        for t in range(k, T):
            expected[k] += weights[t] * 0.3 * torch.clamp(1 - x[t].abs(), min=0) / theta * factor
            factor = factor * leak * keep[t]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_generic_and_torch_lif_sequence_agree_with_negative_threshold(reset):
    torch.manual_seed(3)
    currents = (torch.randn(7, 2, 3, 4, 4, dtype=torch.float64) * 0.8).requires_grad_()
    theta = torch.rand(3, 1, 1, dtype=torch.float64) + 0.5
    weights = torch.randn_like(currents)
    results = []
    for backend in ("generic", "torch"):
        spikes = lif_sequence(currents, 0.95, theta, threshold_neg=-theta / 2, backend=backend, reset=reset)
        results.append((spikes, *torch.autograd.grad((spikes * weights).sum(), currents)))
    (spikes_a, grad_a), (spikes_b, grad_b) = results
    assert torch.equal(spikes_a, spikes_b) and (spikes_a < 0).any()
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-14)


def test_if_neuron_has_no_leak_whatever_leak_mem_says():
    torch.manual_seed(4)
    currents = torch.rand(6 * 2, 3, 4, 4)
    spikes = IF(leak=0.5, threshold=0.7)(currents, steps=6)
    expected = hand_loop(currents.view(6, 2, 3, 4, 4), 1.0, 0.7)
    assert torch.equal(spikes.view(6, 2, 3, 4, 4), expected)
    assert IF(leak=0.5).leak == 1.0 and IF().lif_params().leak == 1.0


# ------------------------------------------------------------------------------------------------ PLIF
def test_plif_learns_its_leak_as_the_per_step_reference_says():
    """Forward and gradients (currents and the leak's parameter w) against a hand-written loop with
    autograd through leak = sigmoid(w) and the reference spike function."""
    torch.manual_seed(5)
    plif = PLIF(leak=0.8, threshold=0.6).double()
    assert plif.leak_logit.item() == pytest.approx(math.log(0.8 / 0.2))
    currents = (torch.rand(5 * 2, 3, 4, 4, dtype=torch.float64) * 0.9).requires_grad_()
    weights = torch.randn(5 * 2, 3, 4, 4, dtype=torch.float64)
    spikes = plif(currents, steps=5)
    grads = torch.autograd.grad((spikes * weights).sum(), (currents, plif.leak_logit))

    w = plif.leak_logit.detach().clone().requires_grad_()
    theta = float(plif.threshold)  # 0.6 rounded to float32, as the buffer holds it
    mem, out = 0, []
    for current in currents.view(5, 2, 3, 4, 4):
        mem = torch.sigmoid(w) * mem + current
        spike = heaviside_surrogate(mem / theta - 1, linear_grad)
        mem = mem - theta * spike.detach()
        out.append(spike)
    reference = torch.stack(out).flatten(0, 1)
    expected = torch.autograd.grad((reference * weights).sum(), (currents, w))
    assert torch.equal(spikes, reference) and spikes.sum() > 0
    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(grads[1], expected[1])
    assert grads[1].abs() > 0


def test_plif_leak_is_a_parameter_of_the_model_and_trains():
    model = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, neuron="plif", leak_mem=0.9))
    names = [k for k in model.state_dict() if k.endswith("act.leak_logit")]
    assert len(names) == len(model.neuron_layers()) == 8
    assert model.neuron_backend == "generic"
    out = model(torch.rand(2, 3, 16, 16))
    torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 16, 16))).backward()
    assert all(n.leak_logit.grad is not None and n.leak_logit.grad != 0 for n in model.neuron_layers())


@pytest.mark.parametrize("leak", [1.0, 1 - 1e-9])
def test_plif_refuses_a_leak_it_cannot_represent(leak):
    with pytest.raises(ValueError, match=r"neuron 'plif'.*leak_mem in \(0, 1\)") as err:
        build_model(dict(arch="dl-vgg9", timesteps=2, neuron="plif", leak_mem=leak))
    assert "\n" not in str(err.value)
    for outside in (0.0, 1.5, -0.5):  # the config's range of leak_mem refuses these first
        with pytest.raises(ValueError, match=r"leak_mem in \(0, 1\)"):
            PLIF(leak=outside)
    assert torch.sigmoid(PLIF(leak=0.999).leak_logit).item() == pytest.approx(0.999)


# -------------------------------------------------------------------------------------- backend choice
def test_backend_refusal_is_one_line_naming_both():
    with pytest.raises(ValueError) as err:
        build_model(dict(arch="dl-vgg9", timesteps=2, neuron="plif", neuron_backend="torch"))
    assert "neuron_backend 'torch' does not support neuron 'plif'; use 'generic' or 'auto'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown neuron 'alif'"):
        build_model(dict(arch="dl-vgg9", timesteps=2, neuron="alif"))
    with pytest.raises(ValueError, match="unknown reset 'hard'"):
        build_model(dict(arch="dl-vgg9", timesteps=2, reset="hard"))


def test_auto_picks_the_fastest_backend_that_supports_the_neuron():
    cpu = torch.device("cpu")
    assert backend_name(LIF().accelerator(cpu)) == "torch"
    assert backend_name(IF(reset="zero").accelerator(cpu)) == "torch"
    assert backend_name(PLIF().accelerator(cpu)) == "generic"
    assert backend_name(LIF(backend="generic").accelerator(cpu)) == "generic"

    class Slower(LIF):  # a subclass with dynamics of its own is not what the accelerators compute
        kind = "slower"

        def charge(self, state, current):
            return (0.5 * state[0] + current,)

    assert Slower().lif_params() is None and backend_name(Slower().accelerator(cpu)) == "generic"
    model = build_model(dict(arch="dl-vgg9", timesteps=2, neuron="if"))
    model.set_neuron_backend("generic")
    assert model.neuron_backend == "generic"
    plif = build_model(dict(arch="dl-vgg9", timesteps=2, neuron="plif"))
    with pytest.raises(ValueError, match="does not support neuron 'plif'"):
        plif.set_neuron_backend("torch")
    assert plif.neuron_backend == "generic" and all(n.backend == "auto" for n in plif.neuron_layers())


# ------------------------------------------------------------------- whole networks: generic vs torch
@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
@pytest.mark.parametrize("neuron", ["lif", "if"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_torch_loops_train_like_the_generic_path(arch, neuron, reset):
    models = twin_models(arch=arch, neuron=neuron, reset=reset)
    assert [m.neuron_backend for m in models] == ["generic", "torch"]
    assert_same_run(models)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(arch="fcn-vgg9", leaky=True, alpha=0.5, full_prop=True, encoder="poisson"),
        dict(arch="fcn-vgg9", leaky=True, alpha=0.5, reset="zero", surrogate="atan"),
        dict(memory_saving=True, memory_block=2, timesteps=4, reset="zero"),
    ],
    ids=["negative-threshold-full-prop", "negative-threshold-hard-reset", "memory-saving"],
)
def test_generic_path_with_negative_threshold_full_propagation_and_memory_saving(cfg):
    assert_same_run(twin_models(**cfg))


def test_generic_memory_saving_carries_the_state_and_counts_bn_once():
    """Blocks of 2 timesteps replayed in backward on the generic path = one pass of 4 on the torch
    loops: logits, gradients and BN running statistics (updated once per batch, not again in the replay)."""
    generic, plain = twin_models(memory_saving=True, memory_block=2, timesteps=4)
    plain.config["memory_saving"] = plain.memory_saving = False
    assert_same_run([generic, plain])
    assert all(int(n.num_batches_tracked) == 1 for n in generic.modules() if hasattr(n, "num_batches_tracked"))


def test_memory_saving_replay_does_not_count_spikes_twice():
    """On the torch loops too: the blocks replayed in backward are not recorded again (fcn-vgg9: the
    decoder's neurons as well)."""
    saving, plain = twin_models(("torch", "torch"), arch="fcn-vgg9", memory_saving=True, memory_block=2, timesteps=4)
    plain.config["memory_saving"] = plain.memory_saving = False
    assert_same_run([saving, plain])


def test_eval_mode_after_training_on_the_other_backend():
    models = twin_models(neuron="if", reset="zero")
    assert_same_run(models)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out_a, out_b = (m.eval()(x) for m in models)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)


def test_lif_logits_do_not_depend_on_the_new_keys_defaults():
    """Today's LIF model (no neuron/reset keys) = neuron lif, reset subtract, bit for bit."""
    torch.manual_seed(0)
    old = build_model(dict(arch="dl-vgg9", timesteps=3, num_classes=3, encoder="direct"))
    torch.manual_seed(0)
    new = build_model(
        dict(arch="dl-vgg9", timesteps=3, num_classes=3, encoder="direct", neuron="lif", reset="subtract")
    )
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(old(x), new(x))
    assert new.config["neuron"] == "lif" and new.config["reset"] == "subtract"


# ------------------------------------------------------------------------ checkpoints across neurons
def test_loading_a_plif_checkpoint_into_another_neuron_is_a_one_line_error():
    from utils.checkpoint import CheckpointError, load_state

    plif = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, neuron="plif"))
    lif_cfg = dict(plif.config, neuron="if")
    lif = build_model(lif_cfg)
    with pytest.raises(CheckpointError) as err:
        load_state(lif, plif.state_dict(), "run.pth", lif_cfg)
    message = str(err.value)
    assert "\n" not in message and "'neuron'" in message and "leak_logit" in message and "'plif'" in message
    with pytest.raises(CheckpointError, match="lack 'leak_logit' of neuron 'plif'"):
        load_state(plif, lif.state_dict(), "run.pth", plif.config)
    load_state(lif, build_model(dict(lif_cfg, neuron="lif")).state_dict(), "run.pth", lif_cfg)  # same tensors


def test_a_checkpoint_without_neuron_keys_loads_as_lif_with_subtraction():
    from utils.checkpoint import build_model_from_checkpoint

    torch.manual_seed(0)
    model = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, encoder="direct"))
    old_config = {k: v for k, v in model.config.items() if k not in ("neuron", "reset")}
    loaded = build_model_from_checkpoint({"config": old_config, "state_dict": model.state_dict()}, "old.pth")
    assert loaded.config["neuron"] == "lif" and loaded.config["reset"] == "subtract"
    assert type(loaded.neuron_layers()[0]) is LIF and not loaded.neuron_layers()[0].hard_reset
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_resume_with_another_neuron_is_refused():
    import train

    model = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3))
    checkpoint = {"optimizer": {}, "scheduler": {}, "epoch": 1, "best_miou": 0.0, "rng": {}}
    checkpoint["config"] = {**model.config, "dataset": "synthetic"}
    cfg = {**checkpoint["config"], "epochs": 3}
    train.check_resume(checkpoint, "last.pth", cfg)  # the same model: fine
    for key, value in (("neuron", "if"), ("reset", "zero")):
        with pytest.raises(ValueError, match=f"{key} .* -> '{value}'"):
            train.check_resume(checkpoint, "last.pth", {**cfg, key: value})


def test_every_shipped_neuron_is_registered():
    assert {"lif", "if", "plif"} <= set(NEURONS)


# -------------------------------------------------------------- whole networks: generic vs the kernels
def _interpreted_triton():
    kernels = pytest.importorskip("models.triton", reason="triton is not installed")
    if not kernels._INTERPRETED:
        pytest.skip("runs the triton backend on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")
    return kernels


@pytest.mark.parametrize("arch, neuron", [("dl-vgg9", "lif"), ("fcn-vgg9", "if")])
def test_triton_kernels_train_like_the_generic_path(arch, neuron):
    _interpreted_triton()
    models = twin_models(("generic", "triton"), arch=arch, neuron=neuron, timesteps=2)
    assert [m.neuron_backend for m in models] == ["generic", "triton"]
    assert_same_run(models)


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
def test_triton_kernels_hard_reset_train_like_the_generic_path(arch):
    _interpreted_triton()
    assert_same_run(twin_models(("generic", "triton"), arch=arch, reset="zero", timesteps=2))
