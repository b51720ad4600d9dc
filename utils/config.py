"""Configuration: one schema for every key, YAML files as defaults, one flat resolved dict.

SCHEMA declares each key once: its section (model, data or train), default, type, help, choices and
accepted range. Everything else is derived from it: the flags of train.py, the reading of YAML files
and checkpoint configs, models.MODEL_DEFAULTS, the data package's defaults and the validation.

Precedence (later wins): SCHEMA defaults < the checkpoint's config when resuming < --config FILE.yaml
< command-line flags. Every key is a flag, spelled with underscores (`--leak_mem`, as in the paper's
code) or dashes (`--leak-mem`). Booleans accept `--bn`, `--bn true`, `--bn false`, `--bn 0`.
Values are checked before any work: a bad one is one line naming the key and what it accepts.
"""

import argparse
import difflib
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.allocator import POLICIES

NATIVE_SIZE = -1  # img_size of "the images as they are" in configs (YAML, checkpoints)


@dataclass(frozen=True)
class Interval:
    """The accepted range of a number; an open end excludes its bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, kind) -> str:
        if kind is int and self.high is None and self.low == 1 and not self.low_open:
            return "a positive integer"
        noun = "an integer" if kind is int else "a finite number"
        if self.high is None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(1)
NON_NEGATIVE = Interval(0)
ABOVE_ZERO = Interval(0, low_open=True)


@dataclass(frozen=True)
class Key:
    name: str
    section: str  # 'model', 'data' or 'train'
    default: object
    kind: object  # bool, int, float, str, 'size', 'intlist' or 'mapping'
    help: str
    choices: object = None  # a tuple, or a callable returning the names of a registry
    interval: Interval | None = None
    optional: bool = False  # None is a value of its own (e.g. num_train None: every sample)
    execution: bool = False  # how the model runs, not what it computes: may differ on resume and load
    snn_only: bool = False  # means nothing to an ANN
    derived: bool = False  # follows from the dataset; never set by hand

    def allowed(self):
        return tuple(self.choices() if callable(self.choices) else self.choices)


def _registry(module, name):
    """Choices read from a registry when needed (importing models or data here would be circular)."""
    return lambda: sorted(getattr(importlib.import_module(module), name))


_M, _D, _T = "model", "data", "train"
SCHEMA = {
    key.name: key
    for key in [
        Key("model_type", _M, "snn", str, "snn (spiking) or ann (its analog twin)", ("snn", "ann")),
        Key("arch", _M, "dl-vgg9", str, "architecture", _registry("models", "ARCHITECTURES")),
        Key("in_channels", _M, 3, int, "input channels (from the dataset)", interval=POSITIVE, derived=True),
        Key("num_classes", _M, 21, int, "classes (from the dataset)", interval=POSITIVE, derived=True),
        Key("img_size", _M, [64, 64], "size", "input size: one int (square), H W, or -1 for the native size"),
        Key("timesteps", _M, 20, int, "number of SNN timesteps T", interval=POSITIVE, snn_only=True),
        Key(
            "leak_mem",
            _M,
            0.99,
            float,
            "membrane leak per timestep (1 = no leak)",
            interval=Interval(0, 1, low_open=True),
            snn_only=True,
        ),
        Key(
            "neuron",
            _M,
            "lif",
            str,
            "neuron model: lif, if (no leak: leak_mem is ignored) or plif (learnable leak, "
            "initialised to leak_mem); docs/neurons.md",
            _registry("models", "NEURONS"),
            snn_only=True,
        ),
        Key(
            "reset",
            _M,
            "subtract",
            str,
            "membrane reset after a spike: subtract (the threshold) or zero",
            ("subtract", "zero"),
            snn_only=True,
        ),
        Key("def_threshold", _M, 1.0, float, "firing threshold", interval=ABOVE_ZERO, snn_only=True),
        Key(
            "surrogate",
            _M,
            "linear",
            str,
            "surrogate gradient of the spike",
            _registry("models", "SURROGATES"),
            snn_only=True,
        ),
        Key("surrogate_params", _M, {}, "mapping", "surrogate parameters, e.g. '{gamma: 0.3}'", snn_only=True),
        Key("bn", _M, True, bool, "batch norm through time (one statistic per timestep)"),
        Key(
            "bntt",
            _M,
            True,
            bool,
            "SNN BN: one per timestep (BNTT); false: one BN over all timesteps, folded into the conv at export",
            snn_only=True,
        ),
        Key(
            "encoder",
            _M,
            "poisson",
            str,
            "input coding: poisson (rate), direct (analog) or sequence (thl)",
            _registry("models", "ENCODERS"),
            snn_only=True,
        ),
        Key(
            "full_prop",
            _M,
            False,
            bool,
            "SNN: extra zero-input steps so that the last input reaches the output",
            snn_only=True,
        ),
        Key("leaky", _M, False, bool, "leaky ReLU (slope alpha) instead of ReLU"),
        Key("alpha", _M, 0.1, float, "leaky ReLU slope", interval=ABOVE_ZERO),
        Key("pretrained", _M, None, str, "local torchvision VGG weights (.pth) for the backbone", optional=True),
        Key(
            "memory_saving",
            _M,
            False,
            bool,
            "replay blocks of memory_block timesteps in backward, recomputing each spiking conv",
            execution=True,
        ),
        Key(
            "memory_block",
            _M,
            4,
            int,
            "timesteps per replayed block (memory_saving)",
            interval=POSITIVE,
            execution=True,
        ),
        Key(
            "compile",
            _M,
            False,
            bool,
            "torch neuron backend: fuse its per-timestep elementwise steps with torch.compile (this model only)",
            execution=True,
        ),
        Key("conv_bias", _M, False, bool, "conv biases (SNNs converted from ANNs carry the folded BN there)"),
        Key(
            "readout",
            _M,
            "mean",
            str,
            "output over T: mean, or sum (the paper code's FCN SNN)",
            ("mean", "sum"),
            snn_only=True,
        ),
        Key(
            "neuron_backend",
            _M,
            "auto",
            str,
            "execution backend of the neurons: auto (the fastest that supports the neuron: Triton kernels on "
            "CUDA when Triton imports, else the torch loops, else generic), generic, torch, or triton",
            ("auto", "generic", "torch", "triton"),
            execution=True,
        ),
        Key("dataset", _D, "voc2012", str, "dataset", _registry("data", "DATASETS")),
        Key("data_root", _D, None, str, "dataset folder (voc2012, ddd17)", optional=True),
        Key("augment", _D, False, bool, "random flips, crops / affine transforms of the training split"),
        Key("thl", _D, False, bool, "target history learning: the T frames before each label, one per timestep"),
        Key("channels", _D, [0, 1], "intlist", "event channels (0-5) of ddd17 / synthetic-events"),
        Key("train_split", _D, "train", str, "voc2012 training list: train, train_aug, trainval or a list file"),
        Key(
            "num_train",
            _D,
            None,
            int,
            "synthetic datasets: training samples (default: the dataset's own)",
            interval=POSITIVE,
            optional=True,
        ),
        Key(
            "num_val",
            _D,
            None,
            int,
            "synthetic datasets: validation samples (default: the dataset's own)",
            interval=POSITIVE,
            optional=True,
        ),
        Key("seq_len", _D, 20, int, "synthetic-events: frames per sequence", interval=POSITIVE),
        Key("void_to_background", _D, False, bool, "voc2012 training: void (255) becomes background, as in the paper"),
        Key("datalist", _D, None, str, "ddd17 training: a list of the frames to train on", optional=True),
        Key("batch_size", _T, 16, int, "images per batch (per process)", interval=POSITIVE),
        Key("epochs", _T, 60, int, "training epochs", interval=POSITIVE),
        Key("lr", _T, 1e-3, float, "learning rate", interval=ABOVE_ZERO),
        Key("optimizer", _T, "sgd", str, "sgd (momentum) or adam (amsgrad)", ("sgd", "adam")),
        Key("momentum", _T, 0.9, float, "SGD momentum", interval=Interval(0, 1, high_open=True)),
        Key("weight_decay", _T, 5e-4, float, "weight decay", interval=NON_NEGATIVE),
        Key("scheduler", _T, "step", str, "step (x0.1 at 50%% and 80%% of the epochs) or poly", ("step", "poly")),
        Key("seed", _T, 0, int, "random seed", interval=NON_NEGATIVE),
        Key("num_workers", _T, 2, int, "data loading processes", interval=NON_NEGATIVE),
        Key("model_dir", _T, "trained_models", str, "folder of the run folders"),
        Key(
            "name",
            _T,
            None,
            str,
            "run name: files go to <model_dir>/<name>/ (default: from the settings)",
            optional=True,
        ),
        Key("device", _T, "auto", str, "auto, cpu, cuda, cuda:1, ..."),
        Key("test_display", _T, 1, int, "evaluate on the validation split every N epochs", interval=POSITIVE),
        Key("see_model", _T, False, bool, "print the model"),
        Key("wandb", _T, False, bool, "log to Weights & Biases"),
        Key("amp", _T, False, bool, "bfloat16 autocast for the convolutions (CPU and GPU); membranes stay float32"),
        Key(
            "cpu_malloc",
            _T,
            "auto",
            str,
            "C heap policy on CPU: auto (release with memory_saving, else balanced), "
            "balanced, default (glibc's), keep (fastest, most memory) or release (least memory, slowest)",
            POLICIES,
        ),
    ]
}

EVENT_DATASETS = ("ddd17", "synthetic-events")
SYNTHETIC_DATASETS = ("synthetic", "synthetic-events")


def defaults(section: str | None = None, derived: bool = True) -> dict:
    """Default of every key (of one section)."""
    return {
        k.name: _copy(k.default)
        for k in SCHEMA.values()
        if (section is None or k.section == section) and (derived or not k.derived)
    }


def all_defaults() -> dict:
    """The defaults of the keys that can be set (flags, YAML): all but the derived ones."""
    return defaults(derived=False)


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


# ----------------------------------------------------------------------------- parsing values
def str2bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false/1/0), got {text!r}")


def parse_mapping(text) -> dict:
    if isinstance(text, dict):
        return dict(text)
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as '{{gamma: 0.3}}', got {text!r}")
    return value


def parse_size(value):
    """The one reader of image sizes: int, [s], [h, w] (or strings of them) -> [h, w]; None, -1 or [-1]
    -> None, the native size. Anything else (0, other negatives, three numbers) is an error."""
    if value is None:
        return None
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        sizes = [_to_int(s) for s in sizes]
    except ValueError:
        sizes = None
    if sizes == [NATIVE_SIZE]:
        return None
    if not sizes or len(sizes) > 2 or min(sizes) < 1:
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise ValueError(
            f"img_size must be one positive int (square), two (H W), or -1 for the native size, got {shown}"
        )
    return sizes * 2 if len(sizes) == 1 else sizes  # one number: a square


def _to_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _to_str(value) -> str:
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"expected a single value, got {value!r}")
    return str(value)


_CONVERTERS = {
    bool: str2bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    "mapping": parse_mapping,
    "size": lambda v: parse_size(v) or NATIVE_SIZE,
    "intlist": lambda v: [_to_int(x) for x in (v if isinstance(v, (list, tuple)) else [v])],
}


def coerce(name: str, value):
    """A value from a flag, a YAML file or a checkpoint as the key's type (YAML reads 1e-3 as a string)."""
    key = SCHEMA[name]
    if value is None and (key.optional or key.kind == "size"):
        return None if key.optional else NATIVE_SIZE
    if value is None:
        raise ValueError("needs a value, got null")
    return _CONVERTERS[key.kind](value)


