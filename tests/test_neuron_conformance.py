"""The conformance suite: every registered neuron model (``models.NEURONS``, read when the tests are collected:
a researcher's own neuron joins by being registered in a module that ``models`` imports) runs through what the
project promises of a neuron, on the smallest network that exercises it (two spiking conv units and a readout,
float64, T = 3, 6x6 images):

- memory-saving mode (blocks of one timestep replayed in backward) equals one pass: logits, every gradient,
  BN statistics, spike counts;
- ``torch.compile`` (fullgraph, AOTAutograd's joint graph; the ``aot_eager`` backend, so that the check costs a
  trace and not a C++ build) equals eager to 1e-9. In float64 a multi-level rounding flip (a value within 1e-15
  of a level boundary) does not occur on these inputs; the number of differing spikes is reported if one does;
- a checkpoint round trip (utils/checkpoint.py) rebuilds the same model; resuming after one optimiser step
  gives the parameters of two uninterrupted steps, bit for bit;
- evaluation on the other backend: the fused torch loops where the neuron's class says they run it (LIF, IF),
  else the refusal of 'torch' in one line and the same logits under 'auto';
- spike counts and energy against a hand count (events = the sum of the levels the neurons output; the 1x1
  convolutions' synaptic operations = events x output channels; analog outputs as dense MACs);
- the options the class does not support (the keys it ignores, the torch backend, ``compile`` on the generic
  path) are one-line errors of train.py naming the key and the neuron.
"""

import pytest
import torch
import torch.nn.functional as F

import train
from models import NEURONS, build_model
from models.architectures import ARCHITECTURES, register_architecture
from models.network import SegmentationNet
from models.neurons import supports
from tests.conftest import one_line_error
from utils.energy import OpCounter

torch.set_num_threads(2)

KINDS = sorted(NEURONS)
T, N, SIZE, CLASSES = 3, 2, 6, 3
ARCH = "conformance-net"


class ConformanceNet(SegmentationNet):
    """conv 3x3 unit (analog input) -> conv 1x1 unit (reads the first neurons) -> 1x1 readout."""

    @classmethod
    def min_input_size(cls):
        return 1

    def build(self, cfg, parts):
        self.conv1 = parts.conv_unit(cfg["in_channels"], 4, 3)
        self.conv2 = parts.conv_unit(4, 4, 1)
        self.head = parts.readout(4, cfg["num_classes"])

    def forward_steps(self, h):
        return self.conv2(self.conv1(h))


@pytest.fixture(scope="module", autouse=True)
def conformance_arch():
    register_architecture(ARCH)(ConformanceNet)
    yield
    del ARCHITECTURES[ARCH]


def config(kind, **extra):
    cfg = dict(
        arch=ARCH,
        timesteps=T,
        num_classes=CLASSES,
        in_channels=3,
        img_size=SIZE,
        encoder="direct",
        neuron=kind,
        def_threshold=0.5,
        spike_levels=3,
        neuron_backend="generic",
    )
    return {**cfg, **extra}


def net(kind, seed=0, dtype=torch.float64, **extra):
    torch.manual_seed(seed)
    model = build_model(config(kind, **extra)).to(dtype)
    with torch.no_grad():  # BNTT scales away from 1, so that the neurons see a range of currents
        for unit in (model.conv1, model.conv2):
            unit.norm.weight.uniform_(0.8, 2.0)
    return model


def batch(seed=2, dtype=torch.float64):
    torch.manual_seed(seed)
    x = torch.rand(N, 3, SIZE, SIZE, dtype=dtype) * 2 - 0.5
    return x, torch.randint(0, CLASSES, (N, SIZE, SIZE))


def step(model, x, y):
    """Logits, gradients (None-safe), spike counts of one training step."""
    model.train()
    model.zero_grad()
    model.record_spikes(True)
    model.reset_spike_stats()
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    model.record_spikes(False)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return logits.detach(), grads, [s["spikes"] for s in model.spike_stats()]


