"""Run safety, inputs and outputs: optional packages and DataLoader workers in one line, outputs that replace
only their own kind, the NIR exporter's input sizes, which config keys were given, and the messages that
must name what the user typed or where the file is. In-process through the scripts' run_main where the case
allows (tests/conftest.py)."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import converter
import setup
import train
from common.cli import run_main, tell_torchrun
from data import datalists, visualize
from tests.conftest import TINY_ARGS, load_test_script, one_line_error, read_jsonl, run_script
from tests.event_fixtures import write_dsec_sequence
from tests.test_data_ddd17 import write_tree
from tests.test_data_dsec import T_OFFSET, small_sequence
from tests.test_data_voc import FIXTURE as VOC_FIXTURE
from utils.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from utils.config import given_keys

ANN = [*TINY_ARGS, "--model_type", "ann"]
DEPLOYABLE = dict(
    model_type="snn",
    arch="dl-vgg9",
    num_classes=4,
    in_channels=3,
    img_size=16,
    timesteps=2,
    encoder="direct",
    leak_mem=0.99,
    bntt=False,
    reset="zero",
    neuron_backend="torch",
)


@pytest.fixture(scope="module")
def snn_path(tmp_path_factory):
    """A deployable SNN checkpoint (exportable to NIR)."""
    import models

    model = models.build_model(DEPLOYABLE)
    path = tmp_path_factory.mktemp("snn") / "snn.pth"
    save_checkpoint(path, {"format": FORMAT, "config": dict(model.config), "state_dict": model.state_dict()})
    return path


def voc_root(tmp_path):
    shutil.copytree(VOC_FIXTURE, tmp_path / "voc")
    return tmp_path / "voc" / "VOCdevkit" / "VOC2012"


VOC_ARGS = ["--dataset", "voc2012", "--img_size", "16", "--batch_size", "2", "--epochs", "1", "--device", "cpu"]


# ----------------------------------------------------------------------------- export-nir
def test_export_nir_refuses_bad_and_huge_input_sizes(snn_path, tmp_path, capsys):
    out = tmp_path / "m.nir"
    export = ["export-nir", str(snn_path), "-o", str(out)]
    one_line_error(capsys, converter.main, [*export, "--input-size", "0", "5"], "--input-size", "0 5")
    one_line_error(capsys, converter.main, [*export, "--input-size", "2", "5"], "2x5 is below", "dl-vgg9", "4x4")
    one_line_error(capsys, converter.main, [*export, "--input-size", "65536", "65536"], "NIR export needs about", "TB")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_nir_overwrite_replaces_only_a_nir_file_it_wrote(snn_path, tiny_ann_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_ann_run, run)
    before = (run / "last.pth").read_bytes()
    export = ["export-nir", str(snn_path)]
    one_line_error(
        capsys, converter.main, [*export, "-o", str(run / "last.pth"), "--overwrite"], "is not a NIR file written"
    )
    assert (run / "last.pth").read_bytes() == before and load_checkpoint(run / "last.pth")["epoch"] == 2
    nir_file = tmp_path / "m.nir"
    assert run_main(converter.main, [*export, "-o", str(nir_file)]) == 0
    assert run_main(converter.main, [*export, "-o", str(nir_file), "--overwrite"]) == 0  # its own kind


# ----------------------------------------------------------------------------- other outputs
def test_outputs_replace_only_their_own_kind(tiny_ann_run, tmp_path, capsys):
    script = load_test_script()
    model, other = tiny_ann_run / "last.pth", tmp_path / "other.pth"
    shutil.copy(tiny_ann_run / "best.pth", other)  # a training checkpoint
    kept = other.read_bytes()
    base = ["--model_path", str(model), "--num_workers", "0"]
    one_line_error(capsys, script.main, [*base, "--results", str(other)], "--results", "not a results JSON")
    conversion = [*base, "--conversion", "--timesteps", "2", "--save_snn", str(other)]
    one_line_error(capsys, script.main, conversion, "--save_snn", "not an SNN that test.py --save_snn wrote")
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    plot = [*base, "--conversion", "--timesteps", "2", "--conversion_plot", str(note)]
    one_line_error(capsys, script.main, plot, "--conversion_plot", "not an image")
    for command in ("import-paper", "thresholds", "state-dict"):
        args = [command, str(model), "-o", str(other)] + (["--type", "layer"] if command == "thresholds" else [])
        one_line_error(capsys, converter.main, args, f"-o {other} exists and is not a checkpoint")
    one_line_error(capsys, visualize._main, ["--out", str(note)], "--out", "not an image")
    lists = ["--dataset", "ddd17", "--root", str(tmp_path), "--out", str(other)]
    one_line_error(capsys, datalists._main, lists, "--out", "not a text list")
    from data.ddd17.__main__ import _main as ddd17_main

    one_line_error(capsys, ddd17_main, ["pack", str(tmp_path), "train", str(other)], "not a packed DDD17 file")
    assert other.read_bytes() == kept and note.read_text() == "mine"

    results = tmp_path / "results.json"  # a results JSON is replaced by the next one
    assert run_main(script.main, [*base, "--results", str(results)]) == 0
    first = results.read_bytes()
    assert run_main(script.main, [*base, "--results", str(results)]) == 0
    assert json.loads(results.read_text())["miou"] == json.loads(first)["miou"]


# ----------------------------------------------------------------------------- optional packages, workers
def test_missing_hdf5plugin_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("snnseg-synthetic-dsec-*"))
    raw = [*TINY_ARGS, "--dataset", "synthetic-events", "--raw_events", "true", "--model_dir", str(tmp_path)]
    one_line_error(capsys, train.main, raw, "hdf5plugin", "pip install hdf5plugin")
    assert set(temp.glob("snnseg-synthetic-dsec-*")) == before and not list(tmp_path.iterdir())

    # test.py on a checkpoint of such a run
    import data
    from tests.test_pipeline_errors import tiny_checkpoint
    from utils.config import all_defaults

    events = {**all_defaults(), "dataset": "synthetic-events", "raw_events": True}
    info = data.dataset_info("synthetic-events", events)
    ckpt = tiny_checkpoint(
        tmp_path / "ev.pth",
        dataset="synthetic-events",
        raw_events=True,
        in_channels=int(info["in_channels"]),
        num_classes=int(info["num_classes"]),
    )
    one_line_error(capsys, load_test_script().main, ["--model_path", str(ckpt)], "pip install hdf5plugin")
    assert set(temp.glob("snnseg-synthetic-dsec-*")) == before


def test_python_m_data_with_a_missing_package_is_one_line(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        events, rmap, labels, stamps = small_sequence(rng, 4)
        write_dsec_sequence(tmp_path / "dsec" / split / "s", events, rmap, labels, stamps, t_offset=T_OFFSET)
    shim = tmp_path / "shim"  # the child process cannot import hdf5plugin
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['hdf5plugin'] = None\n")
    monkeypatch.setenv("PYTHONPATH", str(shim))
    out = tmp_path / "v.png"
    args = ["-m", "data.visualize", "--dataset", "dsec-semantic", "--data-root", tmp_path / "dsec", "--out", out]
    proc = run_script(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "pip install hdf5plugin" in proc.stderr
    )
    assert not out.exists()


class _NeedsPackage(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        import nir  # noqa: F401  (hidden in the test: fails in the worker)

        return torch.zeros(1)


class _CorruptItem(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise ValueError("cannot read mask /data/x.png: image file is truncated")


def test_errors_raised_in_dataloader_workers_are_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nir", None)

    def iterate(dataset):
        return lambda argv: list(torch.utils.data.DataLoader(dataset, num_workers=1))

    line = one_line_error(capsys, iterate(_NeedsPackage()), [], "optional package 'nir'", "pip install nir")
    assert "DataLoader worker" not in line
    line = one_line_error(capsys, iterate(_CorruptItem()), [], "cannot read mask /data/x.png: image file is truncated")
    assert "Caught" not in line and "Original Traceback" not in line


def test_corrupt_label_read_in_a_worker_names_the_file(tmp_path, capsys):
    voc = voc_root(tmp_path)
    mask = voc / "SegmentationClass" / "2007_000032.png"
    mask.write_bytes(mask.read_bytes()[:300])  # truncated
    args = [*VOC_ARGS, "--data_root", str(voc.parents[1]), "--model_dir", str(tmp_path / "runs")]  # 2 workers
    line = one_line_error(capsys, train.main, args, "2007_000032.png")
    assert "Caught" not in line and len(line) < 400
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_pretrained_that_is_not_weights_is_one_line(tmp_path, capsys):
    junk = tmp_path / "vgg.pth"
    junk.write_text("not weights")
    args = [*ANN, "--pretrained", str(junk), "--model_dir", str(tmp_path / "runs")]
    line = one_line_error(capsys, train.main, args, f"pretrained weights '{junk}'", "not a weights-only")
    assert "weights_only=False" not in capsys.readouterr().err + line


# ----------------------------------------------------------------------------- folders that cannot be read
def deny(monkeypatch, folder):
    """`folder` as a user without read permission sees it (tests run as root, who may read anything)."""
    if os.geteuid() != 0:
        folder.chmod(0)
        return
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))


def test_unreadable_label_folders_say_permission_denied(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        events, rmap, labels, stamps = small_sequence(rng, 4)
        write_dsec_sequence(tmp_path / "dsec" / split / "s", events, rmap, labels, stamps, t_offset=T_OFFSET)
    labels = tmp_path / "dsec" / "train" / "s" / "semantic" / "left" / "11classes" / "data"
    deny(monkeypatch, labels)
    dsec = ["--dataset", "dsec-semantic", "--data_root", str(tmp_path / "dsec"), "--dsec_labels", "all"]
    args = [*dsec, "--img_size", "-1", "--model_type", "ann", "--device", "cpu", "--model_dir", str(tmp_path / "r")]
    one_line_error(capsys, train.main, args, f"label folder {labels} is not readable (permission denied)")

    voc = voc_root(tmp_path)
    deny(monkeypatch, voc / "SegmentationClass")
    args = [*VOC_ARGS, "--data_root", str(voc.parents[1]), "--model_dir", str(tmp_path / "r")]
    one_line_error(capsys, train.main, args, "mask folder", "is not readable (permission denied)")
    assert not (tmp_path / "r").exists()  # refused before a run folder was made


# ----------------------------------------------------------------------------- which keys were given
def test_the_config_layer_knows_which_keys_were_given(tmp_path, capsys):
    parser = train.get_args_parser()
    args = parser.parse_args(["--config", "configs/quickstart.yaml", "--lr", "0.01"])
    cfg, sources = setup.resolve_config_sources(args)
    assert sources["lr"] == "--lr" and sources["num_train"] == "configs/quickstart.yaml"
    assert "momentum" not in given_keys(sources) and cfg["momentum"] == 0.9  # a default, not given
    assert setup.resolve_config(args) == cfg

    # a key the user never typed is named with the file it came from
    voc = voc_root(tmp_path)
    args = ["--config", "configs/quickstart.yaml", "--dataset", "voc2012", "--data_root", str(voc.parents[1])]
    one_line_error(
        capsys, train.main, args, "num_train (set in configs/quickstart.yaml, not on the command line)", "voc2012"
    )


def test_img_size_below_the_architectures_downsampling_is_refused(tiny_ann_run, tmp_path, capsys):
    small = [*ANN, "--model_dir", str(tmp_path)]
    small[small.index("--img_size") + 1] = "3"
    one_line_error(capsys, train.main, small, "img_size 3x3 is below", "dl-vgg9", "4x4")
    args = ["--model_path", str(tiny_ann_run / "last.pth"), "--img_size", "2", "--num_workers", "0"]
    one_line_error(capsys, load_test_script().main, args, "--img_size 2x2 is below")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- messages
def test_datalists_check_accepts_a_ddd17_split_name(tmp_path, capsys):
    write_tree(tmp_path)
    assert datalists.main(["--dataset", "ddd17", "--root", str(tmp_path), "--check", "train"]) == 0
    assert "train: " in capsys.readouterr().out
    one_line_error(
        capsys, datalists._main, ["--dataset", "ddd17", "--root", str(tmp_path), "--check", "nolist.txt"], "nolist.txt"
    )


def test_conversion_flags_are_named_as_typed(tiny_ann_run, capsys):
    args = ["--model_path", str(tiny_ann_run / "last.pth"), "--neuron", "if"]
    line = one_line_error(capsys, load_test_script().main, args, "--neuron applies to --conversion")
    assert "conversion_neuron" not in line


def test_continuing_best_pth_elsewhere_names_where_the_best_checkpoint_is(tiny_ann_run, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_ann_run, runs / "a")
    best = runs / "a" / "best.pth"
    worse = dict(miou=-1.0, pixel_acc=0.0, mean_acc=0.0, fwiou=0.0, num_pixels=1)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: worse)  # no epoch of the new folder improves
    args = ["--resume", str(best), "--epochs", "3", "--model_dir", str(runs), "--name", "b"]
    assert run_main(train.main, args) == 0
    out = capsys.readouterr().out
    assert not (runs / "b" / "best.pth").exists()
    assert f"in {best} (no epoch of this run improved on it" in out
    assert f"evaluate with: python test.py --model_path {best}" in out


def test_given_keys_are_recorded_and_a_resume_from_best_pth_restores_the_first_metrics_line(tmp_path):
    run = tmp_path / "g"
    assert run_main(train.main, [*ANN, "--epochs", "1", "--model_dir", str(tmp_path), "--name", "g"]) == 0
    first = read_jsonl(run / "metrics.jsonl")

    # the run recorded its given keys in its checkpoints; a resume reads them back
    parser = train.get_args_parser()
    checkpoint = load_checkpoint(run / "last.pth")
    assert "lr" in checkpoint["given"] and "momentum" not in checkpoint["given"]
    assert set(checkpoint["given"]) == set(load_checkpoint(run / "best.pth")["given"])
    resumed = parser.parse_args(["--resume", str(run / "last.pth"), "--epochs", "2"])
    _, sources = setup.resolve_config_sources(
        resumed, base=checkpoint["config"], base_source=str(run / "last.pth"), base_given=checkpoint["given"]
    )
    assert sources["lr"] == str(run / "last.pth") and sources["epochs"] == "--epochs"
    assert "momentum" not in sources and "leak_mem" not in sources
    # a checkpoint without the record: the keys that differ from the default count as given
    _, sources = setup.resolve_config_sources(resumed, base=checkpoint["config"], base_source="old.pth")
    assert sources["optimizer"] == "old.pth" and "lr" not in sources  # adam was given; lr 1e-3 is the default

    # killed while writing the first last.pth: best.pth and config.yaml are there, the metrics line is not
    (run / "last.pth").unlink()
    (run / "metrics.jsonl").unlink()
    assert run_main(train.main, ["--resume", str(run / "best.pth"), "--epochs", "2"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[0] == first[0]
    assert set(load_checkpoint(run / "last.pth")["given"]) == set(checkpoint["given"])  # epochs was given too


def test_a_full_disk_at_the_end_of_a_run_names_the_file(tmp_path, capsys, monkeypatch):
    save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        if "predictions.png" in str(fp):
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    run = tmp_path / "f"
    args = [*ANN, "--epochs", "1", "--model_dir", str(tmp_path), "--name", "f"]
    one_line_error(
        capsys, train.main, args, f"cannot write {run / 'predictions.png'}: No space left on device", "run itself"
    )
    assert load_checkpoint(run / "last.pth")["epoch"] == 1 and not list(run.glob(".*.tmp"))


def test_torchrun_reads_the_one_line_from_its_error_file(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert run_main(train.main, [*ANN, "--lr", "-1"]) == 2
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message.startswith("error: ") and "lr" in failure.message and "\n" not in failure.message
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    tell_torchrun("error: x")  # outside torchrun: nothing written
    assert not error_file.exists()
