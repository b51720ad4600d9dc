"""The worked example of docs/architectures.md (a small residual DeepLab in one file) is run from the page
itself, through every tool: training (SNN and ANN, memory-saving mode on two backends), spike counts and
energy (the ADD's levels), ANN-to-SNN conversion (the summed layers share one threshold) and NIR export, run
back in snnTorch (the ADD as two edges into one node)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import ARCHITECTURES, build_model
from models.conversion import Wiring, apply_thresholds, calibrate_thresholds, convert_ann
from tests import test_nir_export as nir_tests
from tests.doc_examples import run_example
from utils.energy import OpCounter

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


@pytest.fixture
def tiny_resnet():
    """The page's architecture, registered for the test's duration."""
    with run_example(DOC, ARCHITECTURES, "TinyResNet") as cls:
        yield cls


def net(**cfg):
    torch.manual_seed(0)
    base = dict(arch="dl-tiny-resnet", num_classes=3, img_size=[12, 12], timesteps=4, encoder="direct")
    return build_model({**base, **cfg})


@pytest.mark.parametrize("model_type", ["snn", "ann"])
def test_the_example_trains_as_an_snn_and_as_its_ann_twin(tiny_resnet, model_type):
    model = net(model_type=model_type, def_threshold=0.3)
    assert isinstance(model, tiny_resnet) and model.spiking == (model_type == "snn")
    x, y = torch.rand(4, 3, 12, 12) - 0.5, torch.randint(0, 3, (4, 12, 12))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("backend", ["generic", "torch"])
def test_memory_saving_equals_one_pass(tiny_resnet, backend):
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64) - 0.5
    target = torch.randint(0, 3, (2, 12, 12))
    runs = []
    for saving in (False, True):
        model = net(neuron_backend=backend, memory_saving=saving, memory_block=3, def_threshold=0.3).double()
        out = model(x)
        F.cross_entropy(out, target).backward()
        runs.append((out.detach(), [p.grad for p in model.parameters()], list(model.buffers())))
    (out_a, grads_a, buffers_a), (out_b, grads_b, buffers_b) = runs
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    assert grads_a[0].abs().sum() > 0
    for a, b in zip(grads_a + buffers_a, grads_b + buffers_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_spike_counts_and_energy_name_the_layers_and_count_the_add_as_levels(tiny_resnet):
    model = net(def_threshold=0.2).eval()
    model.record_spikes(True)
    with torch.no_grad(), OpCounter(model) as counter:
        model(torch.rand(2, 3, 12, 12) - 0.5)
    names = [s["name"] for s in model.spike_stats()]
    assert names == ["stem", "conv1", "conv2", "classifier"]
    rows = {row["name"]: row for row in counter.summary()["per_layer"]}
    assert list(rows) == ["stem", "conv1", "conv2", "classifier", "head"]
    assert rows["stem"]["input"] == "analog" and rows["stem"]["macs"] > 0  # direct encoding
    assert rows["conv1"]["input"] == "pooled spikes" and rows["conv1"]["via"] == ["pool"]
    # the ADD of the pooled stem and conv2's spikes: each term's events, counted where they come from
    assert rows["classifier"]["input"] == "pooled spikes (levels up to 2)"
    assert all(rows[name]["sops"] > 0 and rows[name]["macs"] == 0 for name in ("conv1", "conv2", "classifier"))


def test_conversion_ties_the_thresholds_of_the_layers_the_add_sums(tiny_resnet):
    ann = net(model_type="ann")
    x = torch.rand(8, 3, 12, 12) - 0.5
    with torch.no_grad():
        ann.train()(x)  # BN statistics of real batches
    ann.eval()
    snn = convert_ann(ann, 32, encoder="direct")
    wiring = Wiring.of(snn)
    stem, conv1, conv2, classifier = (snn.stem.act, snn.conv1.act, snn.conv2.act, snn.classifier.act)
    assert wiring.neurons == [stem, conv1, conv2, classifier]
    assert wiring.group[stem] == [stem, conv2] and wiring.group[conv1] == [conv1]
    raw = calibrate_thresholds(snn, [x], "channel", show_progress=False)
    assert torch.equal(raw[0], raw[2]) and not torch.equal(raw[0], raw[1])
    apply_thresholds(snn, raw, "channel", 1.0)
    # the classifier reads the sum, whose two terms carry one amplitude: its weights scaled once by it
    converted = convert_ann(ann, 32, encoder="direct")
    expected = converted.classifier.conv.weight * raw[2].view(1, -1, 1, 1)
    torch.testing.assert_close(snn.classifier.conv.weight, expected)
    with torch.no_grad():
        similarity = F.cosine_similarity(ann(x).flatten(), snn(x).flatten(), dim=0)
    assert similarity > 0.8, float(similarity)


def test_nir_export_runs_in_snntorch_with_our_spikes_and_logits(tiny_resnet, tmp_path):
    x = nir_tests.image()
    model = nir_tests.settle_bn(
        net(img_size=[16, 16], bntt=False, reset="zero", timesteps=nir_tests.STEPS, def_threshold=0.5), x
    )
    logits, spikes = nir_tests.ours(model, x)
    path = tmp_path / "tiny.nir"
    nir_tests.export_model(model, path)
    graph = nir_tests.nir.read(path)
    into_classifier = sorted(a for a, b in graph.edges if b == "classifier.conv")
    assert into_classifier == ["conv2.neuron", "pool.pool"]  # the ADD: NIR sums the two edges
    module = nir_tests.import_from_nir(nir_tests.without_integrator(graph, "head.conv"))
    peer_logits, peer_spikes, _ = nir_tests.run_peer(module, graph, x, nir_tests.snntorch.Leaky)
    nir_tests.assert_agree(peer_logits, peer_spikes, logits, spikes)


def test_torch_compile_traces_the_example_whole_and_equals_eager(tiny_resnet):
    """fullgraph: the clock, the ADD and the fused neurons' custom op trace without a graph break (aot_eager:
    the capture, without inductor's code generation, which tests/test_neuron_compile.py covers)."""
    model = net(def_threshold=0.3, neuron_backend="torch", timesteps=3).double()
    x, y = torch.rand(2, 3, 12, 12, dtype=torch.float64) - 0.5, torch.randint(0, 3, (2, 12, 12))

    def loss(x, y):
        return F.cross_entropy(model(x), y)

    params = list(model.parameters())
    eager = torch.autograd.grad(loss(x, y), params)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y), params)
    assert eager[0].abs().sum() > 0
    torch._dynamo.reset()  # the compiled graph and its fake tensors go with this test
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
