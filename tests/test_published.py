"""SLTNet and Spike-BRGNet (models/architectures/) equal their authors' code, and their checkpoints import.

The reference figures (tests/reference/published/*.json) were produced by running the authors' models, at the
commits their meta records, in float64 on weights and inputs rebuilt here from seeds (tests/published_seeds.py)
in the authors' state-dict order. The tests load those weights through the importer's mapping
(utils/published_import.py) and compare every head in eval mode, and after one training step the outputs, the
loss, every parameter's gradient (relative to its scale) and every batch norm's running statistics.
"""

import collections
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import converter
import setup
import train
from models import build_model, build_neuron
from tests.conftest import load_test_script, one_line_error
from tests.event_fixtures import write_ddd17_recording
from tests.published_seeds import seeded_input, seeded_labels, seeded_mask, seeded_state
from utils.checkpoint import FORMAT, checkpoint_kind, load_checkpoint, load_model, save_checkpoint
from utils.published_import import SOURCES, map_state, read_published

REF = Path(__file__).resolve().parent / "reference" / "published"
SLT = json.loads((REF / "sltnet.json").read_text())
BRG = json.loads((REF / "spike_brgnet.json").read_text())
RTOL = 1e-9  # float64 rounding across kernels; a spike flipped by rounding would differ grossly
GAIN = 3.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these float64 networks are small, and a shared machine's second core only slows them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec_for(ref, classes=None):
    if classes is None or classes == ref["meta"]["num_classes"]:
        return ref["spec"]
    change = ref["dsec"]["spec_change"]
    return [[k, change.get(k, shape)] for k, shape in ref["spec"]]


def parameters_in(spec):
    return sum(int(np.prod(shape)) for k, shape in spec if not k.endswith(("running_mean", "running_var", "tracked")))


def published(arch, classes, heads_resized=True):
    model = build_model({"arch": arch, "num_classes": classes, "in_channels": 5 if arch == "sltnet" else 1})
    if not heads_resized:
        model.resize = lambda logits, size: logits  # compare the 1/8-resolution heads, as their model returns them
    return model.double()


def load_seeded(model, ref, classes=None, drop=(), **options):
    """The seeded authors' state dict, through the importer's mapping; returns (dropped keys, kept keys)."""
    state = seeded_state(spec_for(ref, classes), 0, GAIN)
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    mapped, dropped, kept = map_state(state, model, "seeded", SOURCES[model.arch], **options)
    model.load_state_dict(mapped)
    return dropped, kept


def close(ours, theirs, where, scale=None):
    ours, theirs = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    bound = RTOL * (theirs.abs() if scale is None else torch.full_like(theirs, max(1.0, scale))) + 1e-12
    worst = float(((ours - theirs).abs() - bound).max())
    assert worst <= 0, f"{where}: {ours.tolist()} vs {theirs.tolist()}"


def assert_heads(outputs, reference, names, digests=("sum", "abs_sum", "sumsq"), slices=True):
    for ours, theirs in names.items():
        out, ref = outputs[ours].detach(), reference[theirs]
        assert list(out.shape) == ref.get("shape", list(out.shape)), ours
        close([float(out.sum()), float(out.abs().sum()), float(out.square().sum())], [ref[d] for d in digests], ours)
        if slices:
            close(out[0, :, 3, :5].tolist(), ref["slice_a"], f"{ours}[0, :, 3, :5]")
            close(out[1, -1, -2:, -3:].tolist(), ref["slice_b"], f"{ours}[1, -1, -2:, -3:]")
        assert float(out.abs().sum()) > 0


