"""NIR export (utils/nir_export.py, converter.py export-nir), verified in peer simulators.

The exported file is read back with nir.read and run by other libraries' NIR importers: snnTorch's
``import_from_nir`` (LIF neurons, AvgPool2d, dilated Conv2d) and Norse's neuron importer (IF neurons, on
nirtorch's own Conv2d / AvgPool2d mappings, since Norse's ``from_nir`` maps no AvgPool2d). Neither reader
maps NIR's integrator ``I``: the test integrates the output convolution itself with the ``I`` node's
parameters from the file (v += dt r I), then applies the host-side remainder written in the file's
metadata (division by T, bilinear upsampling), and compares spikes per layer and logits with ours.
"""

import json

import nir
import nirtorch
import numpy as np
import pytest
import snntorch
import torch
import torch.nn.functional as F
from norse.torch.utils.import_nir import _import_norse_module
from snntorch.import_nir import import_from_nir

import converter
from common.cli import run_main
from models import build_model
from models.conversion import apply_thresholds, calibrate_thresholds, convert_ann
from utils.checkpoint import FORMAT, save_checkpoint
from utils.nir_export import DEFAULT_DT, NotExportable, export_model, read_host_side

SIZE, STEPS, CLASSES = 16, 4, 5


def settle_bn(model, x, gain=2.0):
    """Eval-mode BN with real statistics (a few training-mode passes) and a scale that keeps every layer
    spiking; so that the export's BN folding is exercised."""
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(x)
        for unit in model.conv_units():
            if unit.norm is not None and unit.norm.weight is not None:
                unit.norm.weight.mul_(gain)
    return model.eval()


def deployable(x, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        model_type="snn",
        arch="dl-vgg9",
        num_classes=CLASSES,
        in_channels=3,
        img_size=SIZE,
        timesteps=STEPS,
        encoder="direct",
        leak_mem=0.99,
        bntt=False,
        reset="zero",
        neuron_backend="torch",
    )
    return settle_bn(build_model({**cfg, **overrides}), x)


def image(seed=1, n=2):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 0.5


def ours(model, x):
    """Our logits and spikes per neuron layer."""
    model.reset_spike_stats()
    model.record_spikes(True)
    with torch.no_grad():
        logits = model(x)
    model.record_spikes(False)
    return logits, [s["spikes"] for s in model.spike_stats()]


def without_integrator(graph, head="output.conv"):
    """The graph up to the output convolution (the readers have no mapping for NIR's integrator I)."""
    nodes = {k: v for k, v in graph.nodes.items() if k not in ("readout", "output")}
    nodes["output"] = nir.Output(output_type=graph.nodes[head].output_type)
    edges = [(a, "output" if b == "readout" else b) for a, b in graph.edges if a != "readout"]
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)


def run_peer(module, graph, x, neuron_types):
    """Run an imported graph for the steps the metadata names; returns (logits, spikes per neuron node)."""
    host = read_host_side(graph)
    counts = {}

    def counter(name):
        def hook(_, __, out):
            spikes = out[0] if isinstance(out, tuple) else out
            counts[name] = counts.get(name, 0.0) + float(spikes.detach().sum())

        return hook

    names = [name for name, m in module.named_modules() if isinstance(m, neuron_types)]
    for name in names:
        module.get_submodule(name).register_forward_hook(counter(name))
    readout = graph.nodes[host["readout"]["node"]]
    r, dt = torch.from_numpy(readout.r).to(x.dtype), host["discretisation"]["dt"]
    v, state = torch.zeros(x.shape[0], *readout.r.shape, dtype=x.dtype), None
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(host["steps"]):
            current = x if t < host["timesteps"] else zeros  # full propagation's zero-input steps
            out, state = module(current, state)  # nirtorch's modules return (output, state)
            v = v + dt * r * out  # NIR's I, forward Euler: dv/dt = r I
    up = host["upsample"]
    logits = F.interpolate(v / host["readout"]["divide_by"], size=x.shape[-2:], mode=up["mode"], align_corners=True)
    return logits, [counts.get(name, 0.0) for name in names], names