# ----------------------------------------------------------------------------- checking values
def check_known(config: dict, source="config"):
    """Refuse keys that no section of the schema declares, with the closest known key as a hint."""
    unknown = [k for k in config if k not in SCHEMA]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), list(SCHEMA), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown config key(s): {', '.join(hints)}")


def check_value(name: str, value):
    """ValueError naming the key and what it accepts, if `value` (already coerced) is not allowed."""
    key = SCHEMA[name]
    if value is None and key.optional:
        return
    if key.choices is not None and value not in key.allowed():
        raise ValueError(f"unknown {name} {value!r}; choices: {', '.join(map(str, key.allowed()))}")
    if key.kind in (int, float) and (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (key.interval and value not in key.interval)
    ):
        rule = key.interval.describe(key.kind) if key.interval else "a finite number"
        raise ValueError(f"{name!r} must be {rule}, got {value!r}")
    if key.kind == "size" and value != NATIVE_SIZE:
        parse_size(value)


def check_values(config: dict, section: str | None = None):
    for name, value in config.items():
        if section is None or SCHEMA[name].section == section:
            check_value(name, value)


def check_combinations(config: dict):
    """Settings that are each fine but mean nothing together."""
    dataset = config["dataset"]
    if dataset in EVENT_DATASETS:
        from data.ddd17 import check_channels

        check_channels(config["channels"])
    if config["thl"] and dataset not in EVENT_DATASETS:
        raise ValueError(
            f"thl (target history learning) needs an event dataset ({', '.join(EVENT_DATASETS)}); "
            f"dataset is {dataset!r}"
        )
    if config["thl"] and config["model_type"] != "snn":
        raise ValueError("thl feeds one frame per timestep and needs model_type snn")
    if config["encoder"] == "sequence" and not config["thl"]:
        raise ValueError("encoder 'sequence' feeds one frame per timestep and needs --thl true (event data)")
    if config["thl"] and dataset == "synthetic-events" and config["timesteps"] > config["seq_len"]:
        raise ValueError(
            f"thl with synthetic-events needs timesteps <= seq_len, got {config['timesteps']} > {config['seq_len']}"
        )
    only = {
        "num_train": SYNTHETIC_DATASETS,
        "num_val": SYNTHETIC_DATASETS,
        "seq_len": ("synthetic-events",),
        "void_to_background": ("voc2012",),
        "datalist": ("ddd17",),
        "data_root": ("voc2012", "ddd17"),
    }
    for name, datasets in only.items():
        if dataset not in datasets and config[name] not in (None, False, SCHEMA[name].default):
            raise ValueError(f"{name} applies to {' and '.join(datasets)} only; dataset is {dataset!r}")
    if dataset != "voc2012" and config["train_split"] != "train":
        raise ValueError(f"train_split applies to voc2012 only; dataset is {dataset!r}")


