"""Run safety through the scripts: append-only run folders, Ctrl-C and failed writes at epoch boundaries,
nonsense values refused before any data is read, the quickstart refined by flags, test.py's early checks."""

import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import converter
import train
from common.cli import run_main
from common.files import HOST
from models.neurons import NEURONS
from tests.conftest import REPO, TINY_ARGS, load_test_script, one_line_error, read_jsonl, run_script, start_script
from tests.test_pipeline_errors import tiny_checkpoint
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.runs import read_metrics

ANN = [*TINY_ARGS, "--model_type", "ann"]
CPUS = len(os.sched_getaffinity(0))


def digest(folder) -> dict:
    """Every file under `folder` by content hash: equal digests mean byte-identical trees."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_files(folder) -> dict:
    """digest() of the files that make a run (TensorBoard's event files, if installed, left out)."""
    return {k: v for k, v in digest(folder).items() if not k.startswith("tensorboard/")}


def error_lines(err) -> list:
    return [line for line in err.splitlines() if line.startswith("error:")]


def temp_files(folder) -> list:
    return [p.name for p in folder.rglob("*.tmp")]


# ----------------------------------------------------------------------------- append-only run folders
def dead_pid() -> int:
    return int(run_script("-c", "import os; print(os.getpid())").stdout)  # a process that has ended


def test_runs_are_append_only(tmp_path, capsys):
    run = tmp_path / "r"
    args = [*ANN, "--model_dir", str(tmp_path), "--name", "r"]
    run.mkdir()
    (run / ".running").write_text(f"{HOST} {dead_pid()}\n")  # left by a killed run: no longer in use
    assert run_main(train.main, [*args, "--epochs", "1"]) == 0
    assert not (run / ".running").exists()
    shutil.copy(run / "last.pth", run / "epoch1.pth")
    shutil.copy(run / "last.pth", tmp_path / "epoch1-copy.pth")
    first = digest(run)

    one_line_error(
        capsys, train.main, [*args, "--epochs", "1"], f"{run} already holds a run", "--resume", "--overwrite", "--name"
    )
    assert digest(run) == first  # the refused run wrote nothing, not even config.yaml

    # another neuron backend is an execution choice, not another model: resuming with it is fine
    assert run_main(train.main, ["--resume", str(run / "last.pth"), "--epochs", "2", "--neuron_backend", "torch"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    two_epochs = digest(run)
    one_line_error(
        capsys,
        train.main,
        ["--resume", str(run / "epoch1.pth"), "--epochs", "3"],
        "already holds epochs up to 2",
        "would rewind it",
        "--name",
    )
    one_line_error(
        capsys,
        train.main,
        ["--resume", str(tmp_path / "epoch1-copy.pth"), "--epochs", "3"],
        f"{run} holds another run",
        "--name",
    )
    assert digest(run) == two_epochs

    # an earlier checkpoint continues in a new folder, exactly as the original went on from it
    assert run_main(train.main, ["--resume", str(tmp_path / "epoch1-copy.pth"), "--epochs", "2", "--name", "b"]) == 0
    branch = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [(r["epoch"], r["loss"], r["val_miou"]) for r in branch] == [(2, records[1]["loss"], records[1]["val_miou"])]

    capsys.readouterr()
    assert run_main(train.main, [*args, "--epochs", "1", "--overwrite"]) == 0
    assert "moved the previous run to" in capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and digest(aside[0]) == two_epochs  # set aside whole: no metrics line is lost
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    one_line_error(
        capsys,
        train.main,
        ["--resume", str(run / "last.pth"), "--epochs", "2", "--overwrite"],
        "cannot be combined with --resume",
    )
    shell = tmp_path / "shell"  # a run stopped in its first epoch
    shell.mkdir()
    (shell / "config.yaml").write_text("epochs: 1\n")
    one_line_error(
        capsys,
        train.main,
        [*ANN, "--model_dir", str(tmp_path), "--name", "shell"],
        "holds a run that was started but completed no epoch",
        "--overwrite",
    )


def test_changing_the_model_on_resume_names_the_settings(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "s.pth", model_type="snn", timesteps=2)
    data = load_checkpoint(ckpt)
    save_checkpoint(ckpt, {**data, "optimizer": {}, "scheduler": {}, "epoch": 1, "best_miou": 0.0, "rng": {}})
    one_line_error(
        capsys,
        train.main,
        ["--resume", str(ckpt), "--epochs", "2", "--timesteps", "3", "--leak_mem", "0.5", "--neuron_backend", "torch"],
        "keeps the checkpoint's model; these settings differ: timesteps 2 -> 3; leak_mem 0.99 -> 0.5. Drop those flags",
    )


# ----------------------------------------------------------------------------- interrupts and failed writes
def wait_for(condition, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting (process exit code {proc.poll()})")


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    snn = [*TINY_ARGS, "--model_type", "snn", "--encoder", "poisson", "--epochs", "3", "--model_dir", tmp_path]
    run_script("train.py", *snn, "--name", "full")
    cut = tmp_path / "cut"
    proc = start_script("train.py", *snn, "--name", "cut")
    wait_for(lambda: (cut / ".running").is_file(), proc)
    for extra in ([], ["--overwrite"]):  # a folder in use is refused, whatever the flags
        one_line_error(capsys, train.main, [*map(str, snn), "--name", "cut", *extra], f"{cut} is in use by a running")
    wait_for(lambda: (cut / "metrics.jsonl").is_file() and (cut / "metrics.jsonl").read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C does, during epoch 2 (or while its files are written)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    saved = read_jsonl(cut / "metrics.jsonl")
    last = load_checkpoint(cut / "last.pth")
    assert 1 <= last["epoch"] == len(saved) < 3 and "interrupted" not in last  # an epoch boundary, whole
    assert f"last good checkpoint is {cut / 'last.pth'} (epoch {last['epoch']})" in err
    assert f"--resume {cut / 'last.pth'}" in err and "Traceback" not in err
    assert not temp_files(tmp_path) and not (cut / ".running").exists()

    run_script("train.py", "--resume", cut / "last.pth", "--epochs", "3")
    full, resumed = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("full", "cut"))
    keys = ("epoch", "loss", "lr", "val_miou")
    assert [tuple(r[k] for k in keys) for r in resumed] == [tuple(r[k] for k in keys) for r in full]
    ends = [load_checkpoint(tmp_path / n / "last.pth")["state_dict"] for n in ("full", "cut")]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def limit_file_size(size):
    """For a child process: files cannot grow beyond `size` bytes (writes fail with EFBIG, as on a full disk)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_failed_checkpoint_write_keeps_the_previous_one_and_the_metrics_line(tmp_path, capsys):
    run = tmp_path / "d"
    assert run_main(train.main, [*ANN, "--epochs", "1", "--model_dir", str(tmp_path), "--name", "d"]) == 0
    kept = {k: v for k, v in digest(run).items() if k.endswith(".pth")}
    proc = run_script(
        "train.py", "--resume", run / "last.pth", "--epochs", "2", check=False, preexec_fn=limit_file_size(1 << 20)
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {run}/" in lines[0] and "File too large; the previous file is unchanged" in lines[0]
    assert "Epoch 2's metrics are in" in lines[0] and f"--resume {run / 'last.pth'}" in lines[0]
    assert {k: v for k, v in digest(run).items() if k.endswith(".pth")} == kept and not temp_files(run)
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and "File too large" in records[1]["checkpoint_error"]

    # with room again, the resume repeats epoch 2 exactly and writes it
    assert run_main(train.main, ["--resume", str(run / "last.pth"), "--epochs", "2"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 2] and "checkpoint_error" not in records[2]
    assert records[2]["loss"] == records[1]["loss"] and load_checkpoint(run / "last.pth")["epoch"] == 2

    # killed after writing last.pth, halfway through epoch 2's line: the line is restored from last.pth
    text = (run / "metrics.jsonl").read_text()
    cut = text[: text.rindex("{") + 20]
    (run / "metrics.jsonl").write_text(cut)
    assert run_main(train.main, ["--resume", str(run / "last.pth"), "--epochs", "3"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[:3] == cut.splitlines()  # nothing that was written is rewritten
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 2, 3]
    assert read_metrics(run / "metrics.jsonl")[2] == records[2]


# ----------------------------------------------------------------------------- values checked before any work
NONSENSE = [
    (["--leak_mem", "nan"], "'leak_mem' must be a finite number in (0, 1], got nan"),
    (["--leak_mem", "5"], "'leak_mem' must be a finite number in (0, 1], got 5.0"),
    (["--leak_mem", "-0.5"], "'leak_mem' must be a finite number in (0, 1], got -0.5"),
    (["--img_size", "0"], "img_size must be one positive int (square), two (H W), or -1 for the native size"),
    (["--img_size", "-4"], "native size, got -4"),
    (["--img_size", "8", "8", "8"], "native size, got 8 8 8"),
    (["--num_val", "0"], "'num_val' must be a positive integer, got 0"),
    (["--num_train", "0"], "'num_train' must be a positive integer, got 0"),
    (["--batch_size", "0"], "'batch_size' must be a positive integer"),
    (["--epochs", "0"], "'epochs' must be a positive integer"),
    (["--timesteps", "0"], "'timesteps' must be a positive integer"),
    (["--test_display", "0"], "'test_display' must be a positive integer"),
    (["--lr", "inf"], "'lr' must be a finite number > 0, got inf"),
    (["--lr", "0"], "'lr' must be a finite number > 0, got 0.0"),
    (["--def_threshold", "-1"], "'def_threshold' must be a finite number > 0"),
    (["--alpha", "nan"], "'alpha' must be a finite number > 0, got nan"),
    (["--momentum", "1"], "'momentum' must be a finite number in [0, 1), got 1.0"),
    (["--weight_decay=-1e-4"], "'weight_decay' must be a finite number >= 0"),
    (["--seed", "-1"], "'seed' must be an integer in [0, 4294967295] (NumPy's seeds), got -1"),
    (["--seed", str(2**64)], f"'seed' must be an integer in [0, 4294967295] (NumPy's seeds), got {2**64}"),
    (["--num_workers", "-2"], "'num_workers' must be an integer in [0, "),
    (["--num_workers", "1000"], f"(at most 4 per CPU; this machine has {CPUS}), got 1000"),
    (["--memory_block", "0"], "'memory_block' must be a positive integer"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'; choices: sgd, adam"),
    (["--neuron_backend", "cuda"], "unknown neuron_backend 'cuda'; choices: auto, generic, torch, triton"),
    (["--neuron", "alif"], "unknown neuron 'alif'; choices: " + ", ".join(sorted(NEURONS))),
    (["--reset", "hard"], "unknown reset 'hard'; choices: subtract, zero"),
    (["--neuron", "plif", "--leak_mem", "1"], "neuron 'plif' learns leak = sigmoid(w) and needs leak_mem in (0, 1)"),
    (["--neuron", "plif", "--neuron_backend", "torch"], "neuron_backend 'torch' does not support neuron 'plif'"),
    (["--surrogate_params", "{gamma: }"], "surrogate_params 'gamma' must be a finite number, got None"),
    (["--surrogate_params", "{gama: 1}"], "unknown parameter(s) ['gama']"),
    (["--thl"], "thl (target history learning) needs an event dataset (ddd17, synthetic-events, dsec-semantic"),
    (["--num_train", "100"], "num_train applies to synthetic and synthetic-events only; dataset is 'voc2012'"),
    (["--datalist", "x.txt"], "datalist applies to ddd17 only"),
    (["--dataset", "ddd17", "--channels", "0", "7"], "channels: event channels must be distinct indices in 0..5"),
    (["--dataset", "ddd17", "--thl", "--model_type", "ann"], "thl feeds one frame per timestep and needs model_type"),
    (["--name", "../elsewhere"], "name must be one folder name inside model_dir"),
    (["--name", "."], "name must be one folder name inside model_dir (no '/', not '.' or '..', at most 255 bytes)"),
    (["--name", "a/b"], "one folder name inside model_dir (no '/', not '.' or '..', at most 255 bytes), got 'a/b'"),
    (["--name", "x" * 256], "at most 255 bytes), got 'xxxxx"),
    (["--config", str(REPO / "configs")], f"--config {REPO / 'configs'} is a folder, not a file"),
]


def test_nonsense_values_are_refused_before_any_data_is_read(tmp_path, capsys):
    # The data folder does not exist: a run that looked at its data first would fail naming it instead.
    base = ["--dataset", "voc2012", "--data_root", str(tmp_path / "no-data"), "--model_dir", str(tmp_path / "runs")]
    for flags, expected in NONSENSE:
        line = one_line_error(capsys, train.main, [*base, *flags], expected)
        assert "no-data" not in line, line
    assert not (tmp_path / "runs").exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    one_line_error(
        capsys,
        train.main,
        [*TINY_ARGS, "--model_dir", str(blocker)],
        f"run folder {blocker}/",
        f"{blocker} is not a folder",
    )


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--epochs", "2.5"], "--epochs: expected an integer, got '2.5'"),
        (["--bn", "maybe"], "--bn: expected a boolean"),
        (["--leak-mem", "x"], "--leak_mem/--leak-mem: expected a number"),
    ],
)
def test_malformed_flags_are_one_line(capsys, flags, expected):
    with pytest.raises(SystemExit) as code:
        train.main([*TINY_ARGS, *flags])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and expected in err, err


# ----------------------------------------------------------------------------- the quickstart refined by flags
def test_flags_without_config_refine_the_quickstart(tmp_path):
    proc = run_script(
        "train.py",
        "--epochs",
        "1",
        "--img_size",
        "16",
        "--timesteps",
        "2",
        "--num_train",
        "16",
        "--num_val",
        "8",
        "--batch_size",
        "8",
        "--model_dir",
        tmp_path,
    )
    first = proc.stdout.splitlines()[0]
    assert first.startswith("config: configs/quickstart.yaml (the quickstart") and "flags override" in first
    cfg = load_checkpoint(tmp_path / "quickstart-snn" / "last.pth")["config"]
    # the quickstart's recipe (synthetic set, Adam, poly) with the flags' sizes
    recipe = (cfg["dataset"], cfg["optimizer"], cfg["scheduler"], cfg["encoder"])
    assert recipe == ("synthetic", "adam", "poly", "direct")
    assert (cfg["epochs"], cfg["timesteps"], cfg["img_size"], cfg["num_train"]) == (1, 2, [16, 16], 16)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "quickstart-snn" / "metrics.jsonl")] == [1]


# ----------------------------------------------------------------------------- test.py checks before evaluating
def test_test_py_refuses_flags_before_evaluating(tiny_ann_run, tmp_path, capsys):
    script = load_test_script()
    model = str(tiny_ann_run / "best.pth")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for flags, expected in [
        (["--timesteps", "8"], "--timesteps applies to --conversion"),
        (["--scaling_factor", "0.7"], "--scaling_factor applies to --conversion"),
        (["--results", str(blocker / "r.json")], f"--results {blocker}/r.json cannot be written"),
        (["--attack", "gaussiannoise", "--atk_factor", "0,abc"], "--atk_factor must be a comma list"),
        (["--img_size", "0"], "--img_size: img_size must be one positive int"),
        (["--batch_size", "0"], "--batch_size: 'batch_size' must be a positive integer"),
        (["--neuron_backend", "gpu"], "--neuron_backend: unknown neuron_backend 'gpu'"),
    ]:
        one_line_error(capsys, script.main, ["--model_path", model, *flags], expected)
    assert "mIoU" not in capsys.readouterr().out  # nothing was evaluated


def test_conversion_of_a_read_only_checkpoint(tiny_ann_run, tmp_path, capsys):
    script = load_test_script()
    ann = tmp_path / "ann.pth"
    shutil.copy(tiny_ann_run / "last.pth", ann)
    ann.chmod(0o444)
    argv = ["--model_path", str(ann), "--conversion", "--timesteps", "2"]
    one_line_error(
        capsys,
        script.main,
        argv,
        f"caches the thresholds it calibrates in {ann}",
        "it is read-only (mode 0444)",
        f"cp {ann}",
    )
    assert "ANN mIoU" not in capsys.readouterr().out  # refused before evaluating or calibrating
    ann.chmod(0o644)
    assert run_main(script.main, argv) == 0
    assert "cached the new layer thresholds for T=2" in capsys.readouterr().out
    ann.chmod(0o444)  # thresholds cached: a read-only checkpoint is all conversion needs now
    assert run_main(script.main, argv) == 0
    assert "using cached layer thresholds for T=2" in capsys.readouterr().out


def test_voc_at_native_size_in_batches(tmp_path):
    voc = tmp_path / "voc"
    shutil.copytree(REPO.parent / "shared" / "fixtures" / "voc2012-mini", voc)
    voc_dir = voc / "VOCdevkit" / "VOC2012"
    (voc_dir / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000033\n")
    ckpt = tiny_checkpoint(tmp_path / "voc.pth", dataset="voc2012", num_classes=21, num_val=None)
    results = tmp_path / "r.json"
    assert (
        run_main(
            load_test_script().main,
            [
                "--model_path",
                str(ckpt),
                "--data_root",
                str(voc),
                "--img_size",
                "-1",
                "--batch_size",
                "2",
                "--results",
                str(results),
            ],
        )
        == 0
    )
    masks = [np.array(Image.open(voc_dir / "SegmentationClass" / f"{n}.png")) for n in ("2007_000032", "2007_000033")]
    # two sizes in one batch: padding is labelled void, so exactly the images' own labelled pixels count
    assert json.loads(results.read_text())["num_pixels"] == sum(int((m != 255).sum()) for m in masks)


def test_broken_pipe_ends_quietly(tmp_path):
    proc = start_script("test.py", "--list", "--model_dir", tmp_path)
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


# ----------------------------------------------------------------------------- resuming with other settings
def test_resume_applies_optimizer_settings_refuses_others_and_follows_the_folder(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_main(train.main, [*ANN, "--epochs", "1", "--model_dir", str(tmp_path), "--name", "r"]) == 0
    shutil.copytree(run, tmp_path / "copy")  # a copied run folder: continued where it is, not refused
    kept = run_files(run)
    for flags, *expected in [
        (["--optimizer", "sgd"], "a resumed run keeps its optimizer ('adam', asked for 'sgd')", "Drop --optimizer"),
        (["--seed", "4"], "a resumed run keeps its seed (3, asked for 4)", "Drop --seed"),
        (["--arch", "fcn-vgg9"], "keeps the checkpoint's model; these settings differ: arch 'dl-vgg9' -> 'fcn-vgg9'"),
    ]:
        one_line_error(capsys, train.main, ["--resume", str(run / "last.pth"), "--epochs", "2", *flags], *expected)
    assert run_files(run) == kept  # config.yaml included: nothing was rewritten

    capsys.readouterr()
    assert run_main(train.main, ["--resume", str(run / "last.pth"), "--epochs", "2", "--lr", "0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("; from epoch 2: epochs 1 -> 2; lr 0.001 -> 0.5")
    assert run_main(train.main, ["--resume", str(tmp_path / "copy" / "last.pth"), "--epochs", "2"]) == 0
    changed, same = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("r", "copy"))
    # The paper's step schedule at epoch 2 of 2: x0.1 at int(0.5 * 2) = 1 and at int(0.8 * 2) = 1.
    assert changed[1]["lr"] == pytest.approx(0.5 * 0.01) and same[1]["lr"] == pytest.approx(0.001 * 0.01)
    assert changed[1]["loss"] != same[1]["loss"]  # the new lr trained, it was not only written down
    assert changed[1]["changes"] == {"epochs": [1, 2], "lr": [0.001, 0.5]}
    assert same[1]["changes"] == {"epochs": [1, 2], "name": ["r", "copy"]}
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.5
    assert yaml.safe_load((tmp_path / "copy" / "config.yaml").read_text())["lr"] == 0.001

    (tmp_path / "copy").rename(tmp_path / "moved")  # a moved run folder goes on where it is now
    assert run_main(train.main, ["--resume", str(tmp_path / "moved" / "last.pth"), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "moved" / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved", "r"]


def test_resume_rules_are_those_docs_runs_md_states():
    from utils.runs import resume_rule

    documented = {
        "refused": "model_type arch img_size timesteps leak_mem def_threshold surrogate surrogate_params bn encoder "
        "full_prop leaky alpha conv_bias readout dataset thl channels seq_len optimizer seed",
        "applied": "epochs lr momentum weight_decay scheduler batch_size amp augment train_split num_train num_val "
        "void_to_background datalist",
        "free": "neuron_backend compile memory_saving memory_block device num_workers cpu_malloc data_root pretrained "
        "model_dir name test_display see_model wandb",
    }
    assert {key: resume_rule(key) for rule, keys in documented.items() for key in keys.split()} == {
        key: rule for rule, keys in documented.items() for key in keys.split()
    }
    text = (REPO / "docs" / "runs.md").read_text()
    assert all(f"`{key}`" in text for keys in documented.values() for key in keys.split())


# ----------------------------------------------------------------------------- signals and early ends
def lines_in(path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def test_sigterm_is_ctrl_c_and_a_start_stopped_before_its_first_epoch_changes_nothing(tmp_path):
    run = tmp_path / "t"
    proc = start_script("train.py", *ANN, "--epochs", "30", "--model_dir", tmp_path, "--name", "t")
    wait_for(lambda: lines_in(run / "metrics.jsonl") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    last = load_checkpoint(run / "last.pth")
    assert proc.returncode == 128 + signal.SIGTERM and last["epoch"] == len(read_jsonl(run / "metrics.jsonl")), err
    hint = (
        f"interrupted (SIGTERM); the last good checkpoint is {run / 'last.pth'} (epoch {last['epoch']}): "
        f"continue with `python train.py --resume {run / 'last.pth'}`"
    )
    assert hint in err and "Traceback" not in err and not (run / ".running").exists()

    # a resumed start with a new --lr, stopped before its first epoch boundary: no file changes
    kept = run_files(run)
    proc = start_script("train.py", "--resume", run / "last.pth", "--lr", "0.5")
    wait_for(lambda: (run / ".running").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and f"--resume {run / 'last.pth'}" in err and "Traceback" not in err, err
    assert run_files(run) == kept  # config.yaml still says the lr that ran

    # a new run stopped before its first epoch boundary leaves no folder and names no file to resume
    proc = start_script("train.py", *ANN, "--model_dir", tmp_path / "new", "--name", "n")
    wait_for(lambda: (tmp_path / "new" / "n" / ".running").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "no epoch was completed, so no checkpoint was written" in err and "--resume" not in err
    assert not (tmp_path / "new").exists()


def test_advice_names_only_files_that_exist(tmp_path, capsys):
    run = tmp_path / "f"
    # the disk is full from the start: epoch 1's checkpoint cannot be written, so there is nothing to resume
    proc = run_script(
        *["train.py", *ANN, "--epochs", "1", "--model_dir", tmp_path, "--name", "f"],
        check=False,
        preexec_fn=limit_file_size(8192),
    )
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and not (run / "last.pth").exists(), proc.stderr
    assert "start the run again with --overwrite (no epoch of it was saved)" in lines[0] and "--resume" not in lines[0]
    line = one_line_error(
        capsys,
        train.main,
        [*ANN, "--model_dir", str(tmp_path), "--name", "f"],
        f"{run} already holds a run that was started but completed no epoch: it has no last.pth to resume from",
        "--overwrite",
    )
    assert "--resume" not in line


def test_non_finite_weights_or_statistics_stop_the_run(tmp_path, capsys):
    # Adam's first step moves every weight by about lr: the loss stays finite, the BN statistics overflow.
    one_line_error(
        capsys,
        train.main,
        [*ANN, "--lr", "1e30", "--epochs", "2", "--model_dir", str(tmp_path / "runs"), "--name", "big"],
        "became NaN or infinite in epoch 1; training stopped, no epoch was completed, so no checkpoint was written",
    )
    assert not (tmp_path / "runs").exists()  # made for this start, removed with it


def test_a_run_name_is_one_folder(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "keep.txt").write_text("a file of the user")
    for name in (".", "..", "a/b", str(tmp_path)):
        one_line_error(
            capsys,
            train.main,
            [*ANN, "--model_dir", str(models), "--name", name, "--overwrite"],
            "name must be",
            "folder name inside model_dir",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"] and (models / "keep.txt").is_file()


# ----------------------------------------------------------------------------- paths, values and files checked first
def test_every_path_test_py_uses_is_checked_before_any_work(tiny_ann_run, tmp_path, capsys):
    script = load_test_script()
    model = tmp_path / "m.pth"
    shutil.copy(tiny_ann_run / "best.pth", model)
    before = model.read_bytes()
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for flags, expected in [
        (["--results", str(model)], f"--results {model} is the same file as --model_path {model}"),
        (["--save_predictions", str(blocker)], f"--save_predictions {blocker} cannot be written: it is a file"),
        (["--plot", "--plot_dir", str(blocker / "p")], f"--plot_dir {blocker}/p cannot be written"),
        (["--compare", str(tmp_path / "gone.pth")], f"--compare {tmp_path / 'gone.pth'} not found"),
        (["--compare", str(tmp_path)], f"--compare {tmp_path} is a folder, not a file"),
        (["--conversion", "--timesteps", "2", "--save_snn", str(model)], f"--save_snn {model} is the same file as"),
        (["--conversion", "--conversion_plot", str(blocker / "c.png")], f"--conversion_plot {blocker}/c.png cannot"),
        (["--seed", str(2**64)], "--seed: 'seed' must be an integer in [0, 4294967295]"),
    ]:
        one_line_error(capsys, script.main, ["--model_path", str(model), *flags], expected)
    one_line_error(capsys, script.main, ["--model_path", str(tmp_path)], f"--model_path {tmp_path} is a folder")
    assert "mIoU" not in capsys.readouterr().out  # nothing was evaluated
    assert model.read_bytes() == before


def test_converter_never_replaces_its_input(tmp_path, capsys):
    source = tiny_checkpoint(tmp_path / "a.pth")
    before = source.read_bytes()
    (tmp_path / "link.pth").hardlink_to(source)
    for output in (source, tmp_path / "." / "a.pth", tmp_path / "link.pth"):
        one_line_error(
            capsys,
            converter.main,
            ["thresholds", str(source), "--type", "layer", "-o", str(output)],
            f"-o {output} is the same file as the input {source}: it would be replaced",
        )
    assert source.read_bytes() == before


def test_config_files_are_checked_whole(tmp_path, capsys):
    def refused(text, *expected):
        config = tmp_path / "c.yaml"
        config.write_text(text)
        line = one_line_error(capsys, train.main, ["--config", str(config)], f"{config}: ", *expected)
        assert len(line) < 400, len(line)  # a huge value is not repeated in the message

    refused("epochs: 1\nlr: 0.1\nepochs: 2\n", "duplicate key 'epochs' at line 3 (first at line 1)")
    refused("name: " + "x" * (2 << 20) + "\n", "2,097,159 bytes is too large for a config file (at most 1,048,576)")
    refused("name: " + "x" * 100_000 + "\n", "the value of 'name' is 100,000 characters long (at most 4,096)")
    refused("seed: " + "9" * 5000 + "\n", "Exceeds the limit")
    refused("epochs: " + "y" * 4000 + "\n", "'epochs'", "expected an integer, got 'yyy", "(4,002 characters)")
    assert not (tmp_path / "trained_models").exists()


def test_a_checkpoint_with_integer_weights_is_refused(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "int.pth")
    checkpoint = load_checkpoint(path)
    first_float = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"] = {k: v.long() for k, v in checkpoint["state_dict"].items()}
    save_checkpoint(path, checkpoint)
    one_line_error(
        capsys,
        load_test_script().main,
        ["--model_path", str(path)],
        f"{path}: {first_float!r} holds int64 values where the model has floating-point weights",
    )


# ----------------------------------------------------------------------------- work that cannot fit in memory
def test_memory_estimate_refuses_what_cannot_fit_and_passes_what_can(tiny_ann_run, tmp_path, capsys):
    from utils.preflight import estimate_bytes

    script = load_test_script()
    model = str(tiny_ann_run / "best.pth")
    cfg = load_checkpoint(model)["config"]
    # Evaluation: the largest layer output of dl-vgg9 is its first conv (64 channels at full resolution),
    # all T steps of a batch at once, float32, times the safety factor 3 (docs/runs.md); plus the weights.
    weights = 4 * sum(v.numel() for k, v in load_checkpoint(model)["state_dict"].items() if "running" not in k)
    expected = 64 * 16 * 16 * 1000 * 8 * 4 * 3
    assert estimate_bytes(cfg, 8, 1000, (16, 16), training=False) - weights == pytest.approx(expected, rel=0.01)

    argv = ["--model_path", model, "--conversion", "--timesteps", "2,1000000"]
    line = one_line_error(capsys, script.main, argv, "the converted SNN's evaluation needs about", "T=1000000")
    assert "dl-vgg9 at 16x16" in line and "batch 8" in line and "lower --timesteps, --batch_size or --img_size" in line
    assert "ANN mIoU" not in capsys.readouterr().out  # refused before the ANN was evaluated

    # training: refused before the data is built (the synthetic set would allocate its 30000x30000 grid)
    line = one_line_error(
        capsys,
        train.main,
        [*ANN, "--img_size", "30000", "--model_dir", str(tmp_path / "runs"), "--name", "huge"],
        "training needs about",
        "lower --batch_size or --img_size",
    )
    assert not (tmp_path / "runs").exists()
    # ... and what fits passes: the tiny run of the other tests, evaluated at T=2 and at its own size
    assert run_main(script.main, ["--model_path", model, "--num_workers", "0"]) == 0


def jpeg_claiming_size(path, height: int, width: int):
    """A small JPEG whose header (SOF0) says height x width: a huge image as far as its header is read."""
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_voc_native_size_with_a_huge_image_is_refused_before_evaluating(tmp_path, capsys):
    voc = tmp_path / "voc"
    shutil.copytree(REPO.parent / "shared" / "fixtures" / "voc2012-mini", voc)
    voc_dir = voc / "VOCdevkit" / "VOC2012"
    jpeg_claiming_size(voc_dir / "JPEGImages" / "2007_000033.jpg", 30000, 30000)
    ckpt = tiny_checkpoint(tmp_path / "voc.pth", dataset="voc2012", num_classes=21, num_val=None)
    argv = ["--model_path", str(ckpt), "--data_root", str(voc), "--img_size", "-1", "--batch_size", "1"]
    one_line_error(capsys, load_test_script().main, argv, "the evaluation needs about", "at 30000x30000", "lower")
    assert "mIoU" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- torchrun
def worker_pids(launcher) -> dict:
    """{rank: pid} of the workers torchrun (process `launcher`) started."""
    workers = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == launcher:
                environ = dict(
                    item.split("=", 1) for item in open(f"/proc/{entry}/environ").read().split("\0") if "=" in item
                )
                workers[int(environ["RANK"])] = int(entry)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return workers


def torchrun_train(*args):
    return start_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args)


def test_torchrun_interrupt_ends_every_rank_with_the_resume_hint(tmp_path):
    run = tmp_path / "ddp"
    hint = f"continue with `torchrun --nproc_per_node=2 train.py --resume {run / 'last.pth'}`"

    def ended_cleanly(proc):
        _, err = proc.communicate(timeout=240)
        epoch = load_checkpoint(run / "last.pth")["epoch"]
        hints = [line for line in err.splitlines() if hint in line]
        assert len(hints) == 2, err  # one from each rank
        assert all(f"the last good checkpoint is {run / 'last.pth'} (epoch {epoch})" in line for line in hints)
        assert 'train.py", line' not in err  # no worker's traceback (torchrun reports the exit codes itself)
        assert epoch == len(read_jsonl(run / "metrics.jsonl")) and not (run / ".running").exists()
        return epoch

    # Ctrl-C sent to one worker only: the other is stopped by torchrun or loses its peer; both say how to go on
    proc = torchrun_train(*ANN, "--epochs", "30", "--model_dir", tmp_path, "--name", "ddp")
    wait_for(lambda: lines_in(run / "metrics.jsonl") >= 1, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGINT)
    epoch = ended_cleanly(proc)

    # Ctrl-C in a terminal: SIGINT to torchrun and to every worker
    proc = torchrun_train("--resume", run / "last.pth")
    wait_for(lambda: lines_in(run / "metrics.jsonl") > epoch, proc)
    os.killpg(proc.pid, signal.SIGINT)
    ended_cleanly(proc)


def test_python_m_data_modules_run_without_runpy_warning():
    # runpy warns when the module it runs was imported already by its package (data/__init__.py)
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    documented = {m for doc in docs for m in re.findall(r"python -m (data\.\w+)", doc.read_text())}
    assert "data.ddd17" in documented
    probe = "import sys, data; print(' '.join(m for m in sys.modules if m.startswith('data.')))"
    ran = {f"{m}.__main__" if importlib.util.find_spec(m).submodule_search_locations else m for m in documented}
    assert not ran & set(run_script("-c", probe).stdout.split())
    proc = run_script("-m", "data.ddd17", "--help")
    assert "pack" in proc.stdout and proc.stderr == ""
