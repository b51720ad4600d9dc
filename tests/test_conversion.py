"""ANN-to-SNN conversion: BN folding, threshold statistics, layer-by-layer calibration, rate convergence,
the threshold cache, and test.py --conversion end to end."""

import copy
import functools
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.cli import run_main
from models import build_model, parts
from models.conversion import (
    apply_thresholds,
    cached_thresholds,
    calibrate_thresholds,
    check_thresholds,
    convert_ann,
    current_statistic,
    fold_batchnorm,
    store_thresholds,
)
from models.parts import ConvUnit, Rectifier
from tests.conftest import REPO, run_script
from utils.checkpoint import load_checkpoint, save_checkpoint


@functools.lru_cache(maxsize=None)
def _tiny_ann(arch, size, classes, in_channels, leaky):
    torch.manual_seed(0)
    ann = build_model(
        dict(
            model_type="ann",
            arch=arch,
            num_classes=classes,
            in_channels=in_channels,
            img_size=[size, size],
            leaky=leaky,
        )
    )
    # One training-mode pass with momentum 1 sets the BN statistics to that batch's: activations of order 1.
    saved, parts.BN_MOMENTUM = parts.BN_MOMENTUM, 1.0
    try:
        with torch.no_grad():
            ann.train()(torch.rand(8, in_channels, size, size))
    finally:
        parts.BN_MOMENTUM = saved
    return ann.eval()


def tiny_ann(arch="dl-vgg9", size=8, classes=3, in_channels=2, leaky=False):
    """An ANN (a fresh copy) whose BN statistics come from real activations."""
    return copy.deepcopy(_tiny_ann(arch, size, classes, in_channels, leaky))


