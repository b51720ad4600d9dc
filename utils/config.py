"""Configuration: one schema for every key, YAML files as defaults, one flat resolved dict.

Each layer declares its own keys (``common/keys.py`` is their vocabulary): the model's in
``models/config.py``, the data's in ``data/registry.py`` and each dataset's spec, the training run's
here. This module assembles them into SCHEMA, from which everything else is derived: the flags of
train.py, the reading of YAML files and checkpoint configs, and the validation.

Precedence (later wins): SCHEMA defaults < the checkpoint's config when resuming < --config FILE.yaml
< command-line flags. Every key is a flag, spelled with underscores (`--leak_mem`, as in the paper's
code) or dashes (`--leak-mem`). Booleans accept `--bn`, `--bn true`, `--bn false`, `--bn 0`.
Values are checked before any work: a bad one is one line naming the key and what it accepts.

Which keys were given. A resolved config is one flat dict of every key, so a default cannot be told
from a value someone set. `merge_layers` therefore also returns the keys' sources: {key: where its value
was set} for every key a layer set (a flag: '--leak_mem'; a YAML file: its path; a resumed checkpoint:
its path); a key at its default has no entry. `given_keys(sources)` is the set of keys that were given.
A YAML file gives every key it names. A resumed checkpoint gives the keys its run was given, recorded
beside its config (`given`, a list of key names, written by train.py since this version); a checkpoint
without that record gives the keys whose value differs from the default (an equal value cannot be told
apart). The saved config.yaml and the checkpoint's `config` keep their format.
"""

import argparse
import difflib
import json
import os
from pathlib import Path

import yaml

import data
from common import keys
from common.cli import shown
from common.files import atomic_write_bytes
from common.keys import (  # noqa: F401  (re-exported: the readers of values used by the scripts)
    ABOVE_ZERO,
    NATIVE_SIZE,
    NON_NEGATIVE,
    POSITIVE,
    Interval,
    Key,
    parse_mapping,
    parse_size,
    str2bool,
)
from data import registry
from models.architectures import ARCHITECTURES, get_architecture, min_input_size, takes_pretrained
from models.config import MODEL_KEYS, architecture_defaults, compile_problem, resolve_model_config
from models.neurons import NEURONS, ignored_key_problem
from utils.allocator import POLICIES

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; a huge one is a mistake
MAX_VALUE_CHARS = 4096  # the longest path Linux accepts