def assert_same(a, b, tol=1e-10):
    (logits_a, grads_a, spikes_a), (logits_b, grads_b, spikes_b) = a, b
    assert spikes_a == spikes_b and sum(spikes_a) > 0
    torch.testing.assert_close(logits_a, logits_b, rtol=tol, atol=tol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)
    assert any(g.abs().sum() > 0 for g in grads_a)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_saving_equals_one_pass(kind):
    x, y = batch()
    plain, saving = net(kind), net(kind, memory_saving=True, memory_block=1)
    assert_same(step(plain, x, y), step(saving, x, y))
    for a, b in zip(plain.buffers(), saving.buffers()):  # BN statistics updated once per batch
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_neuron_layer_equals_eager(kind):
    """conv -> neurons, compiled whole (fullgraph: a graph break is an error), forward and backward."""
    from models.config import resolve_model_config
    from models.neurons import neuron_arguments

    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = resolve_model_config(config(kind, timesteps=2, arch="dl-vgg9"))
        neuron = NEURONS[kind](**neuron_arguments(cfg)).double()
        layers.append((torch.nn.Conv2d(2, 3, 3, padding=1).double(), neuron))
    torch.manual_seed(1)
    x = torch.rand(2 * N, 2, 5, 5, dtype=torch.float64) * 2
    w = torch.randn(2 * N, 3, 5, 5, dtype=torch.float64)
    results = []
    for (conv, neuron), compile_it in zip(layers, (False, True)):
        run = lambda x, conv=conv, neuron=neuron: neuron(conv(x), steps=2)  # noqa: E731
        if compile_it:
            run = torch.compile(run, backend="aot_eager", fullgraph=True)
        x_ = x.clone().requires_grad_()
        spikes = run(x_)
        params = [x_, *conv.parameters(), *neuron.parameters()]
        results.append((spikes.detach(), torch.autograd.grad((spikes * w).sum(), params)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    flips = int((eager != compiled).sum())
    assert flips == 0, f"{flips} spikes differ between compiled and eager"
    assert eager.sum() > 0
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    assert eager_grads[1].abs().sum() > 0


def checkpoint_of(model, optimizer, path):
    from utils.checkpoint import FORMAT, save_checkpoint

    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "config": model.config,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
    )


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_and_resume(kind, tmp_path):
    """Two Adam steps in one go, and one step, a checkpoint, a model rebuilt from it, then the second step:
    the same parameters and buffers bit for bit (every learned tensor and state is in the checkpoint). In
    float32, the dtype a checkpoint rebuilds."""
    from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

    x, y = batch(dtype=torch.float32)
    straight = net(kind, dtype=torch.float32)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    for _ in range(2):
        step(straight, x, y)
        opt.step()
    first = net(kind, dtype=torch.float32)
    opt = torch.optim.Adam(first.parameters(), lr=1e-2)
    step(first, x, y)
    opt.step()
    checkpoint_of(first, opt, tmp_path / "last.pth")
    saved = load_checkpoint(tmp_path / "last.pth")
    resumed = build_model_from_checkpoint(saved, "last.pth")
    assert type(resumed.conv1.act) is NEURONS[kind]
    with torch.no_grad():  # the round trip: the same model
        assert torch.equal(resumed.eval()(x), first.eval()(x))
    opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt.load_state_dict(saved["optimizer"])
    step(resumed, x, y)
    opt.step()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_on_the_other_backend(kind):
    """A model trained on the generic path evaluates on the torch loops where they run the neuron; elsewhere
    'torch' is refused in one line and 'auto' runs the generic path, with the same logits."""
    x, y = batch()
    trained = net(kind)
    step(trained, x, y)
    with torch.no_grad():
        expected = trained.eval()(x)
    fused = supports("torch", trained.conv1.act)
    if not fused:
        with pytest.raises(ValueError) as err:
            build_model(config(kind, neuron_backend="torch"))
        assert "\n" not in str(err.value) and f"'{kind}'" in str(err.value) and "'torch'" in str(err.value)
    other = build_model(config(kind, neuron_backend="torch" if fused else "auto")).double()
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), expected, rtol=1e-10, atol=1e-12)
    assert (other.conv1.act.accelerator(x.device) is not None) == fused


