"""Checkpoints of SLTNet's and Spike-BRGNet's repositories -> ours (``converter.py import-published``).

SLTNet's train.py saves ``{'epoch', 'model': state dict, 'best_miou', 'best_acc', ...}``, its metrics as numpy
scalars; Spike-BRGNet's saves its training wrapper's state dict (keys ``model.<...>``), bare (``best.pt``,
``final_state.pt``) or under ``state_dict`` (``checkpoint.pth.tar``, with numpy metrics). Both are read with
``torch.load(weights_only=True)`` and an allow-list of exactly the numpy globals such files hold (NumPy 1 and 2
spell them differently): nothing in them is executed. Our architectures keep the authors' state-dict names
(models/architectures/sltnet.py, spike_brgnet.py), so the mapping is by name; the modules the authors build but
never call are dropped, and a checkpoint whose dropped batch norms were ever updated is refused (they would
have been called). The dataset follows from the classifier (6 classes: DDD17, 11: DSEC-Semantic); the
written config is the published recipe (configs/) with the data protocol the weights were selected under.
"""

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from models import build_model
from models.neurons import Neuron
from utils.checkpoint import FORMAT
from utils.config import SCHEMA, load_yaml_config, merge_config, validate_and_derive

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROTOCOL_KEYS = (
    "dataset",
    "representation",
    "bins",
    "separate_polarity",
    "window_ms",
    "window_events",
    "event_norm",
    "ess_exact",
    "img_size",
    "thl",
)


class Source:
    """One published code base: its architecture, how its checkpoints look, the keys its forward never uses."""

    def __init__(self, arch, name, repository, commit, classifier, first_conv, in_channels, unused, saved):
        self.arch, self.name, self.repository, self.commit = arch, name, repository, commit
        self.classifier, self.first_conv, self.in_channels = classifier, first_conv, in_channels
        self.unused = re.compile(unused)
        self.saved = saved  # what its scripts save, for the one-line refusal


DATASETS = {6: ("ddd17-events", "DDD17"), 11: ("dsec-semantic", "DSEC")}
SOURCES = {
    "sltnet": Source(
        "sltnet",
        "SLTNet",
        "github.com/xiaxinZhu/SLTNet",
        "0c2eb4af7fcc9334efd7d8651aacafbd3734ca34",
        "classifier.0.conv.weight",
        "init_conv.0.conv.weight",
        5,
        r"(^|\.)(conv3x3_[12]|bnlif|attn2|attn3)\.|^upsample_\d\.bn\.|^PA[12]\.",
        "a dict with 'model' (the state dict) and 'epoch', as SLTNet's train.py saves (model_best_miou.pth)",
    ),
    "spike-brgnet": Source(
        "spike-brgnet",
        "Spike-BRGNet",
        "github.com/xiaxinZhu/Spike-BRGNet",
        "7807866f42c4b4e6bfd3ad60c72fe64b117211fd",
        "final_layer.conv2.weight",
        "conv1.0.weight",
        1,
        r"^dfm\.conv\.",
        "the state dict Spike-BRGNet's train.py saves (best.pt, final_state.pt: keys 'model.<...>'), or a dict "
        "with it under 'state_dict' (checkpoint.pth.tar)",
    ),
}
HEADS_ONLY_IN_TRAINING = r"^(seghead_p|seghead_d)\."  # absent from Spike-BRGNet's evaluation form


def numpy_globals() -> list:
    """The numpy globals of the published checkpoints: scalars (their metrics), arrays (Spike-BRGNet's IoU per
    class), dtypes; under both NumPy 1 (numpy.core) and NumPy 2 (numpy._core) names."""
    core = getattr(np, "_core", None) or np.core
    allowed = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        function = getattr(core.multiarray, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, "Float64DType")] if hasattr(dtypes, "Float64DType") else []
    return allowed


