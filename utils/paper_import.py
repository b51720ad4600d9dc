"""Checkpoints of the paper's repository (Intelligent-Computing-Lab-Yale/SNN-Segmentation) -> ours.

The paper's checkpoint is a dict: `config` (its setup() config: model_type, architecture, dataset
{name, num_cls, input_dim, ...}, img_size, timesteps, leak_mem, def_threshold, bn, kernel_size,
full_prop, leaky, alpha, ibt, ...), `state_dict`, `max_miou`, `epoch`, optional `thresholds`. Its
state dict names layers by position within the 'features' and 'classifier' parts:

    features.<i>.weight / classifier.<i>.weight            conv i of the part (the last classifier conv of
                                                           DeepLab is the 1x1 output conv)
    bn_features.<i>.<t>.{weight,running_mean,running_var,num_batches_tracked}    SNN: one BN per timestep
    bn_features.<i>.{running_mean,running_var,num_batches_tracked}               ANN: affine-free BN
    scores_features.<n>.{weight,bias} / scores_classifier.<n>.{...}   FCN skip scores, n = convs before it
    upsample.<k>.0.weight                                  FCN decoder transposed conv k

Our VGG networks keep the same parts (models/architectures/vgg.py: ``part_units``,
``paper_skip_positions``), so the mapping is by position.
"""

import pickle
import re
from pathlib import Path

import torch

from models import MODEL_DEFAULTS, build_model
from models.architectures.vgg import TABLES as VGG_TABLES
from models.conversion import THRESHOLD_TYPES
from utils.checkpoint import FORMAT
from utils.config import NATIVE_SIZE, SCHEMA, all_defaults, parse_size

PAPER_SCORE_PREFIXES = ("scores_", "skips_")  # the paper's code writes scores_*; skips_* is accepted too


def read_weights_only(path) -> object:
    """torch.load(weights_only=True) with errors that name the file; never runs code from it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{path}: refused to load: it holds Python objects or code{what} that a weights-only "
                f"checkpoint never contains; nothing in it was executed"
            ) from None
        reason = next((line.strip() for line in text.splitlines() if line.startswith("Unsupported")), "bad data")
        raise ValueError(f"{path} is not a PyTorch checkpoint (unpickling failed: {reason})") from None
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {reason})") from None


def is_paper_checkpoint(checkpoint) -> bool:
    return (
        isinstance(checkpoint, dict)
        and "format" not in checkpoint
        and isinstance(checkpoint.get("config"), dict)
        and "architecture" in checkpoint["config"]
    )


def check_paper_checkpoint(checkpoint, path) -> dict:
    """The checkpoint if it has the paper's layout; otherwise ValueError naming what is wrong."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict with 'config' and 'state_dict', found a {type(checkpoint).__name__}")
    if checkpoint.get("format") == FORMAT:
        raise ValueError(f"{path} is already a snnseg checkpoint (format {FORMAT!r}); nothing to import")
    for key in ("config", "state_dict"):
        if key not in checkpoint:
            raise ValueError(
                f"{path}: not a checkpoint of the paper's repository: no {key!r} key "
                f"(found {', '.join(map(repr, checkpoint)) or 'nothing'})"
            )
    if not isinstance(checkpoint["config"], dict):
        raise ValueError(f"{path}: 'config' must be a dict, found a {type(checkpoint['config']).__name__}")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: 'state_dict' must be a non-empty dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    for key in ("model_type", "architecture", "dataset"):
        if checkpoint["config"].get(key) is None:
            raise ValueError(f"{path}: the paper config has no {key!r}")
    return checkpoint