@pytest.mark.parametrize("kind", KINDS)
def test_spike_counts_and_energy_against_a_hand_count(kind):
    model = net(kind).eval()
    x, _ = batch()
    outputs = {}
    hooks = [
        unit.act.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out.detach()))
        for name, unit in (("conv1", model.conv1), ("conv2", model.conv2))
    ]
    model.record_spikes(True)
    model.reset_spike_stats()
    with torch.no_grad(), OpCounter(model) as counter:
        model(x)
    for hook in hooks:
        hook.remove()
    rows = {row["name"]: row for row in counter.summary()["per_layer"]}  # per image
    activity = model.conv1.act.emits()
    for name, unit in (("conv1", model.conv1), ("conv2", model.conv2)):
        stats = unit.act.spike_stats()
        assert stats["spikes"] == float(outputs[name].abs().sum()) and stats["steps"] == T
        assert stats["firing"] == float((outputs[name] != 0).sum()) or activity.levels == 0
    assert rows["conv1"]["macs"] == T * SIZE * SIZE * 4 * 3 * 9  # analog (direct) input: dense MACs
    readers = (("conv2", outputs["conv1"], 4), ("head", outputs["conv2"], CLASSES))  # 1x1 convolutions
    for name, source, channels in readers:
        if activity.is_spikes:
            assert rows[name]["sops"] == float(source.abs().sum()) * channels / N and rows[name]["macs"] == 0, name
        else:
            active = int((source.flatten(1) != 0).any(1).sum())
            assert rows[name]["macs"] == active * SIZE * SIZE * channels * 4 / N and rows[name]["sops"] == 0, name
    assert outputs["conv1"].abs().sum() > 0


EXAMPLE_VALUES = {  # a value other than the default for each key a neuron may ignore
    "leak_mem": "0.5",
    "def_threshold": "0.5",
    "reset": "zero",
    "surrogate": "atan",
    "surrogate_params": "{gamma: 0.5}",
    "spike_levels": "2",
    "detach_reset": "false",
    "leaky": "true",
    "alpha": "0.5",
    "full_prop": "true",
}


def builds(kind, **extra) -> bool:
    try:
        build_model(config(kind, **extra))
    except ValueError:
        return False
    return True


def refusals(kind):
    """(argv, words in the error) for each option neuron ``kind`` does not support."""
    cls, cases = NEURONS[kind], []
    for key in cls.ignores:
        cases.append(([f"--{key}", EXAMPLE_VALUES[key]], [f"--{key}", f"neuron '{kind}'"]))
    for key, value in (("reset", "zero"), ("leaky", "true")):  # values its constructor may refuse
        if key not in cls.ignores and not builds(kind, **{key: value == "true" if key == "leaky" else value}):
            cases.append(([f"--{key}", value], [key, f"neuron '{kind}'"]))
    neuron = build_model(config(kind)).conv1.act
    if not supports("torch", neuron):
        cases.append((["--neuron_backend", "torch"], ["'torch'", f"'{kind}'"]))
        cases.append((["--compile"], ["compile", f"neuron '{kind}'"]))
    return cases


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_options_are_one_line_errors_naming_key_and_neuron(kind, capsys):
    cases = refusals(kind)
    for argv, words in cases:
        one_line_error(capsys, train.main, ["--epochs", "1", "--neuron", kind, *argv], *words)
    if not cases:  # nothing to refuse: the options it reads build
        build_model(config(kind, neuron_backend="torch", compile=True, leak_mem=0.5))
