"""End to end through the scripts: train -> test.py JSON -> resume equality -> torchrun with 2 processes."""

import json

import pytest
import torch

import data
from tests.conftest import TINY_ARGS, read_jsonl, run_script
from utils.checkpoint import load_checkpoint


def test_train_writes_run_files_and_test_py_reproduces_val_miou(tiny_ann_run, tmp_path):
    run_dir = tiny_ann_run
    assert {"config.yaml", "metrics.jsonl", "last.pth", "best.pth"} <= {p.name for p in run_dir.iterdir()}
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {"loss", "lr", "val_miou", "time"} <= record.keys() and 0 <= record["val_miou"] <= 1
    last = load_checkpoint(run_dir / "last.pth")
    assert last["epoch"] == 2 and last["config"]["arch"] == "dl-vgg9"
    best = load_checkpoint(run_dir / "best.pth")
    assert best["best_miou"] == max(r["val_miou"] for r in records)

    results_path = tmp_path / "results.json"
    proc = run_script("test.py", "--model_path", run_dir / "best.pth", "--results", results_path)
    results = json.loads(results_path.read_text())
    # the ANN is deterministic: test.py must find exactly the validation mIoU of the best epoch
    assert results["miou"] == pytest.approx(best["best_miou"], abs=1e-9)
    assert list(results["per_class_iou"]) == list(data.dataset_info("synthetic")["class_names"])
    assert (results["dataset"], results["model_type"], results["arch"]) == ("synthetic", "ann", "dl-vgg9")
    assert {"pixel_acc", "mean_acc", "fwiou", "timesteps"} <= results.keys()
    assert 0 < results["num_pixels"] <= 8 * 16 * 16
    assert "mIoU" in proc.stdout and "background" in proc.stdout

    listing = run_script("test.py", "--list", "--model_dir", run_dir.parent).stdout
    assert "best.pth" in listing and "last.pth" in listing and "ann dl-vgg9 synthetic" in listing


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    snn = [*TINY_ARGS, "--model_type", "snn", "--encoder", "poisson", "--model_dir", tmp_path]
    run_script("train.py", *snn, "--epochs", "2", "--name", "full")
    run_script("train.py", *snn, "--epochs", "1", "--name", "split")
    run_script("train.py", "--resume", tmp_path / "split" / "last.pth", "--epochs", "2")
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in split] == [1, 2]
    for a, b in zip(full, split):
        # Poisson spikes, shuffling and the LR schedule all continue exactly where they stopped
        assert (a["loss"], a["lr"], a["val_miou"]) == (b["loss"], b["lr"], b["val_miou"])
    resumed, uninterrupted = (load_checkpoint(tmp_path / n / "last.pth") for n in ("split", "full"))
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_torchrun_two_processes(tmp_path):
    proc = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *TINY_ARGS,
        "--model_type",
        "ann",
        "--epochs",
        "1",
        "--model_dir",
        tmp_path,
        "--name",
        "ddp",
    )
    assert proc.stdout.count("done: best val mIoU") == 1  # only rank 0 reports
    run_dir = tmp_path / "ddp"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert len(records) == 1 and records[0]["epoch"] == 1  # one writer
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1
    # Sharded validation + all-reduced confusion matrix == one process evaluating the whole split.
    results_path = tmp_path / "r.json"
    run_script("test.py", "--model_path", run_dir / "best.pth", "--results", results_path)
    results = json.loads(results_path.read_text())
    assert results["num_pixels"] == records[0]["val_pixels"]
    assert results["miou"] == pytest.approx(records[0]["val_miou"], abs=1e-9)
