"""Architectures through the scripts: one line naming the layer (or key) and the tool for whatever a tool cannot
handle, before any data is read; pretrained weights that fit only partly say so; the residual architectures
train end to end (SNN and ANN twin) and their layer graphs are what the files say."""

import pytest
import torch

import converter
import setup
import train
from models import ARCHITECTURES, build_model
from models.architectures import min_input_size, register_architecture
from models.graph import layer_graph
from models.network import SegmentationNet
from tests.conftest import TINY_ARGS, load_test_script, one_line_error
from utils.checkpoint import FORMAT, save_checkpoint
from utils.config import all_defaults

test_script = load_test_script()


def save(model, path):
    """A checkpoint as train.py writes one: the run's whole config (the defaults where the model has none)."""
    config = {**all_defaults(), **model.config}
    save_checkpoint(path, {"format": FORMAT, "config": config, "state_dict": model.state_dict()})
    return path


@pytest.fixture
def registry():
    """Architectures registered by a test are gone after it."""
    saved = dict(ARCHITECTURES)
    try:
        yield register_architecture
    finally:
        ARCHITECTURES.clear()
        ARCHITECTURES.update(saved)


def plain_sum_architecture(register):
    @register("dl-plain-sum")
    class PlainSum(SegmentationNet):
        """A residual connection written with a plain '+': the layer graph cannot follow it."""

        def build(self, cfg, parts):
            self.stem = parts.conv_unit(int(cfg["in_channels"]), 8, 3)
            self.block = parts.conv_unit(8, 8, 3)
            self.classifier = parts.conv_unit(8, 8, 3)
            self.head = parts.readout(8, int(cfg["num_classes"]))

        def forward_steps(self, h):
            x = self.stem(h)
            return self.classifier(x + self.block(x))

    return PlainSum


@pytest.mark.parametrize("flag", ["--energy", "--conversion"])
def test_test_py_refuses_a_layer_the_tool_cannot_follow_before_reading_data(registry, tmp_path, capsys, flag):
    plain_sum_architecture(registry)
    model_type = "ann" if flag == "--conversion" else "snn"
    model = build_model(dict(arch="dl-plain-sum", model_type=model_type, num_classes=21, img_size=[16, 16]))
    path = save(model, tmp_path / "m.pth")
    empty = tmp_path / "voc"  # a data root with no dataset in it: the refusal must come before it is read
    empty.mkdir()
    argv = ["--model_path", str(path), flag, "--dataset", "voc2012", "--data_root", str(empty)]
    one_line_error(capsys, test_script.main, argv, "layer classifier", "outside the parts", flag)


def test_export_nir_refuses_max_pooling_naming_the_layer_and_writes_nothing(tmp_path, capsys):
    cfg = dict(arch="dl-sew-resnet18", num_classes=4, img_size=[32, 32], bntt=False, reset="zero", encoder="direct")
    path = save(build_model(cfg), tmp_path / "sew.pth")
    out = tmp_path / "sew.nir"
    line = one_line_error(capsys, converter.main, ["export-nir", str(path), "-o", str(out)], "layer maxpool")
    assert "max pooling has no NIR node" in line and "not exportable even with --lossy" in line
    assert not out.exists()


def test_pretrained_weights_for_an_architecture_that_takes_none(tmp_path, capsys):
    weights = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    argv = [*TINY_ARGS, "--arch", "dl-sew-resnet18", "--pretrained", str(weights), "--model_dir", str(tmp_path)]
    one_line_error(capsys, train.main, argv, "pretrained", "'dl-sew-resnet18' cannot start from pretrained weights")
    assert list(tmp_path.iterdir()) == [weights]  # no run folder


def test_pretrained_vgg_weights_that_fit_partly_say_which_layers_were_kept(tmp_path, capsys):
    """torchvision's VGG16 convolutions into dl-vgg11: its first conv (64), pool, 128 fit VGG16's first two
    only where the shapes agree: VGG16's second conv is 64 -> 64, dl-vgg11's second 64 -> 128."""
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512)]
    weights = tmp_path / "vgg16.pth"
    torch.save({f"features.{2 * i}.weight": torch.ones(o, c, 3, 3) for i, (c, o) in enumerate(widths)}, weights)
    setup.build_model(dict(arch="dl-vgg11", num_classes=4, timesteps=2, pretrained=str(weights)))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrained"))
    # dl-vgg11: 64 | pool | 128 | pool | 256, 256 | pool | 512, 512 | ...: body 0, 2, 4, 5, 7, 8, 10, 11
    assert line == (
        f"pretrained {weights}: copied 1 layers (body.0); kept at their initialisation (shapes differ): "
        "body.2, body.4, body.5, body.7, body.8, body.10, body.11"
    )


def test_a_checkpoint_of_one_architecture_loaded_as_another(tmp_path, capsys):
    """A dl-vgg9 state dict under a config that says dl-sew-resnet18 (an edited or mixed-up file)."""
    model = build_model(dict(arch="dl-vgg9", num_classes=4, img_size=[16, 16]))
    path = tmp_path / "mixed.pth"
    config = {**model.config, "arch": "dl-sew-resnet18", "dataset": "synthetic"}
    save_checkpoint(path, {"format": FORMAT, "config": config, "state_dict": model.state_dict()})
    argv = ["--model_path", str(path), "--dataset", "synthetic"]
    one_line_error(capsys, test_script.main, argv, str(path), "another architecture", "stem.conv.weight")


@pytest.mark.parametrize("arch, model_type", [("dl-sew-resnet18", "snn"), ("fcn-sew-resnet18", "ann")])
def test_residual_networks_train_one_epoch_through_train_py(tmp_path, arch, model_type):
    from common.cli import run_main

    size = str(min_input_size(arch))
    argv = [*TINY_ARGS, "--arch", arch, "--model_type", model_type, "--img_size", size, "--epochs", "1"]
    assert run_main(train.main, [*argv, "--model_dir", str(tmp_path), "--name", "r"]) == 0
    assert (tmp_path / "r" / "best.pth").exists()


def test_sew_resnet_graph_has_the_adds_and_dilations_the_file_describes():
    model = build_model(dict(arch="dl-sew-resnet18", num_classes=3, timesteps=2))
    graph = layer_graph(model, (32, 32))
    adds = [node for node in graph.nodes if node.name.endswith(".add")]
    assert len(adds) == 8
    # the first block of a stage adds its (downsampled) input; the second, the first block's sum: levels grow
    levels = {node.name: node.activity.levels for node in adds}
    assert levels["layer1.0.add"] == 2 and levels["layer1.1.add"] == 3 and levels["layer2.0.add"] == 2
    convs = {name: m for name, m in model.named_modules() if name.endswith("conv.conv") or name.endswith(".conv")}
    assert convs["layer3.0.conv1.conv"].dilation == (1, 1) and convs["layer3.1.conv1.conv"].dilation == (2, 2)
    assert convs["layer4.0.conv2.conv"].dilation == (2, 2) and convs["layer4.1.conv2.conv"].dilation == (4, 4)
    assert all(convs[f"layer{s}.0.conv1.conv"].stride == (1, 1) for s in (3, 4))
    assert graph.node("head").input_shapes[0][-2:] == (4, 4)  # output stride 8
