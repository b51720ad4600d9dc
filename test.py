"""Evaluate a checkpoint on the validation/test split of its dataset.

    python test.py --model_path trained_models/quickstart-snn/best.pth --results results.json
    python test.py --list --model_dir trained_models

Besides the evaluation, test.py runs the steps in STEPS: ANN-to-SNN conversion (utils/conversion_plugin.py)
and the analyses (utils/analysis.py). Each step module defines any of
    add_test_args(parser)            add its flags (e.g. --conversion, --count_spikes, --attack)
    prepare_model(ctx) -> model      replace the model before evaluation (e.g. ANN -> SNN conversion)
    analyze(ctx, results)            run after the clean evaluation; add its entries to `results`
where `ctx` is an EvalContext (args, cfg, checkpoint, model, loader, device, class names, evaluate).
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import setup
from utils import analysis, conversion_plugin
from utils.allocator import POLICIES, set_cpu_malloc
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint
from utils.cli import run_main
from utils.config import normalize_size
from utils.evaluation import evaluate as evaluate_loader
from utils.logging import to_json

# In this order: the conversion may replace the model that the analyses then look at.
STEPS = (conversion_plugin, analysis)


@dataclass
class EvalContext:
    args: argparse.Namespace
    cfg: dict
    checkpoint: dict
    model: torch.nn.Module
    loader: DataLoader
    device: torch.device
    class_names: list
    extras: dict = field(default_factory=dict)

    def evaluate(self, model=None, cfg=None, input_transform=None, desc="val") -> dict:
        """Evaluate (another) model/config on this split; returns the metrics dict."""
        return evaluate(model or self.model, self.loader, cfg or self.cfg, self.device, input_transform=input_transform,
                        desc=desc)


def get_args_parser(add_help: bool = True, plugins=()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a segmentation checkpoint (mIoU and more).",
                                     add_help=add_help)
    parser.add_argument("--model_path", "--model-path", type=str, help="checkpoint to evaluate (.pth)")
    parser.add_argument("--list", action="store_true", help="list the checkpoints under --model_dir and exit")
    parser.add_argument("--model_dir", "--model-dir", type=str, default="trained_models")
    parser.add_argument("--results", type=str, help="write the metrics as JSON to this file")
    overrides = parser.add_argument_group("overrides of the checkpoint's config")
    overrides.add_argument("--data_root", "--data-root", type=str)
    overrides.add_argument("--dataset", type=str)
    overrides.add_argument("--img_size", "--img-size", type=int, nargs="+")
    overrides.add_argument("--batch_size", "--batch-size", type=int)
    overrides.add_argument("--num_workers", "--num-workers", type=int)
    parser.add_argument("--device", type=str, default="auto")
    parser.add_argument("--cpu_malloc", "--cpu-malloc", default="auto", choices=POLICIES,
                        help="C heap policy (utils/allocator.py): auto (balanced), keep is faster on CPU, "
                             "release uses less memory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the Poisson spike encoding")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    for plugin in plugins:
        if hasattr(plugin, "add_test_args"):
            plugin.add_test_args(parser)
    return parser


def evaluate(model, loader, cfg: dict, device, show_bar: bool = True, input_transform=None, desc="val") -> dict:
    """miou, pixel_acc, mean_acc, fwiou, per_class_iou (list, NaN = class absent), num_pixels."""
    return evaluate_loader(model, loader, cfg, device, show_bar=show_bar, desc=desc, input_transform=input_transform)


def eval_config(checkpoint_cfg: dict, args, source) -> dict:
    """The checkpoint's config with the command-line overrides, checked against the model."""
    import data
    cfg = dict(checkpoint_cfg)
    for key in ("data_root", "dataset", "batch_size", "num_workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.img_size is not None:
        cfg["img_size"] = normalize_size(args.img_size)
    if cfg["dataset"] not in data.DATASETS:
        raise ValueError(f"unknown dataset {cfg['dataset']!r}; choices: {', '.join(data.DATASETS)}")
    info = data.dataset_info(cfg["dataset"], cfg)
    if int(info["num_classes"]) != int(cfg["num_classes"]) or int(info["in_channels"]) != int(cfg["in_channels"]):
        raise ValueError(f"{source} was trained for {cfg['num_classes']} classes / {cfg['in_channels']} input channels; "
                         f"dataset {cfg['dataset']!r} has {info['num_classes']} / {info['in_channels']}")
    cfg["device"] = args.device
    return cfg


def class_names_for(cfg: dict) -> list:
    import data
    return list(data.dataset_info(cfg["dataset"], cfg)["class_names"])


def build_val_loader(cfg: dict) -> DataLoader:
    import data
    val_set = data.build_dataset(cfg, "val")
    return DataLoader(val_set, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg.get("num_workers", 0))


def results_dict(metrics: dict, cfg: dict, class_names: list, model_path) -> dict:
    per_class = dict(zip(class_names, metrics["per_class_iou"]))
    return {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"], "mean_acc": metrics["mean_acc"],
            "fwiou": metrics["fwiou"], "per_class_iou": per_class, "num_pixels": metrics["num_pixels"],
            "model_type": cfg["model_type"], "arch": cfg["arch"], "dataset": cfg["dataset"],
            "timesteps": cfg["timesteps"] if cfg["model_type"] == "snn" else None,
            "img_size": cfg["img_size"], "model_path": str(model_path)}


def format_iou_table(results: dict) -> str:
    width = max([len(name) for name in results["per_class_iou"]] + [5])
    lines = [f"{'class':<{width}}  IoU"]
    for name, iou in results["per_class_iou"].items():
        lines.append(f"{name:<{width}}  " + ("  -   (absent)" if iou != iou else f"{iou:.4f}"))
    lines.append(f"{'mIoU':<{width}}  {results['miou']:.4f}")
    lines.append(f"pixel acc {results['pixel_acc']:.4f}, mean acc {results['mean_acc']:.4f}, fwIoU {results['fwiou']:.4f}")
    return "\n".join(lines)


def list_checkpoints(model_dir) -> list[str]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    rows = []
    for path in sorted(model_dir.rglob("*.pth")):
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, OSError) as err:
            rows.append(f"{path}  (unreadable: {err})")
            continue
        cfg = ckpt["config"]
        best = ckpt.get("best_miou")
        rows.append(f"{path}  {cfg.get('model_type')} {cfg.get('arch')} {cfg.get('dataset')} T={cfg.get('timesteps')} "
                    f"epoch={ckpt.get('epoch')} best_miou={best:.4f}" if isinstance(best, float) else
                    f"{path}  {cfg.get('model_type')} {cfg.get('arch')} {cfg.get('dataset')} T={cfg.get('timesteps')}")
    return rows


