"""Bad input -> one clear line naming the thing, non-zero exit, no traceback; NaN stop; Ctrl-C save."""

import math
import os

import pytest
import torch

import setup
import train
from common.cli import run_main
from tests.conftest import TINY_ARGS, load_test_script, one_line_error, read_jsonl, run_script
from utils.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from utils.config import SCHEMA


def test_subprocess_exit_code_and_single_line_without_traceback(tmp_path):
    proc = run_script("train.py", "--dataset", "voc2012", "--data_root", tmp_path / "no-voc-here", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "no-voc-here" in proc.stderr


def test_debug_flag_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_main(train.main, ["--dataset", "voc2012", "--data_root", str(tmp_path / "nope"), "--debug"])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--dataset", "voc2012", "--data_root", "/no/such/voc"], ["/no/such/voc"]),
        (["--dataset", "cityscapes"], ["unknown dataset 'cityscapes'"]),
        (["--dataset", "synthetic", "--arch", "vgg99"], ["unknown arch 'vgg99'", "dl-vgg9"]),
    ],
)
def test_train_bad_flags(capsys, argv, expected):
    one_line_error(capsys, train.main, argv, *expected)


def test_train_bad_yaml(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_type: snn\n  arch: : dl-vgg9\n")
    one_line_error(capsys, train.main, ["--config", str(broken)], "broken.yaml", "malformed YAML")
    typo = tmp_path / "typo.yaml"
    typo.write_text("dataset: synthetic\nbatchsize: 4\n")
    one_line_error(capsys, train.main, ["--config", str(typo)], "typo.yaml", "'batchsize'")


def tiny_checkpoint(path, arch="dl-vgg9", config_arch=None, **overrides):
    import models

    cfg = {
        **models.MODEL_DEFAULTS,
        "model_type": "ann",
        "arch": arch,
        "dataset": "synthetic",
        "num_classes": 4,
        "in_channels": 3,
        "img_size": [16, 16],
        "num_val": 2,
        "batch_size": 2,
        "num_workers": 0,
        "thl": False,
        "augment": False,
        "data_root": None,
        "seed": 0,
        **overrides,
    }
    state = models.build_model(cfg, SCHEMA).state_dict()
    save_checkpoint(path, {"format": FORMAT, "config": {**cfg, "arch": config_arch or arch}, "state_dict": state})
    return path


def test_test_py_bad_checkpoints(capsys, tmp_path):
    script = load_test_script()
    text = tmp_path / "readme.pth"
    text.write_text("not a checkpoint")
    one_line_error(capsys, script.main, ["--model_path", str(text)], "readme.pth", "not a PyTorch checkpoint")
    one_line_error(capsys, script.main, ["--model_path", str(tmp_path / "gone.pth")], "gone.pth")
    other = tiny_checkpoint(tmp_path / "other.pth", arch="fcn-vgg9", config_arch="dl-vgg9")
    one_line_error(capsys, script.main, ["--model_path", str(other)], "other.pth", "another architecture")
    one_line_error(capsys, script.main, ["--list", "--model_dir", str(tmp_path / "none")], "none")


def test_test_py_refuses_code_and_does_not_run_it(capsys, tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"format": FORMAT, "config": {}, "state_dict": {}, "x": Payload()}, evil)
    one_line_error(capsys, load_test_script().main, ["--model_path", str(evil)], "evil.pth", "refused")
    one_line_error(capsys, train.main, ["--resume", str(evil)], "evil.pth", "refused")
    assert not marker.exists()


def test_resume_with_another_architecture(capsys, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "dl.pth")
    data = load_checkpoint(ckpt)
    save_checkpoint(ckpt, {**data, "optimizer": {}, "scheduler": {}, "epoch": 1, "best_miou": 0.0, "rng": {}})
    one_line_error(
        capsys,
        train.main,
        ["--resume", str(ckpt), *TINY_ARGS, "--arch", "fcn-vgg9", "--epochs", "2", "--model_dir", str(tmp_path)],
        "dl.pth",
        "arch 'dl-vgg9' -> 'fcn-vgg9'",
    )


class FailsLater(torch.nn.Module):
    """Wraps a real model; from forward call `after` on, outputs NaN (or raises KeyboardInterrupt)."""

    def __init__(self, model, after, failure):
        super().__init__()
        self.model, self.after, self.failure, self.calls = model, after, failure, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        if self.model.training and self.calls > self.after:
            if self.failure == "nan":
                return out * math.nan
            raise KeyboardInterrupt
        return out


def tiny_train_args(tmp_path, name):
    return [*TINY_ARGS, "--model_type", "ann", "--epochs", "3", "--model_dir", str(tmp_path), "--name", name]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(monkeypatch, capsys, tmp_path):
    real_build = setup.build_model
    # 2 training batches + 1 validation batch per epoch: call 4 is the first training batch of epoch 2
    monkeypatch.setattr(setup, "build_model", lambda cfg, device: FailsLater(real_build(cfg, device), 3, "nan"))
    line = one_line_error(capsys, train.main, tiny_train_args(tmp_path, "nan"), "loss became nan", "epoch 2")
    assert "last.pth (epoch 1)" in line
    kept = load_checkpoint(tmp_path / "nan" / "last.pth")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_ctrl_c_keeps_the_epoch_boundary_checkpoint(monkeypatch, capsys, tmp_path):
    real_build = setup.build_model
    # call 5 is the second training batch of epoch 2: epoch 1 is written, epoch 2 is not
    monkeypatch.setattr(setup, "build_model", lambda cfg, device: FailsLater(real_build(cfg, device), 4, "interrupt"))
    assert run_main(train.main, tiny_train_args(tmp_path, "stop")) == 130
    err = capsys.readouterr().err
    assert "last.pth (epoch 1)" in err and "--resume" in err
    saved = load_checkpoint(tmp_path / "stop" / "last.pth")
    assert saved["epoch"] == 1 and "interrupted" not in saved  # an epoch boundary, labelled as such
    assert [r["epoch"] for r in read_jsonl(tmp_path / "stop" / "metrics.jsonl")] == [1]
