"""converter.py: exact import of the paper repository's checkpoints, the other subcommands, and errors."""

import pytest
import torch

import converter
from common.cli import run_main
from models.encoders import PoissonEncoder
from tests.conftest import run_script
from tests.paper_reference import paper_ann_forward, paper_snn_forward, random_paper_state
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint, load_model
from utils.paper_import import import_paper_checkpoint

SIZE, STEPS, LEAK, THRESHOLD = (8, 16), 3, 0.95, 0.8


def paper_checkpoint(arch="dl-vgg9", model_type="snn", seed=0):
    """A checkpoint in the paper repository's layout, written from its key pattern (float32 like theirs)."""
    snn = model_type == "snn"
    state = random_paper_state(
        arch, model_type, in_channels=2, num_classes=6, timesteps=STEPS, seed=seed, dtype=torch.float32
    )
    config = dict(
        model_type=model_type,
        architecture=arch,
        kernel_size=3,
        bn=True,
        img_size=SIZE,
        dataset=dict(name="ddd17", num_cls=6, input_dim=2, labels={0: "flat"}, path="./data/ddd17"),
        timesteps=STEPS if snn else None,
        leak_mem=LEAK if snn else None,
        def_threshold=THRESHOLD if snn else None,
        full_prop=False if snn else None,
        leaky=None if snn else False,
        alpha=None,
        ibt=False if snn else None,
        thl=False,
        seed=0,
    )
    return {"config": config, "state_dict": state, "max_miou": 0.42, "epoch": 7}


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
def test_imported_snn_gives_the_paper_logits(arch):
    checkpoint = paper_checkpoint(arch, "snn")
    ours = import_paper_checkpoint(checkpoint, "paper.pth")
    assert ours["config"]["readout"] == ("sum" if arch.startswith("fcn") else "mean")
    assert (ours["epoch"], ours["best_miou"], ours["config"]["num_classes"]) == (7, 0.42, 6)
    model = build_model_from_checkpoint(ours, "imported").double()
    x = torch.randint(-1, 2, (2, 2, *SIZE), generator=torch.Generator().manual_seed(1)).double()
    frames = x.unsqueeze(0).expand(STEPS, *x.shape)  # Poisson coding of values in {-1, 0, 1}: the input itself
    state = {k: v.double() for k, v in checkpoint["state_dict"].items()}
    expected = paper_snn_forward(state, arch, frames, leak=LEAK, threshold=THRESHOLD)
    model.record_spikes(True)
    with torch.no_grad():
        got = model(x)
    assert relative_error(got, expected) < 1e-4
    assert all(layer["spikes"] > 0 for layer in model.spike_stats())  # every layer took part


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
def test_imported_ann_gives_the_paper_logits(arch):
    checkpoint = paper_checkpoint(arch, "ann")
    model = build_model_from_checkpoint(import_paper_checkpoint(checkpoint, "paper.pth"), "imported").double()
    x = torch.randn(2, 2, *SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    state = {k: v.double() for k, v in checkpoint["state_dict"].items()}
    with torch.no_grad():
        assert relative_error(model(x), paper_ann_forward(state, arch, x)) < 1e-4


@pytest.mark.parametrize("draw", [0.0, 1.0 - 2**-24])
def test_poisson_coding_of_values_in_minus_one_zero_one_is_deterministic(monkeypatch, draw):
    """rand <= |x| holds for |x| = 1 whatever rand in [0, 1) gives; for x = 0 a draw of exactly 0 fires, but the
    spike is sign(0) * 1 = 0: so the coded input is x itself at every timestep, even at the edge draws."""
    x = torch.tensor([[[[-1.0, 0.0, 1.0, 0.0]]]])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.full(args[0], draw, dtype=kwargs.get("dtype")))
    spikes = PoissonEncoder()(x, 5)
    assert torch.equal(spikes, x.expand(5, -1, -1, -1))