_T = "train"
TRAIN_KEYS = keys.key_table(
    [
        Key("batch_size", _T, 16, int, "images per batch (per process)", interval=POSITIVE),
        Key("epochs", _T, 60, int, "training epochs", interval=POSITIVE),
        Key("lr", _T, 1e-3, float, "learning rate", interval=ABOVE_ZERO),
        Key("optimizer", _T, "sgd", str, "sgd (momentum) or adam", ("sgd", "adam")),
        Key("amsgrad", _T, True, bool, "adam: the AMSGrad variant (false: plain Adam, as SLTNet and Spike-BRGNet)"),
        Key("momentum", _T, 0.9, float, "SGD momentum", interval=Interval(0, 1, high_open=True)),
        Key("weight_decay", _T, 5e-4, float, "weight decay", interval=NON_NEGATIVE),
        Key(
            "scheduler",
            _T,
            "step",
            str,
            "step (x0.1 at 50%% and 80%% of the epochs), poly, or steplr (x lr_gamma every lr_step epochs)",
            ("step", "poly", "steplr"),
        ),
        Key("lr_step", _T, 10, int, "scheduler steplr: epochs between decays", interval=POSITIVE),
        Key(
            "lr_gamma",
            _T,
            0.1,
            float,
            "scheduler steplr: the factor of each decay",
            interval=Interval(0, 1, low_open=True),
        ),
        Key(
            "loss",
            _T,
            "ce",
            str,
            "ce (cross-entropy over the labelled pixels) or ohem (online hard example mining: the pixels whose "
            "class probability is below max(ohem_thresh, the ohem_min_kept-th smallest))",
            ("ce", "ohem"),
        ),
        Key("ohem_thresh", _T, 0.7, float, "loss ohem: probability threshold", interval=Interval(0, 1, low_open=True)),
        Key("ohem_min_kept", _T, 100000, int, "loss ohem: pixels kept at least", interval=NON_NEGATIVE),
        Key(
            "aux_weight",
            _T,
            0.0,
            float,
            "weight of the auxiliary head's cross-entropy (sltnet: early head, spike-brgnet: detail head), averaged "
            "over all pixels",
            interval=NON_NEGATIVE,
        ),
        Key(
            "boundary_weight",
            _T,
            0.0,
            float,
            "spike-brgnet: weight of the main loss again on the pixels its boundary head marks",
            interval=NON_NEGATIVE,
        ),
        Key(
            "boundary_thresh",
            _T,
            0.6,
            float,
            "boundary_weight: a pixel is marked where sigmoid(boundary head) exceeds this",
            interval=Interval(0, 1, low_open=True),
        ),
        Key("drop_last", _T, False, bool, "drop the last training batch when smaller than batch_size"),
        Key("seed", _T, 0, int, "random seed", interval=Interval(0, 2**32 - 1, note="NumPy's seeds")),
        Key(
            "num_workers",
            _T,
            2,
            int,
            "data loading processes",
            interval=Interval(0, 4 * CPUS, note=f"at most 4 per CPU; this machine has {CPUS}"),
        ),
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
)
SCHEMA = keys.key_table(MODEL_KEYS.values(), registry.data_keys().values(), TRAIN_KEYS.values())


def defaults(section: str | None = None, derived: bool = True) -> dict:
    """Default of every key (of one section)."""
    return {
        k.name: k.default_value()
        for k in SCHEMA.values()
        if (section is None or k.section == section) and (derived or not k.derived)
    }


def all_defaults() -> dict:
    """The defaults of the keys that can be set (flags, YAML): all but the derived ones."""
    return defaults(derived=False)


def coerce(name: str, value):
    """A value from a flag, a YAML file or a checkpoint as the key's type (YAML reads 1e-3 as a string)."""
    return keys.coerce(SCHEMA[name], value)


# ----------------------------------------------------------------------------- checking values
def check_known(config: dict, source="config"):
    """Refuse keys that no section of the schema declares, with the closest known key as a hint."""
    unknown = [k for k in config if k not in SCHEMA]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(str(name)[:100], list(SCHEMA), n=1)
            hints.append(shown(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown config key(s): {', '.join(hints)}")


def check_value(name: str, value):
    """ValueError naming the key and what it accepts, if `value` (already coerced) is not allowed."""
    keys.check_value(SCHEMA[name], value)


def check_values(config: dict, section: str | None = None):
    for name, value in config.items():
        if section is None or SCHEMA[name].section == section:
            check_value(name, value)


def _from(name: str, sources) -> str:
    """' (set in <where>)' for a key a layer set, for messages: the user may not have typed it."""
    where = (sources or {}).get(name)
    return "" if where is None or where == f"--{name}" else f" (set in {where}, not on the command line)"


def check_combinations(config: dict, sources: dict | None = None):
    """Settings that are each fine but mean nothing together (the dataset's own rules: its spec's check).
    `sources` (merge_layers) lets a message say where a key the user did not type came from."""
    spec = registry.get(config["dataset"])
    if config["thl"] and spec.modality != registry.EVENTS:
        raise ValueError(
            f"thl (target history learning) needs an event dataset ({', '.join(registry.names(registry.EVENTS))}); "
            f"dataset is {spec.name!r}"
        )
    if config["thl"] and config["model_type"] != "snn":
        raise ValueError("thl feeds one frame per timestep and needs model_type snn")
    if config["encoder"] == "sequence" and not config["thl"]:
        raise ValueError("encoder 'sequence' feeds one frame per timestep and needs --thl true (event data)")
    if config.get("pretrained") and not takes_pretrained(config["arch"]):
        raise ValueError(
            f"pretrained{_from('pretrained', sources)}: architecture {config['arch']!r} cannot start from pretrained "
            "weights (the VGG architectures take torchvision's VGG weights)"
        )
    if config["model_type"] == "snn" and config.get("neuron", "lif") in NEURONS:  # an unknown one: its key's check
        problem = ignored_key_problem(config, sources or {}, all_defaults()) or compile_problem(config)
        if problem:
            raise ValueError(problem)
    check_training_keys(config, sources)
    for name in registry.data_keys():
        readers = registry.datasets_reading(name)
        if spec.name not in readers and config[name] not in (None, False, SCHEMA[name].default):
            where, origin = _from(name, sources), (sources or {}).get(name, "")
            advice = ""
            if where and origin.endswith((".yaml", ".yml")):
                advice = (
                    f": {origin} was written for another dataset; use a config for {spec.name}, or "
                    f"--dataset {spec.name} without --config (the paper's defaults)"
                )
            raise ValueError(
                f"{name}{where} applies to {' and '.join(readers)} only; dataset is {spec.name!r}"
                f"{_from('dataset', sources)}{advice}"
            )
    given = set(sources or ())
    if {"window_ms", "window_events"} <= given and config.get("window_events") is not None:
        raise ValueError(  # the default 50 ms cannot be told from a given 50 by value: ask the sources
            f"window_ms ({float(config['window_ms']):g}{_from('window_ms', sources)}) and window_events "
            f"({config['window_events']}{_from('window_events', sources)}) are both set: give one (window_ms: the "
            "window's length; window_events: its number of events)"
        )
    if spec.check is not None:
        spec.check(config)


# Training keys that apply only with another one's value: {key: (the key, the values it needs)}.
_APPLIES_WITH = {
    "ohem_thresh": ("loss", ("ohem",)),
    "ohem_min_kept": ("loss", ("ohem",)),
    "lr_step": ("scheduler", ("steplr",)),
    "lr_gamma": ("scheduler", ("steplr",)),
}


def check_training_keys(config: dict, sources: dict | None = None):
    """A loss of heads the architecture has, and no key given that the settings would ignore."""
    heads = get_architecture(config["arch"])[0].heads
    for key, head in (("aux_weight", "aux"), ("boundary_weight", "boundary")):
        if config[key] > 0 and head not in heads:
            with_head = [n for n, (cls, _) in ARCHITECTURES.items() if head in cls.heads]
            raise ValueError(
                f"{key}{_from(key, sources)} needs an architecture with a{'n' if head == 'aux' else ''} {head} head "
                f"({', '.join(with_head) or 'none registered'}); arch is {config['arch']!r}"
            )
    for key, (other, values) in _APPLIES_WITH.items():
        if config[other] not in values and config[key] != SCHEMA[key].default:
            raise ValueError(
                f"{key}{_from(key, sources)} applies to {other} {' or '.join(values)} only; "
                f"{other} is {config[other]!r}"
            )
    if config["boundary_weight"] == 0 and config["boundary_thresh"] != SCHEMA["boundary_thresh"].default:
        raise ValueError(f"boundary_thresh{_from('boundary_thresh', sources)} applies with boundary_weight > 0 only")


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
                metavar="{" + ",".join(map(str, key.allowed())) + "}",
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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line, first_line):
        super().__init__(f"duplicate key {shown(key)} at line {line} (first at line {first_line})")


def _unique_mapping(loader, node, deep=False):
    """A YAML mapping whose keys are all different: a repeated key would silently override the first."""
    first = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the stock constructor reports an unhashable key itself
        if key in first:
            raise _DuplicateKey(key, key_node.start_mark.line + 1, first[key])
        first[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing duplicate keys."""


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _long_value(values, where=""):
    """The first string in `values` longer than MAX_VALUE_CHARS, as (where, length), or None."""
    if isinstance(values, str):
        return (where, len(values)) if len(values) > MAX_VALUE_CHARS else None
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else ()
    for key, value in items:
        found = _long_value(value, f"{where}.{key}" if where else str(key)[:100])
        if found:
            return found
    return None


def load_yaml_config(path) -> dict:
    """Read a YAML config file: a mapping of known keys. Errors name the file and the key (and the line
    of a key given twice); a file over MAX_CONFIG_BYTES or a value over MAX_VALUE_CHARS is refused."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {size:,} bytes is too large for a config file (at most {MAX_CONFIG_BYTES:,})")
    try:
        values = yaml.load(path.read_text(), Loader=_ConfigLoader)
    except _DuplicateKey as err:
        raise ValueError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: malformed YAML{at}: {shown(problem, quote=False)}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # a value YAML cannot build, e.g. an integer of 5000 digits
        raise ValueError(f"{path}: {shown(str(err), 200, quote=False)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, found a {type(values).__name__}")
    long_value = _long_value(values)
    if long_value:
        raise ValueError(
            f"{path}: the value of {long_value[0]!r} is {long_value[1]:,} characters long (at most {MAX_VALUE_CHARS:,})"
        )
    return read_config_layer(values, path)


def merge_config(*layers: dict) -> dict:
    config = all_defaults()
    for layer in layers:
        config.update(layer)
    return config


def merge_layers(layers) -> tuple[dict, dict]:
    """`layers`: (source, values, given) from lowest to highest precedence; `given` is the set of keys of
    `values` that the layer gives (None: all of them). Returns (config, sources): merge_config of the
    values, and {key: source} of the keys given (the last layer to give a key names it)."""
    sources = {}
    for source, values, given in layers:
        for name in values if given is None else given & values.keys():
            sources[name] = str(source)
    return merge_config(*(values for _, values, _ in layers)), sources


def given_keys(sources: dict) -> set:
    """The keys a flag, a YAML file or a resumed checkpoint set (see the module's doc), not defaults."""
    return set(sources)


def flag_sources(values: dict) -> dict:
    """The sources of flag values (cli_values): each its flag."""
    return {name: f"--{name}" for name in values}


def recorded_given(checkpoint: dict, values: dict) -> set:
    """The keys of a resumed checkpoint's config `values` that its run was given: its `given` record,
    else (an older checkpoint) those that differ from the default."""
    recorded = checkpoint.get("given") if isinstance(checkpoint, dict) else None
    if isinstance(recorded, (list, tuple)) and all(isinstance(k, str) for k in recorded):
        return set(recorded) & values.keys()
    defaults_ = all_defaults()
    return {k for k, v in values.items() if k in defaults_ and v != defaults_[k]}


def validate_and_derive(config: dict, sources: dict | None = None) -> dict:
    """Check every value and combination, then fill the keys that follow from others
    (in_channels, num_classes, name). Nothing here reads data. `sources` (merge_layers): where the given
    keys were set, for the messages."""
    config = dict(config)
    check_values(config)
    # The settings an architecture is defined with (models/network.py, config_defaults), where no layer gave them.
    given = given_keys(sources or {})
    config.update({k: v for k, v in architecture_defaults(config["arch"], SCHEMA).items() if k not in given})
    check_img_size(config, "img_size" + _from("img_size", sources))
    # THL feeds T consecutive frames, one per timestep: that is the 'sequence' encoder.
    if config["thl"] and config["model_type"] == "snn":
        config["encoder"] = "sequence"
    check_combinations(config, sources)
    info = data.dataset_info(config["dataset"], config)
    config["in_channels"] = int(info["in_channels"])
    config["num_classes"] = int(info["num_classes"])
    config = resolve_model_config(config, SCHEMA)  # the model's own rules (surrogate parameters, full_prop)
    if not config.get("name"):
        config["name"] = default_run_name(config)
    check_name(config["name"])
    return config


def min_img_size(arch: str) -> int:
    """The smallest input side `arch` is meant for: its total downsampling, below which its deepest feature
    maps would be under one pixel (the architecture says: models/architectures/)."""
    return min_input_size(arch)


def check_img_size(config: dict, what: str = "img_size", size=None):
    """ValueError if the input size (`size`, else config's img_size; the native size passes) is below
    min_img_size of the config's architecture."""
    size = config.get("img_size") if size is None else size
    if not isinstance(size, (list, tuple)):
        return
    least = min_img_size(config["arch"])
    if min(int(s) for s in size) < least:
        raise ValueError(
            f"{what} {'x'.join(map(str, size))} is below the smallest input {config['arch']} takes, {least}x{least} "
            f"(its total downsampling): give {least} or more"
        )


def check_name(name: str):
    """A run name is one folder name: no separator, not '.' or '..' (with --overwrite, '.' would set the
    whole model_dir aside)."""
    separators = [s for s in ("/", os.sep, os.altsep, "\0") if s and s in name]
    if not name.strip() or name in (".", "..") or separators or len(os.fsencode(name)) > 255:
        raise ValueError(
            f"name must be one folder name inside model_dir (no '/', not '.' or '..', at most 255 bytes), "
            f"got {shown(name)}"
        )


def default_run_name(config: dict) -> str:
    name = f"{config['model_type']}-{config['arch']}-{config['dataset']}"
    return name + (f"-T{config['timesteps']}" if config["model_type"] == "snn" else "")


def save_config_yaml(config: dict, path):
    atomic_write_bytes(path, yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True).encode())
