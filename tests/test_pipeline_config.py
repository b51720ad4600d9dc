"""Configuration: flags, YAML defaults, validation, LR schedule, the shipped configs."""

import pytest

import setup
import train
from tests.conftest import REPO, run_script
from utils.config import SCHEMA


def resolve(argv):
    return setup.resolve_config(train.get_args_parser().parse_args(argv))


def test_setup_py_is_not_a_packaging_script():
    proc = run_script("setup.py", check=False)
    assert proc.returncode != 0
    assert "not a packaging script" in proc.stderr and "requirements.txt" in proc.stderr


def test_yaml_values_are_defaults_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: synthetic\nlr: 1e-3\ntimesteps: 7\nbn: false\nimg_size: [24, 32]\nepochs: 3\n")
    cfg = resolve(["--config", str(path), "--timesteps", "5", "--leak-mem", "0.5"])
    assert cfg["lr"] == 1e-3 and isinstance(cfg["lr"], float)  # YAML reads 1e-3 as a string: coerced
    assert cfg["timesteps"] == 5 and cfg["leak_mem"] == 0.5 and cfg["bn"] is False
    assert cfg["img_size"] == [24, 32] and cfg["epochs"] == 3
    # derived from the dataset, not from the model defaults (21 classes)
    assert (cfg["num_classes"], cfg["in_channels"]) == (4, 3)
    assert cfg["name"] == "snn-dl-vgg9-synthetic-T5"


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--bn"], True),
        (["--bn", "false"], False),
        (["--bn", "0"], False),
        (["--bn", "1"], True),
        (["--full-prop", "true"], True),
    ],
)
def test_boolean_flag_spellings(flags, expected):
    args = train.get_args_parser().parse_args(["--dataset", "synthetic", *flags])
    key = "full_prop" if "--full-prop" in flags else "bn"
    assert getattr(args, key) is expected


def test_paper_flag_names_are_accepted():
    cfg = resolve(
        [
            "--model_type",
            "ann",
            "--arch",
            "fcn-vgg9",
            "--dataset",
            "synthetic",
            "--batch_size",
            "4",
            "--img_size",
            "32",
            "--augment",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--optimizer",
            "adam",
            "--timesteps",
            "3",
            "--leak_mem",
            "0.9",
            "--def_threshold",
            "0.5",
            "--bn",
            "false",
            "--leaky",
            "--alpha",
            "0.2",
            "--seed",
            "4",
            "--num_workers",
            "0",
            "--model_dir",
            "x",
            "--test_display",
            "2",
            "--see_model",
            "--surrogate",
            "fast_sigmoid",
            "--encoder",
            "direct",
        ]
    )
    assert cfg["model_type"] == "ann" and cfg["arch"] == "fcn-vgg9" and cfg["img_size"] == [32, 32]
    assert cfg["augment"] and cfg["leaky"] and cfg["see_model"] and cfg["test_display"] == 2
    assert (cfg["def_threshold"], cfg["alpha"], cfg["surrogate"], cfg["encoder"]) == (
        0.5,
        0.2,
        "fast_sigmoid",
        "direct",
    )