def cli(capsys, *args):
    code = run_main(converter.main, [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_paper_cli_and_inspect(tmp_path, capsys):
    paper = tmp_path / "paper.pth"
    torch.save({**paper_checkpoint("fcn-vgg9", "snn"), "thresholds": {"layer": {"3": [1.5] * 11}}}, paper)
    code, out, _ = cli(capsys, "inspect", paper)
    assert code == 0 and "paper repository" in out and "model       snn fcn-vgg9" in out
    code, out, _ = cli(capsys, "import-paper", paper, "-o", tmp_path / "ours.pth")
    assert code == 0 and "snn fcn-vgg9" in out
    model = load_model(tmp_path / "ours.pth")
    assert load_checkpoint(tmp_path / "ours.pth")["thresholds"] == {"layer": {"3": [1.5] * 11}}
    reference = build_model_from_checkpoint(import_paper_checkpoint(torch.load(paper), paper), paper)
    x = torch.randint(-1, 2, (1, 2, *SIZE)).float()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # the script itself, as a user runs it
    proc = run_script("converter.py", "inspect", tmp_path / "ours.pth")
    for line in (
        "format      snnseg-1",
        "model       snn fcn-vgg9",
        "dataset     ddd17 (6 classes, 2 input",
        "timesteps   3",
        "epoch       7",
        "best mIoU   0.4200",
        "layer: T=3: 11 layers",
        "body.0.norm.running_mean",
    ):
        assert line in proc.stdout, line


def test_thresholds_subcommand_nests_flat_thresholds(tmp_path, capsys):
    flat = tmp_path / "flat.pth"
    values = [torch.tensor([1.0, 2.0]), 3.0]
    torch.save({**paper_checkpoint("dl-vgg9", "ann"), "thresholds": {"20": values, "40": values}}, flat)
    code, _, err = cli(capsys, "import-paper", flat, "-o", tmp_path / "x.pth")
    assert code == 2 and "flat" in err and "converter.py thresholds" in err
    code, out, _ = cli(capsys, "thresholds", flat, "--type", "channel", "-o", tmp_path / "nested.pth")
    assert code == 0
    nested = torch.load(tmp_path / "nested.pth", weights_only=True)["thresholds"]
    assert list(nested) == ["channel"] and set(nested["channel"]) == {"20", "40"}
    assert torch.equal(nested["channel"]["20"][0], values[0]) and nested["channel"]["40"][1] == 3.0
    code, _, err = cli(capsys, "thresholds", tmp_path / "nested.pth", "--type", "layer", "-o", tmp_path / "y.pth")
    assert code == 2 and "already nested" in err
    torch.save(paper_checkpoint("dl-vgg9", "ann"), tmp_path / "none.pth")
    code, _, err = cli(capsys, "thresholds", tmp_path / "none.pth", "--type", "layer", "-o", tmp_path / "z.pth")
    assert code == 2 and "no 'thresholds'" in err


def test_state_dict_subcommand_keeps_conv_weights_renumbered(tmp_path, capsys):
    checkpoint = paper_checkpoint("dl-vgg9", "ann")
    state = checkpoint["state_dict"]
    state["features.11.weight"] = state.pop("features.6.weight")  # a gap in the numbering
    torch.save(checkpoint, tmp_path / "paper.pth")
    code, _, _ = cli(capsys, "state-dict", tmp_path / "paper.pth", "-o", tmp_path / "convs.pth")
    assert code == 0
    result = torch.load(tmp_path / "convs.pth", weights_only=True)
    assert list(result["state_dict"]) == [f"features.{i}.weight" for i in range(7)] + [
        "classifier.0.weight",
        "classifier.1.weight",
    ]
    assert torch.equal(result["state_dict"]["features.6.weight"], state["features.11.weight"])
    assert result["config"] == checkpoint["config"] and result["max_miou"] == 0.42
    # without BN tensors the import runs the weights without BN, as the paper's conversion did
    code, out, _ = cli(capsys, "import-paper", tmp_path / "convs.pth", "-o", tmp_path / "ours.pth")
    assert code == 0 and load_checkpoint(tmp_path / "ours.pth")["config"]["bn"] is False
    code, _, err = cli(capsys, "state-dict", tmp_path / "ours.pth", "-o", tmp_path / "again.pth")
    assert code == 2 and "snnseg checkpoint" in err


class Payload:
    """Anything that is not a tensor or a plain container: weights_only loading must refuse it."""

    loaded = False

    def __setstate__(self, state):
        Payload.loaded = True


@pytest.mark.parametrize(
    "command",
    [
        ["inspect"],
        ["import-paper", "-o", "out.pth"],
        ["thresholds", "--type", "layer", "-o", "out.pth"],
        ["state-dict", "-o", "out.pth"],
    ],
)
def test_every_subcommand_refuses_checkpoints_with_code(tmp_path, capsys, command):
    path = tmp_path / "evil.pth"
    torch.save({**paper_checkpoint("dl-vgg9", "ann"), "extra": Payload()}, path)
    args = [command[0], path] + [str(tmp_path / a) if a.endswith(".pth") else a for a in command[1:]]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "refused to load" in err and str(path) in err
    assert not Payload.loaded and not (tmp_path / "out.pth").exists()


def _malformed(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("text.pth", b"not a checkpoint at all", "is not a PyTorch checkpoint"),
        ("tensor.pth", torch.zeros(3), "found a Tensor"),
        ("nostate.pth", {"config": {"architecture": "dl-vgg9"}, "max_miou": 0.1}, "no 'state_dict'"),
        (
            "badstate.pth",
            {"config": paper_checkpoint()["config"], "state_dict": {"features.0.weight": 3}},
            "'features.0.weight' is a int, not a tensor",
        ),
        (
            "arch.pth",
            {**paper_checkpoint(), "config": {**paper_checkpoint()["config"], "architecture": "resnet"}},
            "unknown architecture 'resnet'",
        ),
    ],
)
def test_import_names_what_is_wrong(tmp_path, capsys, name, content, message):
    path = _malformed(tmp_path, name, content)
    code, _, err = cli(capsys, "import-paper", path, "-o", tmp_path / "out.pth")
    assert code == 2 and message in err and str(path) in err and "\n" not in err.strip()


def test_import_names_a_wrong_shape_and_extra_keys(tmp_path, capsys):
    checkpoint = paper_checkpoint("dl-vgg9", "ann")
    checkpoint["state_dict"]["features.3.weight"] = torch.zeros(128, 64, 1, 1)
    code, _, err = cli(capsys, "import-paper", _malformed(tmp_path, "shape.pth", checkpoint), "-o", tmp_path / "o.pth")
    assert code == 2 and "'features.3.weight' has shape (128, 64, 1, 1), expected (128, 128, 3, 3)" in err
    checkpoint = paper_checkpoint("dl-vgg9", "ann")
    checkpoint["state_dict"]["features.7.weight"] = torch.zeros(1)
    code, _, err = cli(capsys, "import-paper", _malformed(tmp_path, "extra.pth", checkpoint), "-o", tmp_path / "o.pth")
    assert code == 2 and "do not belong to dl-vgg9" in err and "features.7.weight" in err
    code, _, err = cli(capsys, "inspect", tmp_path / "missing.pth")
    assert code == 2 and "not found" in err