# ----------------------------------------------------------------------------- flags and files
def _flag_type(name):
    def convert(text):
        try:
            return coerce(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def add_config_arguments(parser: argparse.ArgumentParser):
    """One flag per settable key; argparse default None so that we know which flags were given."""
    group = parser.add_argument_group(
        "configuration (also settable in --config YAML)",
        "Defaults: the quickstart's config when none of --config, --dataset and --resume is given, "
        "else the paper's values shown here.",
    )
    for key in SCHEMA.values():
        if key.derived:
            continue
        names = [f"--{key.name}"] + ([f"--{key.name.replace('_', '-')}"] if "_" in key.name else [])
        help_text = f"{key.help} (default: {key.default})"
        if key.choices is not None:
            group.add_argument(
                *names,
                dest=key.name,
                type=_flag_type(key.name),
                default=None,
                help=help_text,
                metavar="{" + ",".join(key.allowed()) + "}",
            )
        elif key.kind is bool:
            group.add_argument(
                *names, dest=key.name, type=_flag_type(key.name), nargs="?", const=True, default=None, help=help_text
            )
        elif key.kind in ("size", "intlist"):
            group.add_argument(*names, dest=key.name, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(*names, dest=key.name, type=_flag_type(key.name), default=None, help=help_text)


def cli_values(args: argparse.Namespace) -> dict:
    """The keys given as flags, coerced."""
    values = {}
    for name in all_defaults():
        value = getattr(args, name, None)
        if value is not None:
            try:
                values[name] = coerce(name, value)
            except ValueError as err:
                raise ValueError(f"--{name}: {err}") from None
    return values


def read_config_layer(values: dict, source, strict: bool = True) -> dict:
    """Coerce the keys of a YAML file / checkpoint config; unknown keys are an error if `strict`
    (a file written by hand), else dropped (a checkpoint of an older version). Derived keys are recomputed."""
    if strict:
        check_known({k: v for k, v in values.items() if not (k in SCHEMA and SCHEMA[k].derived)}, source)
    result = {}
    for name, value in values.items():
        if name not in SCHEMA or SCHEMA[name].derived:
            continue
        try:
            result[name] = coerce(name, value)
        except ValueError as err:
            raise ValueError(f"{source}: bad value for {name!r}: {err}") from None
    return result


def load_yaml_config(path) -> dict:
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
    return read_config_layer(values, path)


def merge_config(*layers: dict) -> dict:
    config = all_defaults()
    for layer in layers:
        config.update(layer)
    return config


def validate_and_derive(config: dict) -> dict:
    """Check every value and combination, then fill the keys that follow from others
    (in_channels, num_classes, name). Nothing here reads data."""
    import data
    from models import resolve_model_config

    config = dict(config)
    check_values(config)
    # THL feeds T consecutive frames, one per timestep: that is the 'sequence' encoder.
    if config["thl"] and config["model_type"] == "snn":
        config["encoder"] = "sequence"
    check_combinations(config)
    info = data.dataset_info(config["dataset"], config)
    config["in_channels"] = int(info["in_channels"])
    config["num_classes"] = int(info["num_classes"])
    config = resolve_model_config(config)  # the model's own rules (surrogate parameters, full_prop)
    if not config.get("name"):
        config["name"] = default_run_name(config)
    check_name(config["name"])
    return config


def check_name(name: str):
    path = Path(name)
    if not name.strip() or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"name must be a folder name inside model_dir (not absolute, no '..'), got {name!r}")


def default_run_name(config: dict) -> str:
    name = f"{config['model_type']}-{config['arch']}-{config['dataset']}"
    return name + (f"-T{config['timesteps']}" if config["model_type"] == "snn" else "")


def save_config_yaml(config: dict, path):
    from utils.files import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True).encode())