# ------------------------------------------------------------------------------------------ config
def translate_config(paper: dict, path) -> dict:
    """Our full flat config for the paper's setup() config."""
    model_type = paper["model_type"]
    if model_type not in ("ann", "snn"):
        raise ValueError(f"{path}: config model_type must be 'ann' or 'snn', got {model_type!r}")
    arch = paper["architecture"]
    if arch not in VGG_TABLES:  # the paper's networks: the VGG tables (models/architectures/vgg.py)
        raise ValueError(f"{path}: unknown architecture {arch!r}; the paper's: {', '.join(VGG_TABLES)}")
    if paper.get("kernel_size", 3) not in (3, None):
        raise ValueError(f"{path}: kernel_size {paper['kernel_size']} is not supported (the architectures use 3)")
    dataset = paper["dataset"]
    if not isinstance(dataset, dict) or not {"name", "num_cls", "input_dim"} <= dataset.keys():
        raise ValueError(f"{path}: config 'dataset' must be a dict with name, num_cls, input_dim; got {dataset!r}")
    cfg = all_defaults()
    cfg.update(
        model_type=model_type,
        arch=arch,
        dataset=str(dataset["name"]),
        num_classes=int(dataset["num_cls"]),
        in_channels=int(dataset["input_dim"]),
        img_size=_size(paper.get("img_size"), path),
        pretrained=None,
        data_root=None,
    )
    for key in ("timesteps", "leak_mem", "def_threshold", "alpha", "seed", "batch_size", "epochs", "lr"):
        if paper.get(key) is not None:
            cfg[key] = type(MODEL_DEFAULTS.get(key, cfg.get(key)))(paper[key])
    for key in ("bn", "full_prop", "leaky", "thl"):
        cfg[key] = bool(paper.get(key))
    if paper.get("optimizer") in ("sgd", "adam"):
        cfg["optimizer"] = paper["optimizer"]
    if model_type == "snn":
        cfg["leaky"] = bool(paper.get("ibt"))  # an SNN converted from a leaky-ReLU ANN: negative thresholds
        cfg["full_prop"] = bool(paper.get("full_prop"))
    else:
        cfg["full_prop"] = False
    cfg["encoder"] = "sequence" if cfg["thl"] else "poisson"
    # The paper code's FCN SNN readout is the decoder membrane itself, not divided by T.
    cfg["readout"] = "sum" if model_type == "snn" and arch.startswith("fcn") else "mean"
    cfg["name"] = f"paper-{model_type}-{arch}-{cfg['dataset']}"
    return cfg


def _size(value, path):
    try:
        if value is None:
            raise ValueError("img_size is missing")
        return parse_size(value) or NATIVE_SIZE
    except ValueError as err:
        raise ValueError(f"{path}: config {err}") from None


# -------------------------------------------------------------------------------------- state dict
def map_state_dict(paper_state: dict, model, path) -> dict:
    """Our state dict for ``model`` (built from the translated config) from the paper's tensors."""
    ours = model.state_dict()
    source = dict(paper_state)
    mapped = {}

    def take(paper_key, our_key, index=None):
        if paper_key not in source:
            raise ValueError(f"{path}: state_dict has no {paper_key!r} (needed for {our_key} of {model.arch})")
        value = source.pop(paper_key)
        target = ours[our_key] if index is None else ours[our_key][index]
        if value.shape != target.shape:
            raise ValueError(
                f"{path}: {paper_key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(target.shape)} for {model.arch} (num_classes/input_dim/arch mismatch?)"
            )
        if index is None:
            mapped[our_key] = value.detach().to(target.dtype).clone()
        else:
            mapped.setdefault(our_key, ours[our_key].clone())[index] = value.to(target.dtype)

    has_bn = any(k.startswith("bn_") for k in source)
    for part in ("features", "classifier"):
        units = model.part_units[part]
        for i, body_index in enumerate(units):
            take(f"{part}.{i}.weight", f"body.{body_index}.conv.weight")
            if has_bn:
                norm = f"body.{body_index}.norm"
                mapped[f"{norm}.num_batches_tracked"] = _take_bn(
                    take, source, part, i, norm, model.timesteps if model.spiking else None
                )
    if model.output is not None:
        take(f"classifier.{len(model.part_units['classifier'])}.weight", "output.weight")
    for body_index, part, count in model.paper_skip_positions():
        prefix = next(
            (p + part for p in PAPER_SCORE_PREFIXES if f"{p}{part}.{count}.weight" in source), f"scores_{part}"
        )
        take(f"{prefix}.{count}.weight", f"body.{body_index}.weight")
        take(f"{prefix}.{count}.bias", f"body.{body_index}.bias")
    for k in range(len(model.decoder)):
        take(f"upsample.{k}.0.weight", f"decoder.{k}.up.weight")
    if source:
        raise ValueError(
            f"{path}: {len(source)} state_dict entries do not belong to {model.arch} "
            f"({model.config['model_type']}): {', '.join(list(source)[:4])}"
        )
    for key, value in ours.items():
        mapped.setdefault(key, value)  # LIF thresholds: the config's def_threshold
    return mapped


