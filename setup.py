"""Builds everything train.py and test.py need from one resolved config.

This is NOT a packaging script: the project is installed with `pip install -r requirements.txt`
(or `conda env create -f environment.yml`) and run from the repository root. Running
`python setup.py` says so and exits with a non-zero code.

Import it as a module (`import setup`): config parsing and checks (`add_config_arguments`,
`resolve_config`, `resolve_config_sources` (the config and which keys were given), `describe_config`,
`check_inputs`, `check_run`), then `build_datasets`, `build_loaders`,
`build_model`, `build_loss`, `build_optimizer`, `build_scheduler`, `resolve_device`, `build_logger`,
`seed_everything`.
"""

import argparse
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import data
import models
from common import files
from data import registry
from data.transforms import IGNORE_INDEX
from utils.config import (
    SCHEMA,
    cli_values,
    flag_sources,
    given_keys,
    load_yaml_config,
    merge_layers,
    read_config_layer,
    recorded_given,
    save_config_yaml,
    validate_and_derive,
)
from utils.config import (
    add_config_arguments as _add_keys,
)
from utils.logging import RunLogger
from utils.losses import SegmentationLoss

REPO_ROOT = Path(__file__).resolve().parent
# The base config of a run given neither --config, --dataset nor --resume, by --model_type.
QUICKSTART_CONFIGS = {
    "snn": REPO_ROOT / "configs" / "quickstart.yaml",
    "ann": REPO_ROOT / "configs" / "quickstart-ann.yaml",
}
QUICKSTART_CONFIG = QUICKSTART_CONFIGS["snn"]
LR_DECAY_POINTS = (0.5, 0.8)  # the paper's schedule: x0.1 at 50% and at 80% of the epochs
POLY_POWER = 0.9

__all__ = [
    "add_config_arguments",
    "resolve_config",
    "resolve_config_sources",
    "given_keys",
    "describe_config",
    "check_inputs",
    "check_run",
    "save_config_yaml",
    "build_datasets",
    "build_loaders",
    "build_model",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "resolve_device",
    "build_logger",
    "seed_everything",
    "QUICKSTART_CONFIG",
]


# ----------------------------------------------------------------------------- configuration
def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config, --debug and one flag per config key (paper names, dashed spellings too)."""
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file whose values become the defaults (flags override them); without it, "
        "--dataset or --resume: the quickstart (configs/quickstart.yaml, or "
        "quickstart-ann.yaml with --model_type ann)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    _add_keys(parser)
    return parser


def base_config_file(args: argparse.Namespace, resuming: bool = False) -> Path | None:
    """--config; else the quickstart's config unless --dataset (a paper experiment from the built-in
    paper defaults) or a resumed checkpoint's config says what to train."""
    if getattr(args, "config", None):
        return Path(args.config)
    if resuming or getattr(args, "dataset", None) is not None:
        return None
    return QUICKSTART_CONFIGS.get(getattr(args, "model_type", None) or "snn", QUICKSTART_CONFIG)


def resolve_config(args: argparse.Namespace, base: dict | None = None, base_source="the checkpoint", **kwargs) -> dict:
    """defaults < base (a resumed checkpoint's config) < --config YAML (or the quickstart's) < flags
    -> one flat dict, every value checked. Nothing here reads data."""
    return resolve_config_sources(args, base, base_source, **kwargs)[0]


def resolve_config_sources(
    args: argparse.Namespace, base: dict | None = None, base_source="the checkpoint", base_given=None
) -> tuple[dict, dict]:
    """resolve_config, and where each given key was set: (config, sources), sources = {key: '--flag', the
    YAML file or the checkpoint}; a key at its default has no entry (utils/config.py: `given_keys(sources)`
    is the set of given keys). `base_given`: the keys the base gives (None: those that differ from the
    default; utils/config.py, recorded_given)."""
    layers = []
    if base:
        values = read_config_layer(base, base_source, strict=False)
        given = set(base_given) if base_given is not None else recorded_given({}, values)
        layers.append((base_source, values, given))
    config_file = base_config_file(args, resuming=base is not None)
    if config_file is not None:
        layers.append((_shown(config_file), load_yaml_config(config_file), None))
    flags = cli_values(args)
    config, sources = merge_layers([*layers, ("flags", flags, None)])
    sources.update(flag_sources(flags))
    return validate_and_derive(config, sources), sources


def describe_config(args: argparse.Namespace, resume_path=None) -> str:
    """Where a run's settings come from, for its first output line."""
    config_file = base_config_file(args, resuming=resume_path is not None)
    if config_file is not None and not getattr(args, "config", None):
        base = f"{_shown(config_file)} (the quickstart: no --config, --dataset or --resume given)"
    elif config_file is not None:
        base = str(config_file)
    else:
        base = "the built-in paper defaults"
    if resume_path is not None:
        base = f"{resume_path} (resumed)" + ("" if config_file is None else f", then {base}")
    flags = sorted(cli_values(args))
    return f"config: {base}" + (f"; flags override {', '.join(flags)}" if flags else "")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def check_inputs(cfg: dict):
    """Input files and folders that must exist, checked before any work."""
    for key in ("data_root", "datalist", "pretrained"):
        if cfg.get(key) and not Path(cfg[key]).exists():
            raise FileNotFoundError(f"{key} {cfg[key]} does not exist")
    if registry.get(cfg["dataset"]).needs_root and not cfg.get("data_root"):
        raise ValueError(
            f"dataset {cfg['dataset']!r} needs data_root (a local folder); see docs/data.md for the layout it reads"
        )