def test_unknown_and_malformed_yaml(tmp_path):
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("dataset: synthetic\nleak_mme: 0.9\n")
    with pytest.raises(
        ValueError, match=r"typo.yaml: unknown config key\(s\): 'leak_mme' \(did you mean 'leak_mem'\?\)"
    ):
        resolve(["--config", str(bad_key)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: [synthetic\nlr: 0.1\n")
    with pytest.raises(ValueError, match="broken.yaml: malformed YAML"):
        resolve(["--config", str(broken)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--dataset", "synthetic", "--arch", "resnet50"], "unknown arch 'resnet50'"),
        (["--dataset", "synthetic", "--encoder", "sequence"], "needs --thl"),
    ],
)
def test_bad_values_name_the_value(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve(flags)


def test_step_and_poly_schedules():
    cfg = {"epochs": 10, "scheduler": "step"}
    assert [round(setup.lr_factor(e, cfg), 12) for e in range(10)] == [1] * 5 + [0.1] * 3 + [0.01] * 2
    assert [setup.lr_factor(e, {"epochs": 1, "scheduler": "step"}) for e in range(1)] == [1]  # never decays at 0
    poly = {"epochs": 4, "scheduler": "poly"}
    assert [setup.lr_factor(e, poly) for e in range(4)] == pytest.approx([(1 - e / 4) ** 0.9 for e in range(4)])


def test_optimizers_follow_the_paper():
    import models

    model = models.build_model({"model_type": "ann", "num_classes": 4, "img_size": [16, 16]})
    sgd = setup.build_optimizer({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, model)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adam = setup.build_optimizer({"optimizer": "adam", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, model)
    assert adam.defaults["amsgrad"] is True and adam.defaults["weight_decay"] == 5e-4
    assert setup.build_loss().ignore_index == 255


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    cfg = resolve(["--config", str(path)])
    if path.name.startswith(("sltnet-", "spike-brgnet-")):  # the published recipes (docs/models.md)
        assert cfg["arch"] == path.name.split("-d")[0] and cfg["neuron"] == "lifact" and cfg["loss"] == "ohem"
        assert (cfg["optimizer"], cfg["amsgrad"], cfg["weight_decay"], cfg["scheduler"]) == (
            "adam",
            False,
            1e-4,
            "steplr",
        )
        assert cfg["thl"] == (cfg["arch"] == "spike-brgnet") and cfg["aux_weight"] == 0.4
    elif not path.name.startswith("quickstart"):  # paper experiments keep the paper's defaults
        assert (cfg["batch_size"], cfg["epochs"], cfg["lr"], cfg["optimizer"]) == (16, 60, 1e-3, "sgd")
        if cfg["model_type"] == "snn" and cfg["dataset"] in ("dsec-semantic", "ddd17-events"):
            # the raw-event benchmarks' protocol: one voxel bin per timestep (Spike-BRGNet: 5)
            assert (cfg["timesteps"], cfg["bins"], cfg["thl"], cfg["leak_mem"]) == (5, 5, True, 0.99)
        elif cfg["model_type"] == "snn":
            assert (cfg["timesteps"], cfg["leak_mem"], cfg["def_threshold"]) == (20, 0.99, 1.0)
    else:
        assert cfg["dataset"].startswith("synthetic")


def test_environment_yml_lists_the_requirements_pins():
    import yaml

    requirements = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert pip_section == requirements


def test_quickstart_is_the_base_without_config_dataset_or_resume():
    snn = resolve(["--epochs", "1", "--timesteps", "2"])
    quick = resolve(["--config", str(setup.QUICKSTART_CONFIG)])
    assert snn == {**quick, "epochs": 1, "timesteps": 2}
    ann = resolve(["--model_type", "ann"])  # the ANN twin has its own quickstart config
    assert ann == resolve(["--config", str(REPO / "configs" / "quickstart-ann.yaml")])
    assert ann["name"] == "quickstart-ann"
    paper = resolve(["--dataset", "synthetic"])  # --dataset: a paper experiment from the paper's defaults
    assert (paper["optimizer"], paper["epochs"], paper["batch_size"]) == ("sgd", 60, 16)
    args = train.get_args_parser().parse_args(["--epochs", "1"])
    assert setup.describe_config(args).startswith("config: configs/quickstart.yaml (the quickstart")
    assert setup.describe_config(args, "run/last.pth") == "config: run/last.pth (resumed); flags override epochs"


def test_schema_declares_every_key_once():
    import data
    import models
    from utils import config

    assert models.MODEL_DEFAULTS == config.defaults("model") and models.MODEL_DEFAULTS["neuron_backend"] == "auto"
    backend = config.SCHEMA["neuron_backend"]
    assert backend.execution and backend.allowed() == ("auto", "generic", "torch", "triton")
    neuron, reset = config.SCHEMA["neuron"], config.SCHEMA["reset"]
    assert not neuron.execution and {"lif", "if", "plif"} <= set(neuron.allowed()) and neuron.default == "lif"
    assert not reset.execution and reset.allowed() == ("subtract", "zero") and reset.default == "subtract"
    assert not hasattr(data, "DATA_DEFAULTS")
    flags = {a.dest for a in train.get_args_parser()._actions}
    assert {k for k, key in config.SCHEMA.items() if not key.derived} <= flags
    for key in config.SCHEMA.values():
        assert key.section in ("model", "data", "train") and key.help
        if not key.optional:  # every default passes its own checks
            config.check_value(key.name, config.coerce(key.name, key.default))


def test_one_size_parser_and_one_ignore_index():
    from data.transforms import IGNORE_INDEX, parse_size
    from utils.config import parse_size as config_parse_size

    assert parse_size is config_parse_size
    assert [parse_size(v) for v in (None, -1, [-1], 8, [8], (6, 9), "12")] == [
        None,
        None,
        None,
        [8, 8],
        [8, 8],
        [6, 9],
        [12, 12],
    ]
    for bad in (0, -2, [0, 4], [1, 2, 3], "big", []):
        with pytest.raises(ValueError, match="img_size must be one positive int"):
            parse_size(bad)
    assert setup.build_loss().ignore_index == IGNORE_INDEX and data_info_ignore() == IGNORE_INDEX


def data_info_ignore():
    import data

    return data.dataset_info("voc2012")["ignore_index"]


def test_build_model_refuses_keys_of_no_section():
    import models

    with pytest.raises(ValueError, match=r"unknown config key\(s\): 'leak_mme' \(did you mean 'leak_mem'\?\)"):
        models.build_model({"leak_mme": 0.5})
    with pytest.raises(ValueError, match="unknown neuron_backend 'cuda'; choices: auto, generic, torch, triton"):
        models.build_model({"neuron_backend": "cuda"})
    # keys of the run's other sections pass where the caller names them (a run's whole flat config)
    run = {"model_type": "ann", "num_classes": 4, "dataset": "synthetic", "lr": 0.1}
    with pytest.raises(ValueError, match=r"unknown config key\(s\): 'dataset', 'lr'"):
        models.resolve_model_config(run)
    cfg = models.resolve_model_config(run, SCHEMA)
    assert cfg["lr"] == 0.1 and cfg["neuron_backend"] == "auto"