def read_published(path, source: Source):
    """The unpickled file (weights_only, numpy globals allowed); errors name the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"Unsupported class ([\w.]+)", str(err))
        if not found:
            reason = next((line.strip() for line in str(err).splitlines() if line.startswith("Unsupported")), "")
            raise ValueError(
                f"{path} is not a PyTorch checkpoint (unpickling failed{': ' + reason if reason else ''}); "
                f"expected {source.saved}"
            ) from None
        raise ValueError(
            f"{path}: refused: it holds Python objects or code ({next(g for g in found.groups() if g)}) that a "
            f"{source.name} checkpoint never contains (expected {source.saved}); nothing in it was executed"
        ) from None
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {reason}); expected {source.saved}"
        )


def _state_of(checkpoint, path, source: Source) -> tuple[dict, dict]:
    """(their state dict, the file's other entries) in ``source``'s format, else a one-line ValueError."""
    expected = f"expected {source.saved}"
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        raise ValueError(f"{path} is already a snnseg checkpoint (format {FORMAT!r}): nothing to import")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a {source.name} checkpoint: found a {type(checkpoint).__name__}; {expected}")
    if source.arch == "sltnet":
        state, extra = checkpoint.get("model"), {k: v for k, v in checkpoint.items() if k != "model"}
    elif isinstance(checkpoint.get("state_dict"), dict):
        state, extra = checkpoint["state_dict"], {k: v for k, v in checkpoint.items() if k != "state_dict"}
    else:
        state, extra = checkpoint, {}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = ", ".join(map(repr, list(checkpoint)[:5])) or "nothing"
        raise ValueError(f"{path}: not a {source.name} checkpoint (found {found}); {expected}")
    if source.arch == "spike-brgnet" and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}  # their FullModel wrapper's prefix
    for key in (source.classifier, source.first_conv):
        if key not in state:
            raise ValueError(f"{path}: not a {source.name} checkpoint: no {key!r} in its state dict; {expected}")
    return dict(state), extra


def _dataset(state, path, source: Source) -> str:
    classes = int(state[source.classifier].shape[0])
    if classes not in DATASETS:
        raise ValueError(
            f"{path}: its classifier has {classes} classes; the published {source.name} has 6 (DDD17) or 11 "
            "(DSEC-Semantic)"
        )
    channels = int(state[source.first_conv].shape[1])
    if channels != source.in_channels:
        raise ValueError(
            f"{path}: its first convolution takes {channels} input channels; {source.name} takes "
            f"{source.in_channels} (the 5-bin voxel grid {'as channels' if channels == 5 else 'as timesteps'})"
        )
    return DATASETS[classes][0]


def published_config(source: Source, dataset: str, windows=None) -> dict:
    """Our full config: the published recipe for ``dataset`` (configs/<arch>-<ddd17|dsec>.yaml), with
    ``windows`` (window_ms, window_events) where the checkpoint was trained on other windows."""
    tag = "ddd17" if dataset == "ddd17-events" else "dsec"
    values = load_yaml_config(CONFIGS / f"{source.arch}-{tag}.yaml")
    windows = windows or {}
    if "window_ms" in windows:  # a window of given length replaces the recipe's, of either kind
        values["window_events"] = None
    if "window_events" in windows:
        values.pop("window_ms", None)
    values.update(windows, name=f"published-{source.arch}-{tag}", data_root=None)
    return validate_and_derive(merge_config(values), {key: "import-published" for key in values})


def map_state(their: dict, model, path, source: Source, allow_missing_heads=False) -> tuple[dict, list, list]:
    """(our state dict for ``model`` from ``their`` tensors, their keys dropped as unused, our keys kept from
    ``model`` because the file lacks them: Spike-BRGNet's training-only heads when ``allow_missing_heads``).
    Values keep their dtype; the authors' 1-D convolutions (ECA, the transformer's MLP) take our 2-D shape."""
    thresholds = {f"{n}.threshold" for n, m in model.named_modules() if isinstance(m, Neuron)}
    ours, mapped, kept = model.state_dict(), {}, []
    for key, target in ours.items():
        if key in thresholds:
            mapped[key] = target  # the neurons' threshold: the config's def_threshold (theirs is a constant)
            continue
        if key not in their:
            if allow_missing_heads and re.match(HEADS_ONLY_IN_TRAINING, key):
                mapped[key] = target
                kept.append(key)
                continue
            raise ValueError(f"{path}: its state dict has no {key!r}, which {source.name} has; expected {source.saved}")
        value = their[key]
        if value.shape != target.shape:
            one_d = value.dim() == 3 and target.dim() == 4 and value.numel() == target.numel()
            if not one_d:
                raise ValueError(
                    f"{path}: {key!r} has shape {tuple(value.shape)} where {source.name} with "
                    f"{model.config['num_classes']} classes has {tuple(target.shape)}"
                )
            value = value.reshape(target.shape)
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(f"{path}: {key!r} holds {value.dtype} values where {source.name} has {target.dtype}")
        mapped[key] = value.detach().clone()
    dropped = [k for k in their if k not in ours]
    foreign = [k for k in dropped if not source.unused.search(k)]
    if foreign:
        raise ValueError(
            f"{path}: {len(foreign)} state-dict entries that {source.name} does not have (e.g. "
            f"{', '.join(foreign[:3])}): a checkpoint of another network"
        )
    called = [k for k in dropped if k.endswith("num_batches_tracked") and int(their[k]) != 0]
    if called:
        raise ValueError(
            f"{path}: {called[0][: -len('.num_batches_tracked')]} was updated in training, but the published "
            f"{source.name} never calls it: not its forward pass"
        )
    return mapped, dropped, kept


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def import_published(arch: str, path, window_ms=None, window_events=None) -> tuple[dict, str]:
    """(our checkpoint dict, one line saying what was imported) for a checkpoint of ``arch``'s repository."""
    source = SOURCES[arch]
    their, extra = _state_of(read_published(path, source), path, source)
    dataset = _dataset(their, path, source)
    windows = {"window_ms": None if window_ms is None else float(window_ms), "window_events": window_events}
    windows = {key: value for key, value in windows.items() if value is not None}
    cfg = published_config(source, dataset, windows)
    model = build_model(cfg, SCHEMA)
    state, dropped, kept = map_state(their, model, path, source, allow_missing_heads=arch == "spike-brgnet")
    protocol = {key: cfg[key] for key in PROTOCOL_KEYS}
    record = {
        "source": source.name,
        "repository": source.repository,
        "commit": source.commit,
        "protocol": protocol,
        "dropped_unused": len(dropped),
        "heads_initialised": kept,
        "epoch": extra.get("epoch"),
        "reported_miou": _number(extra.get("best_miou", extra.get("best_mIoU"))),
    }
    checkpoint = {
        "format": FORMAT,
        "config": cfg,
        "state_dict": state,
        "epoch": record["epoch"] if isinstance(record["epoch"], int) else None,
        "best_miou": None,
        "imported_from": str(path),
        "published": record,
    }
    window = f"{cfg['window_events']:,} events" if cfg["window_events"] else f"{cfg['window_ms']:g} ms"
    line = (
        f"{source.name} for {dataset} ({cfg['num_classes']} classes), {window} windows, "
        f"{'x'.join(map(str, cfg['img_size']))} input; {len(dropped)} entries of never-called modules dropped"
    )
    if kept:
        line += f"; the file lacks the training-only heads (evaluation form): {len(kept)} entries initialised afresh"
    return checkpoint, line


def protocol_problem(checkpoint: dict, cfg: dict):
    """None if ``cfg`` evaluates an imported published checkpoint under the protocol it records; else what
    differs, in one sentence."""
    record = checkpoint.get("published") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("protocol"), dict):
        return None
    for key, value in record["protocol"].items():
        if cfg.get(key) != value:
            return (
                f"holds {record.get('source')}'s weights, selected with {key} {_shown(value)}; {key} "
                f"{_shown(cfg.get(key))} evaluates them under another protocol"
            )
    return None


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