def assert_agree(peer_logits, peer_spikes, our_logits, our_spikes):
    """Spikes per layer equal up to a few that float rounding flips (a current within an ulp of the
    threshold: the readers compute v - theta > 0 where we compute u / theta > 1, and the folded BN rounds
    differently), logits equal to float32 rounding where no spike flipped, close otherwise."""
    assert len(peer_spikes) == len(our_spikes)
    flipped = 0
    for layer, (theirs, mine) in enumerate(zip(peer_spikes, our_spikes)):
        assert mine > 0, f"layer {layer} never fired: the comparison would be vacuous"
        assert abs(theirs - mine) <= 2 + 1e-3 * mine, f"layer {layer}: {theirs} spikes in the peer, {mine} in ours"
        flipped += abs(theirs - mine)
    scale = our_logits.abs().max()
    assert scale > 0
    error = (peer_logits - our_logits).abs()
    relative = float(error.norm() / our_logits.norm())
    agree = float((peer_logits.argmax(1) == our_logits.argmax(1)).float().mean())
    print(
        f"spikes flipped {flipped:g}, logits max error {float(error.max() / scale):.2e} of the largest logit, "
        f"relative L2 error {relative:.2e}, argmax agreement {agree:.4f}"
    )
    if flipped == 0:
        assert error.max() <= 1e-4 * scale
    else:
        assert relative <= 0.05
    assert agree >= 0.98