@pytest.mark.parametrize("arch,leaky", [("dl-vgg9", False), ("fcn-vgg9", True)])
def test_bn_folding_leaves_ann_outputs_unchanged(arch, leaky):
    ann = tiny_ann(arch, leaky=leaky).double()
    folded_ann = build_model({**ann.config, "bn": False, "conv_bias": True}).double().eval()
    state = {k: v for k, v in ann.state_dict().items() if ".norm." not in k}
    for index, unit in enumerate(ann.body):
        if isinstance(unit, ConvUnit):
            state[f"body.{index}.conv.weight"], state[f"body.{index}.conv.bias"] = fold_batchnorm(unit)
    folded_ann.load_state_dict(state)
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        expected, got = ann(x), folded_ann(x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_fold_batchnorm_closed_form():
    unit = tiny_ann().double().body[0]
    mean, var = unit.norm.running_mean[0], unit.norm.running_var[0]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    expected = (F.conv2d(x, unit.conv.weight, padding=1) - mean.view(-1, 1, 1)) / torch.sqrt(var.view(-1, 1, 1) + 1e-4)
    weight, bias = fold_batchnorm(unit)
    assert torch.allclose(F.conv2d(x, weight, bias, padding=1), expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["layer", "channel", "neuron"])
@pytest.mark.parametrize("percentile", [None, 90.0])
def test_current_statistic_matches_numpy(kind, percentile):
    current = torch.randn(6, 3, 4, 5)  # [N*T, C, H, W]
    values = current.numpy()
    axes = {"layer": None, "channel": (0, 2, 3), "neuron": 0}[kind]
    if percentile is None:
        expected = values.max(axis=axes)
    else:
        expected = np.percentile(values, percentile, axis=axes, method="inverted_cdf")
    got = current_statistic(current, kind, percentile)
    assert got.shape == expected.shape and np.allclose(got.numpy(), expected)


@pytest.mark.parametrize("fold_amplitude", [True, False])
def test_calibration_is_layer_by_layer_on_the_partly_converted_snn(fold_amplitude):
    """Layer 2's raw threshold is the max of its input current while layer 1 spikes with its own threshold
    (spikes weighted by that threshold, or unit spikes as in the paper's code)."""
    ann = tiny_ann()
    snn = convert_ann(ann, timesteps=6, encoder="direct")
    weight1, bias1 = (t.detach().clone() for t in (snn.body[0].conv.weight, snn.body[0].conv.bias))
    weight2, bias2 = (t.detach().clone() for t in (snn.body[1].conv.weight, snn.body[1].conv.bias))
    x = torch.rand(2, 2, 8, 8)
    raw = calibrate_thresholds(snn, [x], "layer", show_progress=False, fold_amplitude=fold_amplitude)
    current1 = F.conv2d(x, weight1, bias1, padding=1)  # direct input: the same current at every timestep
    assert raw[0] == pytest.approx(float(current1.max()), rel=1e-6)
    amplitude = raw[0] if fold_amplitude else 1.0
    mem, max2 = torch.zeros_like(current1), -float("inf")
    for _ in range(6):  # IF neuron, reset by subtraction, written out by hand
        mem += current1
        spikes = (mem > raw[0]).float()
        mem -= spikes * raw[0]
        max2 = max(max2, float(F.conv2d(spikes * amplitude, weight2, bias2, padding=1).max()))
    assert raw[1] == pytest.approx(max2, rel=1e-5)
    assert len(raw) == len(snn.neuron_layers()) and all(r > 0 for r in raw)


def _rate_error(ann, x, timesteps):
    """Mean over layers of |rate x threshold - ANN ReLU output| / mean |ANN ReLU output|."""
    snn = convert_ann(ann, timesteps, encoder="direct")
    raw = calibrate_thresholds(snn, [x], "channel", show_progress=False)
    apply_thresholds(snn, raw, "channel", scaling_factor=1.0)
    ann_out, snn_out = [], []
    hooks = [
        m.register_forward_hook(lambda m, i, o: ann_out.append(o)) for m in ann.modules() if isinstance(m, Rectifier)
    ]
    hooks += [lif.register_forward_hook(lambda m, i, o: snn_out.append((m, o))) for lif in snn.neuron_layers()]
    with torch.no_grad():
        ann(x), snn(x)
    for hook in hooks:
        hook.remove()
    errors = []
    for activation, (lif, spikes) in zip(ann_out, snn_out):
        rate = spikes.view(timesteps, x.shape[0], *spikes.shape[1:]).mean(0)  # time-major
        errors.append(float((rate * lif.threshold - activation).abs().mean() / activation.abs().mean()))
    return float(np.mean(errors))


def test_firing_rates_approach_ann_activations_as_t_grows():
    ann = tiny_ann(size=8)
    x = torch.rand(1, 2, 8, 8)
    errors = [_rate_error(ann, x, steps) for steps in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.25 and errors[2] < errors[0] / 4, errors  # ~1/T: without amplitude folding ~0.6 flat


def test_threshold_cache_round_trip(tmp_path):
    snn = convert_ann(tiny_ann(), timesteps=3)
    raw = calibrate_thresholds(snn, [torch.rand(2, 2, 8, 8)], "channel", show_progress=False)
    settings = {"statistic": "max", "calib_batches": 1}
    path = tmp_path / "ann.pth"
    checkpoint = {"format": "snnseg-1", "config": dict(snn.config, model_type="ann"), "state_dict": {}}
    save_checkpoint(path, store_thresholds(checkpoint, "channel", 3, raw, settings))
    loaded = load_checkpoint(path)
    again = cached_thresholds(loaded, "channel", 3, settings)
    assert len(again) == len(raw) and all(torch.equal(a, b) for a, b in zip(again, raw))
    assert cached_thresholds(loaded, "channel", 4, settings) is None  # other T
    assert cached_thresholds(loaded, "layer", 3, settings) is None  # other type
    assert cached_thresholds(loaded, "channel", 3, {**settings, "calib_batches": 2}) is None  # other calibration
    check_thresholds(again, snn, "channel", "cache")
    with pytest.raises(ValueError, match="expected a list of 8"):
        check_thresholds(again[:-1], snn, "channel", "cache")
    with pytest.raises(ValueError, match=r"layer 0 has shape \(64, 1\)"):
        check_thresholds([raw[0].view(-1, 1)] + raw[1:], snn, "channel", "cache")


# --------------------------------------------------------------------------------------- test.py
def run_test_py(capsys, *args):
    """test.py in this process (saves a Python start-up per run); returns (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("test_py_script", REPO / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = run_main(script.main, [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_test_py_conversion_end_to_end(tiny_ann_run, tmp_path, capsys):
    ann_path = tmp_path / "ann.pth"
    ann_path.write_bytes((tiny_ann_run / "best.pth").read_bytes())
    results = tmp_path / "results.json"
    common = [
        "test.py",
        "--model_path",
        ann_path,
        "--conversion",
        "--timesteps",
        "1,2",
        "--threshold_type",
        "layer,channel",
        "--conversion_encoder",
        "direct",
        "--results",
        results,
    ]
    first = run_script(*common, "--save_snn", tmp_path / "snn.pth")  # as a user runs it
    # the table is headed as the converted SNN's, not as the ANN's the checkpoint holds
    header = next(line for line in first.stdout.splitlines() if line.startswith(f"{ann_path}: "))
    assert "the SNN converted from this ANN (dl-vgg9, layer-wise thresholds, T=1;" in header, header
    report = json.loads(results.read_text())
    conversion = report["conversion"]
    assert set(conversion["miou"]) == {"layer", "channel"} and set(conversion["miou"]["layer"]) == {"1", "2"}
    assert report["model_type"] == "snn" and report["timesteps"] == 1
    assert report["miou"] == conversion["miou"]["layer"]["1"]  # the main result is the first (type, T)
    assert conversion["ann_miou"] == pytest.approx(load_checkpoint(ann_path)["best_miou"], abs=1e-9)
    png = (tmp_path / "results_conversion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    cached = load_checkpoint(ann_path)["thresholds"]
    assert set(cached) == {"layer", "channel"} and set(cached["channel"]) == {"1", "2"}
    assert "using cached" not in first.stdout and first.stdout.count("cached the new") == 4

    # the saved SNN is an ordinary checkpoint: test.py gives the same mIoU (direct input: deterministic)
    code, _, _ = run_test_py(capsys, "--model_path", tmp_path / "snn.pth", "--results", tmp_path / "snn.json")
    assert code == 0
    assert json.loads((tmp_path / "snn.json").read_text())["miou"] == pytest.approx(report["miou"], abs=1e-12)

    # second run: thresholds come from the cache and the curve is the same; --reset_thresholds calibrates again
    code, out, _ = run_test_py(capsys, *common[1:7], "channel", *common[8:])
    assert code == 0 and out.count("using cached") == 2 and "cached the new" not in out
    assert json.loads(results.read_text())["conversion"]["miou"] == {"channel": conversion["miou"]["channel"]}
    code, out, _ = run_test_py(capsys, *common[1:3], "--conversion", "--timesteps", "2", "--reset_thresholds")
    assert code == 0 and "using cached" not in out and "cached the new layer thresholds for T=2" in out


def test_test_py_conversion_refuses_an_snn(tmp_path, capsys):
    snn = build_model(dict(model_type="snn", arch="dl-vgg9", num_classes=4, img_size=[16, 16], timesteps=2))
    path = tmp_path / "snn.pth"
    save_checkpoint(
        path,
        {
            "format": "snnseg-1",
            "state_dict": snn.state_dict(),
            "config": {**snn.config, "dataset": "synthetic", "batch_size": 4, "num_workers": 0},
        },
    )
    code, _, err = run_test_py(capsys, "--model_path", path, "--conversion", "--device", "cpu")
    assert code == 2 and "needs an ANN checkpoint" in err and str(path) in err
