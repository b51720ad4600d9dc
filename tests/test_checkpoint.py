"""Checkpoints: atomic writes, weights-only loading, clear errors, rebuilding models."""

import os
import sys

import pytest
import torch

import models
from utils.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint

SMALL = {
    "model_type": "ann",
    "arch": "dl-vgg9",
    "num_classes": 4,
    "in_channels": 3,
    "img_size": [16, 16],
    "timesteps": 2,
}


def small_checkpoint(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    model = models.build_model(cfg)
    return model, {"format": FORMAT, "config": dict(cfg), "state_dict": model.state_dict(), "epoch": 1}


class RunsACommand:
    """Unpickling this object would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_no_temp_files_left(tmp_path):
    _, ckpt = small_checkpoint()
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and loaded["config"] == ckpt["config"]
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    assert os.listdir(path.parent) == ["ckpt.pth"]


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    _, ckpt = small_checkpoint()
    save_checkpoint(path, ckpt)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {**ckpt, "bad": lambda: 0})  # lambdas cannot be pickled: fails mid-write
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_checkpoint_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"format": FORMAT, "config": {}, "state_dict": {}, "payload": RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "is not a PyTorch checkpoint"),
        (b"just some text, not a checkpoint\n", "is not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, expected):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_malformed_checkpoints_name_what_is_missing(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"format": FORMAT, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="missing key\\(s\\) 'config'"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict.*found a list"):
        load_checkpoint(path)
    torch.save({"config": {}, "state_dict": {}, "max_miou": 0.5, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="paper's repository.*converter.py"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(tmp_path / "nowhere.pth")


def test_load_model_rebuilds_from_config_in_eval_mode(tmp_path):
    model, ckpt = small_checkpoint(seed=5)
    with torch.no_grad():  # give BN running statistics non-default values, so they must be loaded too
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand_like(buf))
    ckpt["state_dict"] = model.state_dict()
    save_checkpoint(tmp_path / "m.pth", ckpt)
    torch.manual_seed(99)  # a different init: only loaded weights can reproduce the output
    loaded = load_model(tmp_path / "m.pth")
    assert not loaded.training
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    _, fcn = small_checkpoint({**SMALL, "arch": "fcn-vgg9"})
    tampered = {**fcn, "config": dict(SMALL)}  # config says dl-vgg9, weights are fcn-vgg9
    save_checkpoint(tmp_path / "x.pth", tampered)
    with pytest.raises(CheckpointError, match="another architecture") as err:
        load_model(tmp_path / "x.pth")
    assert "x.pth" in str(err.value) and "dl-vgg9" in str(err.value)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_checkpoints_get_the_umask_permissions(tmp_path, umask, mode):
    _, ckpt = small_checkpoint()
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.pth", ckpt)
    finally:
        os.umask(previous)
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == mode


def test_temp_files_of_killed_writers_are_removed(tmp_path):
    import subprocess

    from common.files import HOST

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".c.pth.{HOST}.{int(finished.stdout)}.0a1b2c3d.tmp"  # its writer has ended
    live = tmp_path / f".c.pth.{HOST}.{os.getpid()}.0a1b2c3d.tmp"  # a writer still at work
    legacy = tmp_path / ".c.pth.k3j4h5g6.tmp"  # left by an older version, days ago
    foreign = tmp_path / ".c.pth.otherhost.12.0a1b2c3d.tmp"  # another machine's writer, just now
    for path in (dead, live, legacy, foreign):
        path.write_bytes(b"partial")
    os.utime(legacy, (0, 0))
    _, ckpt = small_checkpoint()
    save_checkpoint(tmp_path / "c.pth", ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.pth", live.name, foreign.name])


def test_read_only_checkpoints_are_not_replaced(tmp_path):
    from common.files import WriteError

    path = tmp_path / "kept.pth"
    _, ckpt = small_checkpoint()
    save_checkpoint(path, ckpt)
    before = path.read_bytes()
    path.chmod(0o444)
    with pytest.raises(WriteError, match=r"cannot write .*kept.pth: it is read-only \(mode 0444\)"):
        save_checkpoint(path, {**ckpt, "epoch": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["kept.pth"]
    with pytest.raises(WriteError, match="it is a folder"):
        save_checkpoint(tmp_path, ckpt)
