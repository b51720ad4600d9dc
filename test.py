"""Evaluate a checkpoint on the validation/test split of its dataset.

    python test.py --model_path trained_models/quickstart-snn/best.pth --results results.json
    python test.py --list --model_dir trained_models

Besides the evaluation, test.py runs the steps in STEPS: ANN-to-SNN conversion (utils/conversion_plugin.py)
and the analyses (utils/analysis.py). Each step module defines any of
    add_test_args(parser)            add its flags (e.g. --conversion, --count_spikes, --attack)
    check_args(args)                 refuse bad flag values, called before any work
    prepare_model(ctx) -> model      replace the model before evaluation (e.g. ANN -> SNN conversion)
    analyze(ctx, results)            run after the clean evaluation; add its entries to `results`
where `ctx` is an EvalContext (args, cfg, checkpoint, model, loader, device, class names, evaluate).
Every flag is checked before the checkpoint is evaluated: an output that cannot be written, a value out of
range or a flag that does nothing without another is one line, not a failure after a long evaluation.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import data
import setup
from common import files
from common.cli import ArgumentParser, run_main
from models.conversion import cached_thresholds, conversion_problems
from models.graph import layer_graph
from models.protocol import NotSupported
from utils import analysis, conversion_plugin, preflight
from utils.allocator import POLICIES, set_cpu_malloc
from utils.checkpoint import build_model_from_checkpoint, is_converted_snn, load_checkpoint
from utils.config import NATIVE_SIZE, SCHEMA, check_img_size, check_value, coerce, parse_size
from utils.evaluation import evaluate as evaluate_loader
from utils.logging import to_json
from utils.published_import import protocol_problem
from utils.runs import interrupt_handling

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
        return evaluate(
            model or self.model, self.loader, cfg or self.cfg, self.device, input_transform=input_transform, desc=desc
        )


OVERRIDES = ("data_root", "dataset", "img_size", "batch_size", "num_workers", "neuron_backend")


def get_args_parser(add_help: bool = True, plugins=()) -> ArgumentParser:
    parser = ArgumentParser(description="Evaluate a segmentation checkpoint (mIoU and more).", add_help=add_help)
    parser.add_argument("--model_path", "--model-path", type=str, help="checkpoint to evaluate (.pth)")
    parser.add_argument("--list", action="store_true", help="list the checkpoints under --model_dir and exit")
    parser.add_argument("--model_dir", "--model-dir", type=str, default="trained_models")
    parser.add_argument("--results", type=str, help="write the metrics as JSON to this file")
    overrides = parser.add_argument_group("overrides of the checkpoint's config")
    for name in OVERRIDES:  # read and checked as train.py reads them (utils/config.py)
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        overrides.add_argument(
            *spellings, dest=name, default=None, nargs="+" if name == "img_size" else None, help=SCHEMA[name].help
        )
    parser.add_argument("--device", type=str, default="auto")
    parser.add_argument(
        "--cpu_malloc",
        "--cpu-malloc",
        default="auto",
        choices=POLICIES,
        help="C heap policy (utils/allocator.py): auto (balanced), keep is faster on CPU, release uses less memory",
    )
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
    cfg = dict(checkpoint_cfg)
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            try:
                cfg[key] = coerce(key, getattr(args, key))
                check_value(key, cfg[key])
            except ValueError as err:
                raise ValueError(f"--{key}: {err}") from None
    check_value("dataset", cfg["dataset"])
    check_img_size(cfg, "--img_size" if args.img_size is not None else f"{source}'s img_size")
    info = data.dataset_info(cfg["dataset"], cfg)
    if int(info["num_classes"]) != int(cfg["num_classes"]) or int(info["in_channels"]) != int(cfg["in_channels"]):
        raise ValueError(
            f"{source} was trained for {cfg['num_classes']} classes / {cfg['in_channels']} input channels; "
            f"dataset {cfg['dataset']!r} has {info['num_classes']} / {info['in_channels']}"
        )
    cfg["device"] = args.device
    cfg["pretrained"] = None  # the checkpoint holds the weights; the file they once started from may be gone
    setup.check_inputs(cfg)
    return cfg


def class_names_for(cfg: dict) -> list:
    return list(data.dataset_info(cfg["dataset"], cfg)["class_names"])


def build_val_loader(cfg: dict) -> DataLoader:
    val_set = data.build_dataset(cfg, "val")
    return DataLoader(
        val_set,
        batch_size=cfg["batch_size"],
        shuffle=False,
        num_workers=cfg.get("num_workers", 0),
        collate_fn=data.collate,
    )


def results_dict(metrics: dict, cfg: dict, class_names: list, model_path) -> dict:
    per_class = dict(zip(class_names, metrics["per_class_iou"]))
    return {
        "miou": metrics["miou"],
        "pixel_acc": metrics["pixel_acc"],
        "mean_acc": metrics["mean_acc"],
        "fwiou": metrics["fwiou"],
        "per_class_iou": per_class,
        "num_pixels": metrics["num_pixels"],
        "model_type": cfg["model_type"],
        "arch": cfg["arch"],
        "dataset": cfg["dataset"],
        "timesteps": cfg["timesteps"] if cfg["model_type"] == "snn" else None,
        "img_size": cfg["img_size"],
        "model_path": str(model_path),
    }


def format_iou_table(results: dict) -> str:
    width = max([len(name) for name in results["per_class_iou"]] + [5])
    lines = [f"{'class':<{width}}  IoU"]
    for name, iou in results["per_class_iou"].items():
        lines.append(f"{name:<{width}}  " + ("  -   (absent)" if iou != iou else f"{iou:.4f}"))
    lines.append(f"{'mIoU':<{width}}  {results['miou']:.4f}")
    lines.append(
        f"pixel acc {results['pixel_acc']:.4f}, mean acc {results['mean_acc']:.4f}, fwIoU {results['fwiou']:.4f}"
    )
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
        rows.append(
            f"{path}  {cfg.get('model_type')} {cfg.get('arch')} {cfg.get('dataset')} T={cfg.get('timesteps')} "
            f"epoch={ckpt.get('epoch')} best_miou={best:.4f}"
            if isinstance(best, float)
            else f"{path}  {cfg.get('model_type')} {cfg.get('arch')} {cfg.get('dataset')} T={cfg.get('timesteps')}"
        )
    return rows


def given_flags(argv, plugins, dests) -> list:
    """Which of `dests` the command line sets (a value equal to the default counts too), each as the
    user typed it (its option string, e.g. '--neuron' for the dest conversion_neuron)."""
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    parser = get_args_parser(plugins=plugins)
    parsed = parser.parse_args(argv, argparse.Namespace(**{d: unset for d in dests}))
    return [typed_flag(parser, argv, dest) for dest in dests if getattr(parsed, dest) is not unset]


def typed_flag(parser, argv, dest) -> str:
    """The option string of `dest` as it appears in `argv` (the last one given; an abbreviation too)."""
    spellings = [opt for action in parser._actions if action.dest == dest for opt in action.option_strings]
    typed = [token.split("=", 1)[0] for token in argv if str(token).startswith("-")]
    found = [t for t in typed if t in spellings] or [t for t in typed if any(o.startswith(t) for o in spellings)]
    return found[-1] if found else (spellings[0] if spellings else f"--{dest}")


def plugin_flags(plugin) -> list:
    """The dests of the flags a plugin adds."""
    probe = argparse.ArgumentParser(add_help=False)
    plugin.add_test_args(probe)
    return list(vars(probe.parse_args([])))


def check_paths(args):
    """Every file test.py reads or writes, before any work (utils/preflight.py): inputs exist and are
    files, outputs can be written and replace none of the inputs."""
    inputs = [("--model_path", args.model_path, "file"), ("--compare", getattr(args, "compare", None), "file")]
    preflight.check_inputs(inputs)
    outputs = [("--results", args.results, "file")]
    if getattr(args, "save_predictions", None):
        outputs.append(("--save_predictions", args.save_predictions, "folder"))
    if getattr(args, "plot", False):
        outputs.append(("--plot_dir", args.plot_dir, "folder"))
    if getattr(args, "conversion", False):
        outputs.append(("--conversion_plot", conversion_plugin._plot_path(args), "file"))
        if args.save_snn:
            combos = [(kind, steps) for kind in args.threshold_type for steps in args.timesteps]
            per_model = "{T}" in args.save_snn or "{type}" in args.save_snn
            for kind, steps in combos if per_model else combos[:1]:
                path = args.save_snn.replace("{T}", str(steps)).replace("{type}", kind)
                outputs.append(("--save_snn", path, "file"))
    preflight.check_outputs(outputs, inputs=inputs)
    for what, path, kind in outputs:  # an existing output is replaced only by one of its own kind
        if kind == "file" and path:
            files.check_replace(path, what, *OUTPUT_KINDS[what])


def is_results_file(path) -> bool:
    """A results JSON that test.py --results wrote (its metrics and the checkpoint they are of)."""
    try:
        results = json.loads(Path(path).read_bytes()[: 1 << 24])
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and {"miou", "per_class_iou", "model_path"} <= results.keys()


# What an existing output may be to be replaced: (its description, the test of its content).
OUTPUT_KINDS = {
    "--results": ("a results JSON of test.py", is_results_file),
    "--save_snn": ("an SNN that test.py --save_snn wrote", is_converted_snn),
    "--conversion_plot": ("an image", files.is_image),
}


def check_flags(args, argv, plugins):
    """Flags that cannot work, before any work: paths (check_paths), the seed, plugin values out of
    range, and conversion settings given without --conversion (they would be ignored)."""
    check_paths(args)
    try:
        check_value("seed", args.seed)
    except ValueError as err:
        raise ValueError(f"--seed: {err}") from None
    for plugin in plugins:
        if hasattr(plugin, "check_args"):
            plugin.check_args(args)
        if plugin is conversion_plugin and not args.conversion:
            ignored = given_flags(argv, plugins, [d for d in plugin_flags(plugin) if d != "conversion"])
            if ignored:
                raise ValueError(
                    f"{ignored[0]} applies to --conversion (ANN-to-SNN conversion) only; add --conversion or drop it"
                )


def check_conversion(args, cfg, checkpoint):
    """--conversion calibrates on stacked training batches and caches the thresholds in the checkpoint:
    both must be possible before the ANN is evaluated and the layers calibrated."""
    if not getattr(args, "conversion", False) or cfg["model_type"] != "ann":
        return  # the plugin itself refuses an SNN checkpoint
    if cfg["img_size"] == NATIVE_SIZE and cfg["batch_size"] > 1 and cfg["dataset"] == "voc2012":
        raise ValueError(
            "--conversion calibrates on batches of native-size VOC images, which cannot be stacked: "
            "pass --img_size H W or --batch_size 1"
        )
    settings = conversion_plugin.calibration_settings(args, cfg)
    cached = all(
        cached_thresholds(checkpoint, kind, steps, settings) is not None
        for kind in args.threshold_type
        for steps in args.timesteps
    )
    problem = None if cached and not args.reset_thresholds else files.output_problem(args.model_path)
    if problem:
        copy = Path(args.model_path).with_name(Path(args.model_path).stem + "-thresholds.pth")
        raise ValueError(
            f"--conversion caches the thresholds it calibrates in {args.model_path}, which cannot be "
            f"written ({problem}): copy it (cp {args.model_path} {copy.name}) to a writable folder "
            f"and pass the copy as --model_path"
        )


def check_layers(args, model):
    """Every tool asked for can handle every layer of the model (models/protocol.py), before any data is read:
    one line naming the layer and the tool otherwise."""
    if getattr(args, "conversion", False) and not model.spiking:
        problems = conversion_problems(model)
        if problems:
            raise ValueError(f"--conversion: {problems[0]}")
    if getattr(args, "energy", False):
        try:
            layer_graph(model, parse_size(model.config.get("img_size")) or (64, 64)).check("--energy")
        except NotSupported as err:
            raise ValueError(str(err)) from None


def check_resources(args, cfg, loader, device):
    """Before any work: one evaluation batch (at the largest T asked for) fits in the memory of `device`
    (utils/preflight.py's estimate)."""
    size = preflight.largest_input_size(loader.dataset, cfg)
    if size is None:
        return
    conversion = getattr(args, "conversion", False) and cfg["model_type"] == "ann"
    steps = max(args.timesteps) if conversion else cfg["timesteps"] if cfg["model_type"] == "snn" else 1
    preflight.check_memory(
        cfg,
        cfg["batch_size"],
        steps,
        size,
        device,
        training=False,
        what="the converted SNN's evaluation" if conversion else "the evaluation",
        lower=("--timesteps, " if steps > 1 else "") + "--batch_size or --img_size",
    )


def evaluated(cfg: dict, ctx) -> str:
    """What the table below it is of: the checkpoint's model, or the SNN converted from it."""
    conversion = ctx.extras.get("conversion")
    if conversion is None:
        return f"{cfg['model_type']} {cfg['arch']}"
    kind, steps = conversion["first"]
    return (
        f"the SNN converted from this {cfg['model_type'].upper()} ({ctx.cfg['arch']}, {kind}-wise thresholds, "
        f"T={steps}; the ANN scored mIoU {conversion['ann_miou']:.4f})"
    )


def main(argv=None):
    with interrupt_handling():  # SIGTERM ends it as Ctrl-C does: a file being written is discarded whole
        evaluate_checkpoint(argv)


def evaluate_checkpoint(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = STEPS
    args = get_args_parser(plugins=plugins).parse_args(argv)
    if args.list:
        rows = list_checkpoints(args.model_dir)
        print("\n".join(rows) if rows else f"no checkpoints (*.pth) under {args.model_dir}")
        return
    if not args.model_path:
        raise ValueError("give a checkpoint with --model_path PATH (or --list to see those in --model_dir)")
    check_flags(args, argv, plugins)
    checkpoint = load_checkpoint(args.model_path)
    cfg = eval_config(checkpoint["config"], args, args.model_path)
    protocol = protocol_problem(checkpoint, cfg)  # weights imported from a published repository
    if protocol:
        raise ValueError(f"{args.model_path} {protocol}: evaluate it without --img_size / --dataset")
    check_conversion(args, cfg, checkpoint)
    device = setup.resolve_device(cfg)
    set_cpu_malloc(args.cpu_malloc)
    torch.manual_seed(args.seed)
    model = build_model_from_checkpoint(checkpoint, args.model_path, overrides=cfg).to(device)
    check_layers(args, model)
    loader = build_val_loader(cfg)
    check_resources(args, cfg, loader, device)
    ctx = EvalContext(args, cfg, checkpoint, model, loader, device, class_names_for(cfg))
    for plugin in plugins:
        if hasattr(plugin, "prepare_model"):
            ctx.model = plugin.prepare_model(ctx)
    results = results_dict(ctx.evaluate(), ctx.cfg, ctx.class_names, args.model_path)
    print(f"{args.model_path}: {evaluated(cfg, ctx)} on {cfg['dataset']} val ({len(ctx.loader.dataset)} images)")
    print(format_iou_table(results))
    for plugin in plugins:
        if hasattr(plugin, "analyze"):
            plugin.analyze(ctx, results)
    if args.results:
        files.atomic_write_bytes(args.results, (to_json(results, indent=2) + "\n").encode())
        print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(run_main(main))
