"""Configuration: the paper's command-line flags, YAML files as defaults, one flat resolved dict.

Precedence (later wins): built-in defaults (models.MODEL_DEFAULTS + DATA_DEFAULTS + TRAIN_DEFAULTS)
< the checkpoint's config when resuming < --config FILE.yaml < command-line flags.
Every config key is a flag, spelled with underscores (`--leak_mem`, as in the paper's code) or
dashes (`--leak-mem`). Booleans accept `--bn`, `--bn true`, `--bn false`, `--bn 0`.
"""
import argparse
import difflib
import json
from pathlib import Path

import yaml

from utils.allocator import POLICIES

DATA_DEFAULTS = {
    "dataset": "voc2012",
    "data_root": None,
    "augment": False,
    "thl": False,
    "channels": [0, 1],
    "train_split": "train",
    "num_train": None,
    "num_val": None,
}

TRAIN_DEFAULTS = {
    "batch_size": 16,
    "epochs": 60,
    "lr": 1e-3,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "scheduler": "step",
    "seed": 0,
    "num_workers": 2,
    "model_dir": "trained_models",
    "name": None,
    "device": "auto",
    "test_display": 1,
    "see_model": False,
    "wandb": False,
    "amp": False,
    "cpu_malloc": "auto",
}

CHOICES = {
    "model_type": ("snn", "ann"),
    "optimizer": ("sgd", "adam"),
    "scheduler": ("step", "poly"),
    "cpu_malloc": POLICIES,
}

# Keys whose type cannot be read from a None default, or that need a special parser.
KEY_TYPES = {
    "data_root": str, "name": str, "num_train": int, "num_val": int, "pretrained": str,
    "img_size": "size", "channels": "intlist", "surrogate_params": "mapping",
}

# Filled from the dataset, never set by hand.
DERIVED_KEYS = ("in_channels", "num_classes")

HELP = {
    "model_type": "snn or ann", "arch": "architecture (dl-vgg9, dl-vgg11, dl-vgg16, fcn-vgg9, fcn-vgg16)",
    "dataset": "voc2012, ddd17, synthetic, synthetic-events", "data_root": "dataset folder",
    "img_size": "input size: one int (square), H W, or -1 for native", "thl": "target history learning (event sequences)",
    "timesteps": "number of SNN timesteps T", "leak_mem": "membrane leak", "def_threshold": "firing threshold",
    "test_display": "evaluate on the validation split every N epochs", "see_model": "print the model",
    "name": "run name: files go to <model_dir>/<name>/", "device": "auto, cpu, cuda, cuda:1, ...",
    "scheduler": "step (x0.1 at 50%% and 80%% of the epochs) or poly", "wandb": "log to Weights & Biases",
    "amp": "bfloat16 autocast for the convolutions (CPU and GPU); membranes stay float32",
    "memory_saving": "replay blocks of memory_block timesteps in backward, recomputing each spiking conv",
    "compile": "fuse the neurons' elementwise steps with torch.compile",
    "cpu_malloc": "C heap policy on CPU: auto (release with memory_saving, else balanced), balanced, default "
                  "(glibc's), keep (fastest, most memory) or release (least memory, slowest)",
}


def str2bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {text!r}")


def parse_mapping(text):
    if isinstance(text, dict):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{gamma: 0.3}}', got {text!r}")
    return value


def normalize_size(value):
    """img_size: an int, [s], [h, w], -1 or None -> [h, w] or -1 (native size)."""
    if value is None:
        return -1
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) == 2:
            return [int(value[0]), int(value[1])]
        else:
            raise ValueError(f"img_size must be one or two ints, got {list(value)}")
    value = int(value)
    return -1 if value <= 0 else [value, value]


def all_defaults() -> dict:
    from models import MODEL_DEFAULTS
    import data
    # The data package may declare extra keys of its own; ours (the paper defaults) win where both exist.
    defaults = {**getattr(data, "DATA_DEFAULTS", {}), **MODEL_DEFAULTS, **DATA_DEFAULTS, **TRAIN_DEFAULTS}
    return {k: v for k, v in defaults.items() if k not in DERIVED_KEYS}