def check_run(cfg: dict):
    """Before any work: a training run's inputs exist, its run folder can be written and what it logs
    to is installed."""
    check_inputs(cfg)
    files.check_output_dir(Path(cfg["model_dir"]) / cfg["name"], "run folder")
    if cfg["wandb"] and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb was given but the wandb package is not installed (pip install wandb)")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data
def build_datasets(cfg: dict):
    """(train set, val set); for DDD17 the 'val' split is its test folder."""
    return data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")


def _seed_numpy_in_worker(worker_id):
    # torch seeds python's random and torch in each worker; numpy needs it done by hand.
    np.random.seed(torch.initial_seed() % 2**32)


def build_loaders(cfg: dict, train_set, val_set, rank: int = 0, world_size: int = 1):
    """(train loader, val loader, train generator). With several processes the training set is split by
    a DistributedSampler (call set_epoch each epoch) and the validation set is dealt round-robin without
    padding, so all-reduced metrics cover every validation image exactly once. Images of different sizes
    are padded to the largest of their batch (data.collate)."""
    common = dict(
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        worker_init_fn=_seed_numpy_in_worker,
        pin_memory=torch.cuda.is_available(),
        collate_fn=data.collate,
    )
    generator = torch.Generator().manual_seed(cfg["seed"])  # its state is checkpointed for exact resume
    drop_last = bool(cfg.get("drop_last", False)) and len(train_set) >= cfg["batch_size"]
    if world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg["seed"])
        train_loader = DataLoader(train_set, sampler=sampler, generator=generator, drop_last=drop_last, **common)
        val_set = Subset(val_set, range(rank, len(val_set), world_size))
    else:
        train_loader = DataLoader(train_set, shuffle=True, generator=generator, drop_last=drop_last, **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader, generator


# ----------------------------------------------------------------------------- model and training
def build_model(cfg: dict, device: torch.device | str = "cpu") -> nn.Module:
    model = models.build_model(cfg, SCHEMA).to(device)
    if cfg.get("pretrained"):  # say which layers the file did not fit: a partial start is never silent
        copied, kept = model.pretrained_layers
        kept_text = f"; kept at their initialisation (shapes differ): {', '.join(kept)}" if kept else ""
        print(f"pretrained {cfg['pretrained']}: copied {len(copied)} layers ({', '.join(copied)}){kept_text}")
    return model


def build_loss(cfg: dict | None = None) -> nn.Module:
    """The training loss of the config's keys loss, ohem_*, aux_weight, boundary_* (utils/losses.py); without a
    config, cross-entropy over the labelled pixels."""
    if cfg is None:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    keys = ("loss", "ohem_thresh", "ohem_min_kept", "aux_weight", "boundary_weight", "boundary_thresh")
    return SegmentationLoss(**{k: cfg[k] for k in keys}, ignore_index=IGNORE_INDEX)


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adam":
        amsgrad = bool(cfg.get("amsgrad", True))
        return torch.optim.Adam(params, lr=cfg["lr"], amsgrad=amsgrad, weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; choices: sgd, adam")


def lr_factor(epoch: int, cfg: dict) -> float:
    """LR multiplier for 0-based `epoch`. 'step': x0.1 at int(0.5*E) and int(0.8*E) (never at epoch 0);
    'poly': (1 - epoch/E)^0.9; 'steplr': lr_gamma^(epoch // lr_step) (PyTorch's StepLR stepped once per
    epoch). It depends only on the config, so a resumed run with a new --epochs follows the schedule of an
    uninterrupted run of that length."""
    epochs = cfg["epochs"]
    if cfg["scheduler"] == "steplr":
        return float(cfg["lr_gamma"]) ** (epoch // int(cfg["lr_step"]))
    if cfg["scheduler"] == "poly":
        return max(0.0, 1.0 - epoch / epochs) ** POLY_POWER
    milestones = [int(point * epochs) for point in LR_DECAY_POINTS]
    return 0.1 ** sum(1 for m in milestones if 0 < m <= epoch)


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer):
    """Epoch-wise LambdaLR over lr_factor (step once per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg))


def resolve_device(cfg: dict, local_rank: int = 0) -> torch.device:
    wanted = cfg.get("device") or "auto"
    if wanted == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise ValueError(f"unknown device {wanted!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {wanted!r} was asked for but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def build_logger(cfg: dict, run_dir, enabled: bool = True) -> RunLogger:
    return RunLogger(run_dir, cfg, enabled=enabled, use_wandb=bool(cfg.get("wandb")))


if __name__ == "__main__":
    print(
        "setup.py is not a packaging script: it holds the builders that train.py and test.py import.\n"
        "Install the dependencies with `pip install -r requirements.txt` (or `conda env create -f environment.yml`)\n"
        "and run the scripts from the repository root, e.g. `python train.py`.",
        file=sys.stderr,
    )
    sys.exit(1)