def main(argv=None):
    plugins = STEPS
    args = get_args_parser(plugins=plugins).parse_args(argv)
    if args.list:
        rows = list_checkpoints(args.model_dir)
        print("\n".join(rows) if rows else f"no checkpoints (*.pth) under {args.model_dir}")
        return
    if not args.model_path:
        raise ValueError("give a checkpoint with --model_path PATH (or --list to see those in --model_dir)")
    checkpoint = load_checkpoint(args.model_path)
    cfg = eval_config(checkpoint["config"], args, args.model_path)
    device = setup.resolve_device(cfg)
    set_cpu_malloc(args.cpu_malloc)
    torch.manual_seed(args.seed)
    model = build_model_from_checkpoint(checkpoint, args.model_path, overrides=cfg).to(device)
    ctx = EvalContext(args, cfg, checkpoint, model, build_val_loader(cfg), device, class_names_for(cfg))
    for plugin in plugins:
        if hasattr(plugin, "prepare_model"):
            ctx.model = plugin.prepare_model(ctx)
    results = results_dict(ctx.evaluate(), ctx.cfg, ctx.class_names, args.model_path)
    print(f"{args.model_path}: {cfg['model_type']} {cfg['arch']} on {cfg['dataset']} val "
          f"({len(ctx.loader.dataset)} images)")
    print(format_iou_table(results))
    for plugin in plugins:
        if hasattr(plugin, "analyze"):
            plugin.analyze(ctx, results)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(to_json(results, indent=2) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(run_main(main))