def assert_training_step(model, x, ref, names, loss_fn):
    model.train()
    outputs = model(x, heads=True)
    assert_heads(outputs, ref["train"]["outputs"], names, slices=False)
    loss = loss_fn(outputs)
    close([float(loss.detach())], [ref["train"]["loss"]], "loss")
    loss.backward()
    grads = ref["train"]["grads"]
    checked = 0
    for name, p in model.named_parameters():
        expected = grads[name]
        if expected is None:  # theirs gets no gradient (an equality test in the way): nor does ours
            assert p.grad is None or not p.grad.any(), name
            continue
        g = p.grad.detach().flatten()
        close([float(g.sum()), float(g.abs().sum()), float(g[0])], expected, f"grad {name}", scale=expected[1])
        checked += 1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            mean, var, count = ref["train"]["bn"][name]
            close([float(module.running_mean.sum()), float(module.running_var.sum())], [mean, var], f"BN {name}")
            assert int(module.num_batches_tracked) == count, name
    return checked


# ------------------------------------------------------------------------------------------------ the neuron
@pytest.mark.parametrize("threshold", [0.5, 0.3])
@pytest.mark.parametrize("steps, final_state_used", [(5, True), (5, False), (1, True), (1, False)])
def test_lifact_layer_equals_its_step_by_step_form(threshold, steps, final_state_used):
    """The fused layer (one autograd function, the membrane replayed in backward) against the base class's loop
    with the reset's spike attached: spikes, final membrane and the gradients of the currents and of a carried
    membrane, with values at the surrogate's edges (u = 0, u = theta); a final membrane that nothing reads gets
    no gradient, and one step is the layer's shortest backward."""
    neuron = build_neuron("lifact", leak=0.25, threshold=threshold, surrogate="clamped_tanh", reset="zero").double()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 2, 3, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.3)[:steps]
    x[0, 0, 0, 0, :2] = torch.tensor([threshold, 0.0])
    u0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    weights, weights_u = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(u0.shape, generator=g)
    results = []
    for run in (neuron.run_generic, neuron.run_steps):
        currents, carried = x.clone().requires_grad_(), u0.clone().requires_grad_()
        spikes, (u,) = run(currents, (carried,))
        loss = (spikes * weights[:steps]).sum()
        (loss + (u * weights_u).sum() if final_state_used else loss).backward()
        results.append([spikes.detach(), u.detach(), currents.grad, carried.grad])
    assert results[0][0].sum() > 20 and torch.equal(results[0][0], results[1][0])
    assert results[0][3] is not None and results[0][3].abs().sum() > 0  # the carried membrane's gradient
    for fused, stepped in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(fused, stepped, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------- the networks
def test_parameter_counts_are_the_authors():
    # SLTNet as its test.py builds it: 413,508 (DDD17) / 413,588 (DSEC); 44,576 in never-called modules
    assert parameters_in(spec_for(SLT)) == 413_508 and parameters_in(spec_for(SLT, 11)) == 413_588
    ours = [sum(p.numel() for p in published("sltnet", k).parameters()) for k in (6, 11)]
    assert ours == [413_508 - 44_576, 413_588 - 44_576] == [368_932, 369_012]
    # Spike-BRGNet: training form 7,864,717, evaluation form (without seghead_p, seghead_d) 7,771,174
    brg = published("spike-brgnet", 6)
    heads = sum(p.numel() for n, p in brg.named_parameters() if n.startswith(("seghead_p.", "seghead_d.")))
    total = sum(p.numel() for p in brg.parameters())
    eval_form = [[k, s] for k, s in BRG["spec"] if not k.startswith(("seghead_p.", "seghead_d."))]
    assert parameters_in(BRG["spec"]) == 7_864_717 and parameters_in(eval_form) == 7_771_174
    assert total == 7_864_717 - 147_712 and total - heads == 7_771_174 - 147_712 == 7_623_462  # dfm.conv unused


def test_sltnet_equals_the_authors_code():
    model = published("sltnet", 6)
    dropped, _ = load_seeded(model, SLT)
    unused = {k for k, v in SLT["train"]["grads"].items() if v is None}
    assert len(dropped) == 430 and unused <= set(dropped)  # what is left out is what their forward never calls
    x, y = seeded_input((2, 5, 64, 96), 1), seeded_labels((2, 64, 96), 6, 2)
    with torch.no_grad():
        assert_heads(model.eval().forward_heads(x), SLT["eval"], {"out": "main", "aux": "early"})

    def loss_fn(o):
        return F.cross_entropy(o["out"], y, ignore_index=255) + 0.4 * F.cross_entropy(o["aux"], y, ignore_index=255)

    assert assert_training_step(model, x, SLT, {"out": "main", "aux": "early"}, loss_fn) == len(
        list(model.parameters())
    )


def test_sltnet_for_dsec_equals_the_authors_code():
    model = published("sltnet", 11).eval()
    load_seeded(model, SLT, classes=11)
    with torch.no_grad():
        assert_heads(model.forward_heads(seeded_input((2, 5, 64, 96), 1)), SLT["dsec"]["eval"], {"out": "main"})
    with torch.no_grad():  # model(x) is the main head, without computing the early one
        assert torch.equal(
            model(seeded_input((2, 5, 64, 96), 1)), model.forward_heads(seeded_input((2, 5, 64, 96), 1))["out"]
        )


def test_spike_brgnet_equals_the_authors_code():
    model = published("spike-brgnet", 6, heads_resized=False)
    dropped, kept = load_seeded(model, BRG)
    assert sorted(dropped) == sorted(k for k, _ in BRG["spec"] if k.startswith("dfm.conv.")) and not kept
    x = seeded_input((2, 5, 1, 64, 96), 1).transpose(0, 1)  # their [N, T, C, H, W]; ours time-major
    y, boundary = seeded_labels((2, 8, 12), 6, 2), seeded_mask((2, 8, 12), 5)
    names = {"aux": "aux_p", "out": "main", "boundary": "boundary"}
    with torch.no_grad():
        assert_heads(model.eval().forward_heads(x), BRG["eval"], names)

    def loss_fn(o):
        return (
            F.cross_entropy(o["out"], y, ignore_index=255)
            + 0.4 * F.cross_entropy(o["aux"], y, ignore_index=255)
            + F.binary_cross_entropy_with_logits(o["boundary"][:, 0], boundary)
        )

    # every parameter but PagFM's f_x and f_y (weight, BN weight and bias, twice in two modules)
    assert assert_training_step(model, x, BRG, names, loss_fn) == len(list(model.parameters())) - 12


def test_spike_brgnet_evaluation_form_imports_without_its_training_heads():
    model = published("spike-brgnet", 6, heads_resized=False).eval()
    _, kept = load_seeded(model, BRG, drop=("seghead_p.", "seghead_d."), allow_missing_heads=True)
    assert kept and all(k.startswith(("seghead_p.", "seghead_d.")) for k in kept)
    with torch.no_grad():
        out = model(seeded_input((2, 5, 1, 64, 96), 1).transpose(0, 1))
    assert_heads({"out": out}, BRG["eval_form"]["eval"], {"out": "main"})


# ---------------------------------------------------------------------------------------------- importer
def sltnet_file(path, classes=6, numpy1=False, state=None, **extra):
    """A checkpoint as SLTNet's train.py writes it: numpy metrics; NumPy 1 spells their module numpy.core."""
    state = seeded_state(spec_for(SLT, classes), 0, GAIN) if state is None else state
    checkpoint = {
        "epoch": 95,
        "model": collections.OrderedDict(state),
        "best_miou": np.float64(0.5061561914315343),
        "best_acc": np.float64(0.6465),
        "best_miou_class": [np.float64(0.5)] * classes,
        "lossTr_list": [1.5, 1.2],
        **extra,
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not numpy1)
    if numpy1:
        data = Path(path).read_bytes()
        assert b"numpy._core.multiarray" in data
        Path(path).write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    return path


def test_import_sltnet_checkpoint_records_the_protocol(tmp_path, capsys):
    source = sltnet_file(tmp_path / "model_best_miou.pth")
    out = tmp_path / "sltnet.pth"
    converter.main(["import-published", "sltnet", str(source), "-o", str(out)])
    capsys.readouterr()
    converter.main(["inspect", str(out)])
    shown = capsys.readouterr().out
    assert "neurons     lifact, its reset always keeps the spike's gradient" in shown and "detach_reset" not in shown
    assert "reset zero; leak 0.25; threshold 0.5" in shown
    checkpoint = load_checkpoint(out)
    cfg, record = checkpoint["config"], checkpoint["published"]
    assert checkpoint["format"] == FORMAT and checkpoint_kind(out) == "imported" and checkpoint["epoch"] == 95
    assert [cfg[k] for k in ("arch", "dataset", "num_classes", "in_channels", "timesteps")] == [
        "sltnet",
        "ddd17-events",
        6,
        5,
        1,
    ]
    assert record["protocol"] == {
        "dataset": "ddd17-events",
        "representation": "voxel",
        "bins": 5,
        "separate_polarity": False,
        "window_ms": 50.0,
        "window_events": None,
        "event_norm": "nonzero",
        "ess_exact": True,
        "img_size": [200, 352],
        "thl": False,
    }
    assert record["reported_miou"] == pytest.approx(0.5061561914315343) and record["dropped_unused"] == 430
    assert (cfg["neuron"], cfg["leak_mem"], cfg["def_threshold"], cfg["reset"]) == ("lifact", 0.25, 0.5, "zero")
    seeded = seeded_state(spec_for(SLT), 0, GAIN)
    state = checkpoint["state_dict"]
    assert all(torch.equal(state[k].flatten(), seeded[k].flatten()) for k in state if not k.endswith("threshold"))
    model = load_model(out)
    assert not model.training
    x = seeded_input((2, 5, 16, 24), 1).float()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 6, 16, 24) and logits.dtype == torch.float32
        assert model.double()(x.double()).dtype == torch.float64


