"""Everything that lists neurons asks the registry: train.py's --neuron choices, bench.py's, conversion's
neurons (the classes that declare ``converts``) and test.py --conversion --neuron; converter.py inspect shows a
checkpoint's neuron model and each layer's reset, leak and threshold."""

import pytest
import torch

import converter
import train
from benchmarks import bench
from common.cli import run_main
from models import NEURONS, build_model
from models.conversion import snn_config
from models.neurons import LIF, conversion_neurons, register_neuron


@pytest.fixture
def own_neuron():
    """A researcher's neuron, registered for the test's duration: an IF whose conversion is allowed."""
    saved = dict(NEURONS)

    @register_neuron
    class Halfway(LIF):
        """u = u / 2 + I (a LIF with leak 0.5 whatever leak_mem says)."""

        kind = "halfway"
        converts = True
        ignores = {"leak_mem": "its leak is 0.5"}

        def charge(self, state, current):
            return (0.5 * state[0] + current,)

    try:
        yield Halfway
    finally:
        NEURONS.clear()
        NEURONS.update(saved)


def choices_of(parser, dest):
    action = next(a for a in parser._actions if a.dest == dest)
    return set(action.choices) if action.choices else set(action.metavar.strip("{}").split(","))


def test_the_flags_choices_come_from_the_registry(own_neuron):
    assert choices_of(train.get_args_parser(), "neuron") == set(NEURONS) >= {"clif", "glif", "ilif", "halfway"}
    assert choices_of(bench.get_args_parser(), "neuron") == set(NEURONS)
    assert conversion_neurons() == ["halfway", "if", "lif"]  # the classes that declare converts
    import test as test_script

    assert choices_of(test_script.get_args_parser(plugins=test_script.STEPS), "conversion_neuron") == {
        "halfway",
        "if",
        "lif",
    }
    assert snn_config({"arch": "dl-vgg9"}, 4, neuron="halfway")["neuron"] == "halfway"


def test_conversion_refuses_a_neuron_that_does_not_declare_it():
    with pytest.raises(ValueError, match=r"conversion builds neurons \['if', 'lif'\], got neuron 'clif'"):
        snn_config({"arch": "dl-vgg9"}, 4, neuron="clif")


def test_inspect_shows_the_neuron_model_reset_leak_and_thresholds(tmp_path, capsys):
    from utils.checkpoint import FORMAT, save_checkpoint
    from utils.config import SCHEMA

    cfg = dict(arch="dl-vgg9", timesteps=2, num_classes=3, in_channels=3, img_size=16, dataset="synthetic")
    for neuron, words in (
        ("ilif", ["neurons     ilif, detach_reset false, 8 layers", "leak 0.25 (tau 1.33333), levels 0..3"]),
        (
            "lif",
            ["neurons     lif, detach_reset true, 8 layers", "reset zero; leak 0.9; threshold (64, 1, 1) in [0.5, 2]"],
        ),
    ):
        extra = dict(spike_levels=3, leak_mem=0.25, detach_reset=False) if neuron == "ilif" else dict(reset="zero")
        model = build_model({**cfg, "neuron": neuron, "leak_mem": 0.9, **extra}, SCHEMA)
        if neuron == "lif":  # a converted SNN's channel-wise thresholds
            first = model.neuron_layers()[0]
            channels = model.conv_units()[0].conv.out_channels
            first.set_threshold(torch.linspace(0.5, 2.0, channels).view(channels, 1, 1))
        path = tmp_path / f"{neuron}.pth"
        save_checkpoint(path, {"format": FORMAT, "config": model.config, "state_dict": model.state_dict()})
        assert run_main(converter.main, ["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        for text in words:
            assert text in out, out


def test_bench_refuses_compile_on_the_generic_path_in_one_line(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--neuron", "plif", "--compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--compile: compile applies to the torch neuron backend's steps" in err[-1] and "'plif'" in err[-1]
    build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, neuron="plif", compile=True))  # a stored model loads
