"""Every shipped neuron through the scripts: train.py (one epoch of the tiny run), resume, evaluation with
another backend, and ANN-to-SNN conversion with IF neurons and a hard reset."""

import json

import pytest
import torch

from tests.conftest import TINY_ARGS, one_line_error, read_jsonl, run_script
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint


@pytest.mark.parametrize("neuron", ["lif", "if", "plif"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_train_py_trains_every_neuron(tmp_path, neuron, reset):
    args = [*TINY_ARGS, "--model_dir", tmp_path, "--name", "run", "--neuron", neuron, "--reset", reset]
    run_script("train.py", *args, "--epochs", "1", "--encoder", "direct")
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pth")
    assert (checkpoint["config"]["neuron"], checkpoint["config"]["reset"]) == (neuron, reset)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 1 and records[0]["loss"] == records[0]["loss"]  # one finite epoch
    leaks = [k for k in checkpoint["state_dict"] if k.endswith("act.leak_logit")]
    assert bool(leaks) == (neuron == "plif")
    model = build_model_from_checkpoint(checkpoint, "last.pth")
    layers = model.neuron_layers()
    assert layers[0].kind == neuron and layers[0].hard_reset == (reset == "zero")
    if neuron == "plif":  # the leak trained: it moved away from leak_mem
        assert any(abs(torch.sigmoid(n.leak_logit).item() - 0.99) > 1e-6 for n in layers)


def test_plif_resumes_and_refuses_another_neuron(tmp_path, capsys):
    import train

    args = [*TINY_ARGS, "--model_dir", tmp_path, "--name", "run", "--neuron", "plif", "--encoder", "direct"]
    run_script("train.py", *args, "--epochs", "1")
    last = tmp_path / "run" / "last.pth"
    one_line_error(capsys, train.main, ["--resume", str(last), "--epochs", "2", "--neuron", "if"], "neuron")
    one_line_error(capsys, train.main, ["--resume", str(last), "--epochs", "2", "--reset", "zero"], "reset")
    run_script("train.py", "--resume", last, "--epochs", "2")
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("trained, evaluated", [("generic", "torch"), ("torch", "generic")])
def test_a_model_trained_on_one_backend_evaluates_on_the_other(tmp_path, trained, evaluated):
    args = [*TINY_ARGS, "--model_dir", tmp_path, "--name", "run", "--neuron", "if", "--reset", "zero"]
    run_script("train.py", *args, "--epochs", "1", "--encoder", "direct", "--neuron_backend", trained)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pth")
    models = [
        build_model_from_checkpoint(checkpoint, "last.pth", overrides={"neuron_backend": name})
        for name in (trained, evaluated)
    ]
    assert [m.neuron_backend for m in models] == [trained, evaluated]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        a, b = (m(x) for m in models)
    torch.testing.assert_close(a, b)
    results = tmp_path / "results.json"
    run_script(
        "test.py", "--model_path", tmp_path / "run" / "last.pth", "--neuron_backend", evaluated, "--results", results
    )
    assert 0 <= json.loads(results.read_text())["miou"] <= 1


def test_conversion_builds_if_neurons_with_a_hard_reset(tiny_ann_run, tmp_path):
    saved = tmp_path / "snn.pth"
    results = tmp_path / "results.json"
    run_script(
        "test.py",
        "--model_path",
        tiny_ann_run / "best.pth",
        "--conversion",
        "--timesteps",
        "8",
        "--neuron",
        "if",
        "--reset",
        "zero",
        "--save_snn",
        saved,
        "--results",
        results,
    )
    snn = load_checkpoint(saved)
    assert (snn["config"]["neuron"], snn["config"]["reset"]) == ("if", "zero")
    model = build_model_from_checkpoint(snn, saved)
    assert all(n.kind == "if" and n.hard_reset and n.leak == 1.0 for n in model.neuron_layers())
    assert 0 <= json.loads(results.read_text())["miou"] <= 1