def test_import_reads_numpy_1_and_2_names_and_sltnet_for_dsec(tmp_path):
    numpy1 = sltnet_file(tmp_path / "numpy1.pth", numpy1=True)  # written by NumPy 1: numpy.core.multiarray.scalar
    checkpoint = read_published(numpy1, SOURCES["sltnet"])
    assert checkpoint["best_miou"] == pytest.approx(0.5061561914315343) and len(checkpoint["model"]) == 1340
    source = sltnet_file(tmp_path / "dsec.pth", classes=11)
    out = tmp_path / "dsec-ours.pth"
    converter.main(["import-published", "sltnet", str(source), "-o", str(out), "--window_events", "32000"])
    cfg = load_checkpoint(out)["config"]
    assert [cfg[k] for k in ("dataset", "window_events", "img_size", "num_classes")] == [
        "dsec-semantic",
        32000,
        [440, 640],
        11,
    ]


def brgnet_state(drop_heads=False):
    state = seeded_state(BRG["spec"], 0, GAIN)
    heads = ("seghead_p.", "seghead_d.") if drop_heads else ()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith(heads or "\0")}


@pytest.mark.parametrize("form", ["best.pt", "checkpoint.pth.tar of the evaluation form"])
def test_import_spike_brgnet_checkpoints(tmp_path, capsys, form):
    evaluation_form = form != "best.pt"
    state = brgnet_state(drop_heads=evaluation_form)
    wrapped = collections.OrderedDict((f"model.{k}", v) for k, v in state.items())
    if evaluation_form:  # as their train.py writes it each epoch: numpy metrics beside the state dict
        wrapped = {"epoch": 12, "best_mIoU": np.float64(0.5), "best_IoU_array": np.arange(6.0), "state_dict": wrapped}
    torch.save(wrapped, tmp_path / "in.pt")
    converter.main(["import-published", "spike-brgnet", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pth")])
    said = capsys.readouterr().out
    assert "ddd17-events (6 classes), 32,000 events windows, 200x352 input; 6 entries" in said
    assert ("initialised afresh" in said) == evaluation_form
    checkpoint = load_checkpoint(tmp_path / "out.pth")
    assert checkpoint["config"]["thl"] and checkpoint["config"]["encoder"] == "sequence"
    ours = checkpoint["state_dict"]
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith("dfm.conv."))
    assert checkpoint["published"]["reported_miou"] == (0.5 if evaluation_form else None)


def test_import_refuses_what_is_not_the_published_format(tmp_path, capsys):
    main, out = converter.main, str(tmp_path / "out.pth")

    def refused(arch, path, *expected):
        one_line_error(capsys, main, ["import-published", arch, str(path), "-o", out], *expected)

    seeded = seeded_state(spec_for(SLT), 0, GAIN)
    k19 = {k: seeded[k] for k in ("init_conv.0.conv.weight",)} | {"classifier.0.conv.weight": torch.zeros(19, 16, 1, 1)}
    refused("sltnet", sltnet_file(tmp_path / "k19.pth", state=k19), "19 classes", "6 (DDD17) or 11")
    c3 = {"init_conv.0.conv.weight": torch.zeros(32, 3, 3, 3), "classifier.0.conv.weight": torch.zeros(6, 16, 1, 1)}
    refused("sltnet", sltnet_file(tmp_path / "c3.pth", state=c3), "3 input channels", "takes 5")
    torch.save(
        collections.OrderedDict(("model." + k, v) for k, v in seeded.items() if "classifier" in k), tmp_path / "b.pt"
    )
    refused("sltnet", tmp_path / "b.pt", "not a SLTNet checkpoint", "'model'")
    refused("spike-brgnet", sltnet_file(tmp_path / "slt.pth", state=k19), "not a Spike-BRGNet checkpoint", "best.pt")
    save_checkpoint(tmp_path / "ours.pth", {"format": FORMAT, "config": {}, "state_dict": {}})
    refused("sltnet", tmp_path / "ours.pth", "already a snnseg")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    refused("sltnet", tmp_path / "text.pth", "not a PyTorch checkpoint")
    with open(tmp_path / "code.pth", "wb") as fh:
        pickle.dump({"epoch": 1, "model": Path("x")}, fh, protocol=2)
    refused("sltnet", tmp_path / "code.pth", "refused", "pathlib.PosixPath", "nothing in it was executed")


def test_importer_drops_only_never_called_modules():
    model = published("sltnet", 6)
    used = seeded_state(spec_for(SLT), 0, GAIN)
    used["transformer1.attn3.q_conv.1.num_batches_tracked"] = torch.tensor(3)
    with pytest.raises(ValueError, match="attn3.q_conv.1 was updated in training"):
        map_state(used, model, "file", SOURCES["sltnet"])
    foreign = {**seeded_state(spec_for(SLT), 0, GAIN), "head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="head.weight.*another network"):
        map_state(foreign, model, "file", SOURCES["sltnet"])
    missing = {k: v for k, v in seeded_state(spec_for(SLT), 0, GAIN).items() if not k.startswith("FE1.")}
    with pytest.raises(ValueError, match="no 'FE1"):
        map_state(missing, model, "file", SOURCES["sltnet"])


# ------------------------------------------------------------------------------------- layouts and protocol
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--arch", "sltnet", "--dataset", "ddd17-events", "--thl", "true", "--timesteps", "5"], "bins as timesteps"),
        (["--arch", "spike-brgnet", "--dataset", "ddd17-events", "--thl", "false"], "thl true"),
        (["--arch", "sltnet", "--dataset", "ddd17-events", "--img_size", "200", "346"], "multiples of 8"),
        (["--arch", "sltnet", "--dataset", "ddd17-events", "--model_type", "ann"], "spiking only"),
        (["--arch", "dl-vgg9", "--dataset", "synthetic", "--aux_weight", "0.4"], "with an aux head"),
    ],
)
def test_architectures_refuse_layouts_they_cannot_take(flags, expected):
    with pytest.raises(ValueError, match=expected):
        setup.resolve_config(train.get_args_parser().parse_args(flags))