# ------------------------------------------------------------------------------- shared batch norm
def test_shared_batch_norm_takes_one_statistic_over_all_timesteps():
    """bntt: false: training-mode BN normalises with the mean and (biased) variance over (T, N, H, W)
    together, updates the running statistics with momentum 0.1 (unbiased variance), and in eval mode is
    the same affine map at every step."""
    from models.parts import TimeBatchNorm

    steps, n, c = 3, 2, 4
    norm = TimeBatchNorm(c, steps, affine=True, shared=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([[0.5, 1.0, 2.0, 3.0]]))
    x = torch.randn(steps * n, c, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = norm.train()(x, steps)
    per_channel = x.transpose(0, 1).reshape(c, -1).double()
    mean, var = per_channel.mean(1), per_channel.var(1, unbiased=False)
    expected = (
        (x.double() - mean.view(1, c, 1, 1)) / (var.view(1, c, 1, 1) + 1e-4).sqrt() * norm.weight.view(1, c, 1, 1)
    )
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    count = per_channel.shape[1]
    torch.testing.assert_close(norm.running_mean[0].double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        norm.running_var[0].double(), 0.9 + 0.1 * var * count / (count - 1), rtol=1e-5, atol=1e-6
    )
    frame = torch.randn(n, c, 5, 5)
    eval_out = norm.eval()(frame.repeat(steps, 1, 1, 1), steps)
    for t in range(steps):  # every step the same map
        torch.testing.assert_close(eval_out[t * n : (t + 1) * n], eval_out[:n])
    # the model: one [1, C] row per BN, spiking conv units in front of the neurons, gradients reach the scale
    model = build_model(dict(model_type="snn", num_classes=3, img_size=16, timesteps=3, bntt=False, encoder="direct"))
    assert all(unit.norm.weight.shape == (1, unit.conv.out_channels) for unit in model.conv_units())
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(unit.norm.weight.grad.abs().sum() > 0 for unit in model.conv_units()[:2])


# ---------------------------------------------------------------------------------------- snnTorch
@pytest.mark.parametrize("neuron, full_prop", [("lif", False), ("lif", True), ("plif", False)])
def test_snntorch_runs_the_exported_deployable_model_with_our_spikes_and_logits(tmp_path, neuron, full_prop):
    x = image()
    model = deployable(x, full_prop=full_prop, neuron=neuron, neuron_backend="auto")
    if neuron == "plif":  # learned leaks, one per layer, other than leak_mem
        with torch.no_grad():
            for k, lif in enumerate(model.neuron_layers()):
                lif.leak_logit.add_(-0.5 * k)
    logits, spikes = ours(model, x)
    path = tmp_path / "model.nir"
    export_model(model, path)
    graph = nir.read(path)
    host = read_host_side(graph)
    assert host["steps"] == STEPS + (9 if full_prop else 0) and host["readout"]["divide_by"] == STEPS
    # snnTorch's importer assumes dt = 1e-4: the default export step
    assert host["discretisation"]["dt"] == DEFAULT_DT
    module = import_from_nir(without_integrator(graph))
    peer_logits, peer_spikes, names = run_peer(module, graph, x, snntorch.Leaky)
    assert names[0].startswith("body_0") and names[-1].startswith("body_9")
    assert_agree(peer_logits, peer_spikes, logits, spikes)


def test_export_graph_has_the_documented_nodes_and_parameters(tmp_path):
    x = image()
    model = deployable(x)
    export_model(model, tmp_path / "m.nir", dt=1e-3)
    graph = nir.read(tmp_path / "m.nir")
    lif, conv = graph.nodes["body.0.neuron"], graph.nodes["body.9.conv"]
    assert isinstance(lif, nir.LIF) and isinstance(graph.nodes["body.2.pool"], nir.AvgPool2d)
    # tau = dt / (1 - leak), r = tau / dt, threshold as trained, reset to 0
    np.testing.assert_allclose(lif.tau, 1e-3 / (1 - 0.99), rtol=1e-6)
    np.testing.assert_allclose(lif.r, 1 / (1 - 0.99), rtol=1e-6)
    np.testing.assert_array_equal(lif.v_threshold, 1.0)
    np.testing.assert_array_equal(lif.v_reset, 0.0)
    np.testing.assert_array_equal(lif.v_leak, 0.0)
    assert tuple(conv.dilation) == (12, 12) and tuple(conv.padding) == (12, 12)
    assert tuple(graph.nodes["body.7.conv"].dilation) == (2, 2)
    assert isinstance(graph.nodes["readout"], nir.I)
    # the folded conv + BN: one affine map, computed here from the BN's definition
    unit = model.conv_units()[0]
    z = torch.randn(1, 3, SIZE, SIZE)
    norm = unit.norm
    expected = (
        (unit.conv(z) - norm.running_mean[0].view(1, -1, 1, 1))
        / torch.sqrt(norm.running_var[0].view(1, -1, 1, 1) + 1e-4)
        * norm.weight[0].view(1, -1, 1, 1)
    )
    node = graph.nodes["body.0.conv"]
    got = F.conv2d(z, torch.from_numpy(node.weight), torch.from_numpy(node.bias), padding=tuple(node.padding))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_discretisation_of_the_exported_lif_node_is_our_neuron(tmp_path):
    """NIR's LIF equation, stepped by forward Euler (written out here) with the tau, r, v_threshold, v_reset
    and dt read from the exported file, gives our neurons' spikes."""
    model = build_model(dict(leak_mem=0.9, def_threshold=0.6, reset="zero", encoder="direct", bntt=False))
    export_model(model.eval(), tmp_path / "m.nir", input_size=(8, 8))
    graph = nir.read(tmp_path / "m.nir")
    node, dt = graph.nodes["body.0.neuron"], read_host_side(graph)["discretisation"]["dt"]
    tau, r = float(node.tau[0, 0, 0]), float(node.r[0, 0, 0])
    theta, reset = float(node.v_threshold[0, 0, 0]), float(node.v_reset[0, 0, 0])
    currents = torch.rand(30, 200, generator=torch.Generator().manual_seed(0)) * 0.4
    v, expected = torch.zeros(200, dtype=torch.float64), []
    for current in currents.double():
        v = v + dt / tau * (-v + r * current)  # tau dv/dt = (v_leak - v) + r I, v_leak = 0
        z = v > theta
        v = torch.where(z, torch.full_like(v, reset), v)
        expected.append(z.float())
    lif = model.neuron_layers()[0]
    with torch.no_grad():
        spikes = lif(currents.view(30, 200, 1, 1), 30).view(30, 200)
    assert spikes.sum() > 100
    assert torch.equal(spikes, torch.stack(expected))


# ------------------------------------------------------------------------------------------- Norse
def converted_snn(x, threshold_type="layer"):
    torch.manual_seed(0)
    ann = build_model(
        dict(model_type="ann", arch="dl-vgg9", num_classes=CLASSES, in_channels=3, img_size=SIZE, bn=True)
    )
    ann = settle_bn(ann, x, gain=1.0)
    snn = convert_ann(ann, STEPS, encoder="direct", neuron="if", reset="zero")
    raw = calibrate_thresholds(snn, [x], threshold_type, show_progress=False)
    apply_thresholds(snn, raw, threshold_type, scaling_factor=0.7)
    return snn.eval()


def norse_module(graph, dt):
    """Norse's neuron importer on nirtorch's own mappings of the other nodes."""

    def neuron(node):
        return _import_norse_module(node, ignore_warnings=True, dt=dt)

    return nirtorch.nir_to_torch(without_integrator(graph), {nir.IF: neuron, nir.LIF: neuron})


@pytest.mark.parametrize("threshold_type", ["layer", "channel"])
def test_norse_runs_the_exported_converted_model_with_our_spikes_and_logits(tmp_path, capsys, threshold_type):
    """Both sides in float64: without leak, a converted network keeps many membranes near the threshold,
    and in float32 one spike flipped by the convolutions' different summation order cascades (seen: one
    flip in body.6 became 238 in body.9). The file's float32 weights are exact in float64."""
    from norse.torch.module.iaf import IAFCell

    x = image()
    model = converted_snn(x, threshold_type)
    save(model, tmp_path / "converted.pth")  # as test.py --save_snn writes it
    code, _, err = cli(capsys, "export-nir", tmp_path / "converted.pth", "-o", tmp_path / "converted.nir")
    assert code == 0, err
    x, model = x.double(), model.double()
    logits, spikes = ours(model, x)
    graph = nir.read(tmp_path / "converted.nir")
    assert isinstance(graph.nodes["body.0.neuron"], nir.IF)
    assert graph.nodes["body.0.conv"].bias.any()  # the ANN's BN, folded at conversion
    module = norse_module(graph, read_host_side(graph)["discretisation"]["dt"]).double()
    peer_logits, peer_spikes, _ = run_peer(module, graph, x, IAFCell)
    assert_agree(peer_logits, peer_spikes, logits, spikes)


def test_norse_runs_lif_layers_with_unit_r(tmp_path):
    """Norse ignores r: with --unit-r (r = 1, tau/dt in the weights) its LIF reading is ours too."""
    from norse.torch.module.lif_box import LIFBoxCell

    x = image()
    model = deployable(x)
    logits, spikes = ours(model, x)
    export_model(model, tmp_path / "m.nir", unit_r=True)
    graph = nir.read(tmp_path / "m.nir")
    np.testing.assert_array_equal(graph.nodes["body.0.neuron"].r, 1.0)
    module = norse_module(graph, DEFAULT_DT)
    peer_logits, peer_spikes, _ = run_peer(module, graph, x, LIFBoxCell)
    assert_agree(peer_logits, peer_spikes, logits, spikes)


# --------------------------------------------------------------------------- refusals and the CLI
def save(model, path):
    save_checkpoint(path, {"format": FORMAT, "config": dict(model.config), "state_dict": model.state_dict()})


def cli(capsys, *args):
    code = run_main(converter.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_bntt_and_soft_reset_in_one_line_and_lossy_exports(tmp_path, capsys):
    x = image()
    model = deployable(x, bntt=True, reset="subtract")
    save(model, tmp_path / "bntt.pth")
    out = tmp_path / "bntt.nir"
    code, _, err = cli(capsys, "export-nir", tmp_path / "bntt.pth", "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "body.0" in err and "bntt: false" in err and "--lossy" in err
    assert not out.exists()
    code, printed, _ = cli(capsys, "export-nir", tmp_path / "bntt.pth", "-o", out, "--lossy")
    assert code == 0 and out.exists()
    assert "lossy" in printed and "reset to zero" in printed and "averaged over the timesteps" in printed
    assert read_host_side(nir.read(out))["lossy_changes"]


def test_cli_writes_metadata_and_never_overwrites_without_the_flag(tmp_path, capsys):
    x = image()
    model = deployable(x)
    save(model, tmp_path / "m.pth")
    out = tmp_path / "m.nir"
    out.write_text("keep me")
    code, _, err = cli(capsys, "export-nir", tmp_path / "m.pth", "-o", out)
    assert code == 2 and "--overwrite" in err and out.read_text() == "keep me"
    # --overwrite replaces only a NIR file that export-nir wrote, never another file
    code, _, err = cli(capsys, "export-nir", tmp_path / "m.pth", "-o", out, "--overwrite")
    assert code == 2 and "is not a NIR file written by export-nir" in err and out.read_text() == "keep me"
    out.unlink()
    assert cli(capsys, "export-nir", tmp_path / "m.pth", "-o", out)[0] == 0
    code, printed, _ = cli(capsys, "export-nir", tmp_path / "m.pth", "-o", out, "--overwrite")
    assert code == 0 and "wrote" in printed
    host = read_host_side(nir.read(out))
    assert host["input"] == {**host["input"], "encoding": "direct", "shape": [3, SIZE, SIZE]}
    assert host["upsample"]["mode"] == "bilinear" and host["readout"]["divide_by"] == STEPS
    json.dumps(host)  # plain JSON
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(arch="fcn-vgg9"), ["body.2", "FCN decoder", "not exportable even with --lossy"]),
        (dict(encoder="poisson"), ["input", "encoder: direct"]),
    ],
)
def test_refusals_name_the_layer_and_the_fix(tmp_path, overrides, words):
    model = build_model(
        dict(model_type="snn", num_classes=CLASSES, img_size=SIZE, bntt=False, reset="zero", **overrides)
    )
    with pytest.raises(NotExportable) as err:
        export_model(model, tmp_path / "x.nir")
    assert all(word in str(err.value) for word in words) and "\n" not in str(err.value)


def test_missing_nir_package_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nir", None)
    code, _, err = cli(capsys, "export-nir", tmp_path / "absent.pth", "-o", tmp_path / "x.nir")
    assert code == 2 and "pip install nir" in err and len(err.strip().splitlines()) == 1