def _take_bn(take, source, part, i, our_prefix, timesteps):
    """Move one layer's BN statistics (per timestep in an SNN); returns its batch counter."""
    per_step = [f"bn_{part}.{i}.{t}." for t in range(timesteps)] if timesteps else [f"bn_{part}.{i}."]
    forbidden = ("bias",) if timesteps else ("bias", "weight")
    for extra in forbidden:
        if per_step[0] + extra in source:
            raise ValueError(
                f"{per_step[0] + extra!r}: the paper's BN has no {extra} here; this checkpoint cannot be mapped exactly"
            )
    stats = ("weight", "running_mean", "running_var") if timesteps else ("running_mean", "running_var")
    for t, prefix in enumerate(per_step):
        for stat in stats:
            take(prefix + stat, f"{our_prefix}.{stat}", t)
    # our T batched BNs share one counter
    counters = [
        int(source.pop(prefix + "num_batches_tracked"))
        for prefix in per_step
        if prefix + "num_batches_tracked" in source
    ]
    return torch.tensor(max(counters, default=0), dtype=torch.long)


def check_nested_thresholds(thresholds, path) -> dict:
    """thresholds[type][str(T)] = list, as ours; the paper's older flat {T: list} is named as such."""
    if not isinstance(thresholds, dict):
        raise ValueError(f"{path}: 'thresholds' must be a dict, found a {type(thresholds).__name__}")
    for kind, table in thresholds.items():
        if kind not in THRESHOLD_TYPES:
            if str(kind).isdigit():
                raise ValueError(
                    f"{path}: 'thresholds' is flat ({{T: [...]}}); nest it first with "
                    f"`python converter.py thresholds {path} --type TYPE -o OUT`"
                )
            raise ValueError(
                f"{path}: unknown threshold type {kind!r} in 'thresholds' (expected {', '.join(THRESHOLD_TYPES)})"
            )
        if not isinstance(table, dict) or not all(isinstance(v, (list, tuple)) for v in table.values()):
            raise ValueError(f"{path}: thresholds[{kind!r}] must map T to a list of per-layer thresholds")
    return {
        kind: {
            str(t): [v.float() if isinstance(v, torch.Tensor) else float(v) for v in values]
            for t, values in table.items()
        }
        for kind, table in thresholds.items()
    }


def import_paper_checkpoint(checkpoint: dict, path) -> dict:
    """Our checkpoint dict for a loaded checkpoint of the paper's repository."""

    check_paper_checkpoint(checkpoint, path)
    cfg = translate_config(checkpoint["config"], path)
    state = checkpoint["state_dict"]
    if cfg["bn"] and not any(k.startswith("bn_") for k in state):
        # The paper's "convert state_dict" mode drops BN: such weights run without it.
        print(f"{path}: no BN tensors in the state dict (a converted state dict?): importing with bn false")
        cfg["bn"] = False
    model = build_model(cfg, SCHEMA)
    result = {
        "format": FORMAT,
        "config": cfg,
        "state_dict": map_state_dict(state, model, path),
        "epoch": checkpoint.get("epoch"),
        "best_miou": _float_or_none(checkpoint.get("max_miou")),
        "imported_from": str(path),
    }
    if checkpoint.get("thresholds") is not None:
        result["thresholds"] = check_nested_thresholds(checkpoint["thresholds"], path)
    return result


def _float_or_none(value):
    return None if value is None else float(value)


def conv_weights_only(checkpoint: dict, path) -> dict:
    """The paper's 'convert state_dict' mode: keep features.<i>.weight / classifier.<i>.weight, renumbered."""
    check_paper_checkpoint(checkpoint, path)
    pattern = re.compile(r"^(features|classifier)\.(\d+)\.weight$")
    found = {"features": [], "classifier": []}
    for key, value in checkpoint["state_dict"].items():
        match = pattern.match(key)
        if match and value.dim() == 4:
            found[match.group(1)].append((int(match.group(2)), value))
    if not found["features"]:
        raise ValueError(f"{path}: state_dict has no conv weights 'features.<i>.weight'")
    state = {}
    for part, items in found.items():
        for new_index, (_, value) in enumerate(sorted(items, key=lambda item: item[0])):
            state[f"{part}.{new_index}.weight"] = value
    return {**checkpoint, "state_dict": state}