def test_arch_alone_is_the_published_network():
    cfg = setup.resolve_config(
        train.get_args_parser().parse_args(["--arch", "spike-brgnet", "--dataset", "ddd17-events"])
    )
    assert (cfg["neuron"], cfg["leak_mem"], cfg["surrogate"], cfg["thl"], cfg["timesteps"], cfg["encoder"]) == (
        "lifact",
        0.25,
        "clamped_tanh",
        True,
        5,
        "sequence",
    )
    given = setup.resolve_config(
        train.get_args_parser().parse_args(["--arch", "sltnet", "--dataset", "ddd17-events", "--leak_mem", "0.5"])
    )
    assert given["leak_mem"] == 0.5 and given["timesteps"] == 1  # a given key wins over the architecture's


def ddd17_root(root, labels_per_recording=1):
    """A tiny DDD17 in ESS's layout: 7 recordings of random events, 346x200 labels."""
    rng = np.random.default_rng(0)
    for r in range(7):
        n = 4000
        t = np.sort(rng.integers(0, 200_000_000, n))
        x, y, p = rng.integers(0, 346, n), rng.integers(0, 260, n), rng.integers(0, 2, n)
        times = [100_000_000 + 30_000_000 * i for i in range(labels_per_recording)]
        labels = [rng.integers(0, 6, (200, 346)).astype(np.uint8) for _ in times]
        write_ddd17_recording(root / f"dir{r}", x, y, t, p, times, labels, [i + 1 for i in range(len(times))])
    return root