def _key_kind(key, default):
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    if isinstance(default, bool):
        return bool
    for kind in (int, float, str):
        if isinstance(default, kind):
            return kind
    if isinstance(default, (list, tuple)):
        return "intlist"
    if isinstance(default, dict):
        return "mapping"
    return str


def coerce(key, value, default):
    """Convert a YAML/checkpoint value to the key's type (YAML reads 1e-3 as a string, for instance)."""
    kind = _key_kind(key, default)
    if value is None:
        return None
    if kind == "size":
        return normalize_size(value)
    if kind == "intlist":
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if kind == "mapping":
        return parse_mapping(value)
    if kind is bool:
        return str2bool(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value}")
    return kind(value)


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict):
    """One flag per config key; argparse default None so that we know which flags were given."""
    group = parser.add_argument_group("configuration (also settable in --config YAML)")
    for key, default in defaults.items():
        names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        kind = _key_kind(key, default)
        help_text = f"{HELP.get(key, key)} (default: {default})"
        if kind is bool:
            group.add_argument(*names, dest=key, type=str2bool, nargs="?", const=True, default=None, help=help_text)
        elif kind in ("size", "intlist"):
            group.add_argument(*names, dest=key, type=int, nargs="+", default=None, help=help_text)
        elif kind == "mapping":
            group.add_argument(*names, dest=key, type=parse_mapping, default=None, help=help_text)
        else:
            group.add_argument(*names, dest=key, type=kind, default=None, choices=CHOICES.get(key), help=help_text)


def load_yaml_config(path, defaults: dict) -> dict:
    """Read a YAML config file: a mapping of known keys. Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: malformed YAML{at}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, found a {type(values).__name__}")
    unknown = [k for k in values if k not in defaults and k not in DERIVED_KEYS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{path}: unknown config key(s): {', '.join(hints)}")
    result = {}
    for key, value in values.items():
        if key in DERIVED_KEYS:
            continue  # written by older runs' config.yaml; recomputed from the dataset
        try:
            result[key] = coerce(key, value, defaults[key])
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"{path}: bad value for {key!r}: {err}") from None
    return result


def merge_config(defaults: dict, *layers: dict) -> dict:
    config = dict(defaults)
    for layer in layers:
        config.update({k: v for k, v in layer.items() if k in defaults})
    return config


def cli_values(args: argparse.Namespace, defaults: dict) -> dict:
    values = {k: getattr(args, k) for k in defaults if getattr(args, k, None) is not None}
    if "img_size" in values:
        values["img_size"] = normalize_size(values["img_size"])
    return values


def validate_and_derive(config: dict) -> dict:
    """Check the choices and fill the keys that follow from others (in_channels, num_classes, name)."""
    import data
    from models import ARCHITECTURES
    config = dict(config)
    if config["arch"] not in ARCHITECTURES:
        raise ValueError(f"unknown arch {config['arch']!r}; choices: {', '.join(ARCHITECTURES)}")
    if config["dataset"] not in data.DATASETS:
        raise ValueError(f"unknown dataset {config['dataset']!r}; choices: {', '.join(data.DATASETS)}")
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"unknown {key} {config[key]!r}; choices: {', '.join(choices)}")
    for key in ("batch_size", "epochs", "timesteps", "test_display"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]}")
    if config["lr"] <= 0:
        raise ValueError(f"lr must be > 0, got {config['lr']}")
    config["img_size"] = normalize_size(config["img_size"])
    # THL feeds T consecutive frames, one per timestep: that is the 'sequence' encoder.
    if config["thl"]:
        config["encoder"] = "sequence"
    elif config.get("encoder") == "sequence":
        raise ValueError("encoder 'sequence' feeds one frame per timestep and needs --thl true (event data)")
    info = data.dataset_info(config["dataset"], config)
    config["in_channels"] = int(info["in_channels"])
    config["num_classes"] = int(info["num_classes"])
    if not config.get("name"):
        config["name"] = default_run_name(config)
    return config


def default_run_name(config: dict) -> str:
    name = f"{config['model_type']}-{config['arch']}-{config['dataset']}"
    return name + (f"-T{config['timesteps']}" if config["model_type"] == "snn" else "")


def save_config_yaml(config: dict, path):
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True))