def test_imported_sltnet_evaluates_through_test_py_under_its_protocol_only(tmp_path, capsys):
    out = tmp_path / "sltnet.pth"
    converter.main(["import-published", "sltnet", str(sltnet_file(tmp_path / "in.pth")), "-o", str(out)])
    test_script = load_test_script()
    root = ddd17_root(tmp_path / "ddd17")
    capsys.readouterr()
    test_script.main(["--model_path", str(out), "--data_root", str(root), "--device", "cpu", "--num_workers", "0"])
    said = capsys.readouterr().out
    assert "snn sltnet on ddd17-events val (1 images)" in said and "mIoU" in said
    argv = ["--model_path", str(out), "--data_root", str(root), "--img_size", "96", "176"]
    one_line_error(capsys, test_script.main, argv, "selected with img_size 200 352", "another protocol")


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["sltnet-ddd17", "sltnet-dsec", "spike-brgnet-ddd17", "spike-brgnet-dsec"])
def test_published_config_trains_one_epoch_on_synthetic_events(tmp_path, name):
    argv = ["--config", f"configs/{name}.yaml", "--dataset", "synthetic-events", "--raw_events", "true"]
    argv += ["--seq_len", "3", "--img_size", "16", "24", "--num_train", "1", "--num_val", "1", "--batch_size", "2"]
    argv += ["--epochs", "1", "--num_workers", "0", "--device", "cpu", "--model_dir", str(tmp_path), "--name", "run"]
    train.main(argv)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"]) and "val_miou" in metrics[0]
    cfg = load_checkpoint(tmp_path / "run" / "last.pth")["config"]
    assert cfg["loss"] == "ohem" and cfg["aux_weight"] == 0.4 and cfg["optimizer"] == "adam" and not cfg["amsgrad"]


# -------------------------------------------------------------------------------------------- the benchmark
def test_benchmark_runs_our_side_and_refuses_another_repository(tmp_path):
    from argparse import Namespace

    from benchmarks import published as bench

    with pytest.raises(SystemExit, match="is not the sltnet repository"):
        bench.main(["--repo", str(tmp_path), "--model", "sltnet"])
    for model in ("sltnet", "spike-brgnet"):
        args = Namespace(model=model, dataset="ddd17", img_size=[16, 24])
        bench.ours(args, 2, training=True)()  # the published config's model, loss and optimiser: one step
        bench.ours(args, 2, training=False)()
