"""Inspect and rewrite checkpoints.

    python converter.py inspect trained_models/quickstart-ann/best.pth
    python converter.py import-paper paper_ann.pth -o trained_models/paper-ann.pth
    python converter.py import-published sltnet STLNet_DDD17_Test.pth -o trained_models/sltnet-ddd17.pth
    python converter.py thresholds paper_ann.pth --type layer -o paper_ann_nested.pth
    python converter.py state-dict paper_ann.pth -o paper_ann_convs.pth
    python converter.py export-nir trained_models/quickstart-deployable/best.pth -o quickstart.nir

Every file is read with torch.load(weights_only=True): a checkpoint that carries code is refused, never run
(import-published allows the numpy scalars and arrays that SLTNet's and Spike-BRGNet's checkpoints hold).
"""

import argparse
import sys

from common import files
from common.cli import ArgumentParser, run_main
from models.neurons import NEURONS
from utils import preflight
from utils.checkpoint import (
    FORMAT,
    CheckpointError,
    build_model_from_checkpoint,
    checkpoint_kind,
    save_checkpoint,
    validate_checkpoint,
)
from utils.nir_export import add_export_args, require_nir, run_export
from utils.paper_import import conv_weights_only, import_paper_checkpoint, is_paper_checkpoint, read_weights_only
from utils.published_import import SOURCES, import_published

THRESHOLD_TYPES = ("layer", "channel", "neuron")
# The kind of checkpoint each rewriting command writes (utils/checkpoint.py, checkpoint_kind): an existing
# -o is replaced only if it is of that kind, never a training checkpoint or another file.
OUTPUT_KINDS = {
    "import-paper": ("imported", "a checkpoint that import-paper wrote"),
    "import-published": ("imported", "a checkpoint that an import command wrote"),
    "thresholds": ("paper", "a checkpoint of the paper's repository"),
    "state-dict": ("paper", "a checkpoint of the paper's repository"),
}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "threshold")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Inspect and rewrite SNN segmentation checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser(
        "inspect", help="format, config, epoch, best mIoU, layers, neurons (reset, leak, thresholds), thresholds"
    )
    inspect.add_argument("path", help="checkpoint (ours or the paper repository's)")
    inspect.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    paper = sub.add_parser("import-paper", help="turn a checkpoint of the paper's repository into ours")
    paper.add_argument("path", help="checkpoint written by the paper's code")
    paper.add_argument("-o", "--output", required=True, help="where to write our checkpoint")
    paper.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    published = sub.add_parser(
        "import-published",
        help="turn a checkpoint of SLTNet's or Spike-BRGNet's repository into ours (docs/models.md)",
    )
    published.add_argument("arch", choices=sorted(SOURCES), help="whose code wrote it")
    published.add_argument("path", help="checkpoint written by that code (e.g. SLTNet's model_best_miou.pth)")
    published.add_argument("-o", "--output", required=True, help="where to write our checkpoint")
    window = published.add_mutually_exclusive_group()
    window.add_argument(
        "--window_ms", type=float, help="it was trained on windows of this many ms (default: the released run's)"
    )
    window.add_argument(
        "--window_events", type=int, help="it was trained on windows of this many events (default: the released run's)"
    )
    published.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    nest = sub.add_parser("thresholds", help="nest flat thresholds {T: [...]} as {TYPE: {T: [...]}}")
    nest.add_argument("path")
    nest.add_argument("--type", required=True, choices=THRESHOLD_TYPES, help="threshold type they were found with")
    nest.add_argument("-o", "--output", required=True)
    nest.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    convs = sub.add_parser("state-dict", help="keep only the conv weights, renumbered (for conversion)")
    convs.add_argument("path", help="checkpoint of the paper's repository")
    convs.add_argument("-o", "--output", required=True)
    convs.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    export = sub.add_parser("export-nir", help="write an SNN as a NIR graph (docs/deployment.md)")
    add_export_args(export)
    export.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------ inspect
def inspect_lines(checkpoint, path) -> list:
    if is_paper_checkpoint(checkpoint):
        kind, cfg = "paper repository (import it with `converter.py import-paper`)", _paper_view(checkpoint["config"])
        best = checkpoint.get("max_miou")
    else:
        validate_checkpoint(checkpoint, path)
        kind, cfg, best = checkpoint["format"], checkpoint["config"], checkpoint.get("best_miou")
    state = checkpoint["state_dict"]
    params = sum(v.numel() for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES))
    lines = [
        f"file        {path}",
        f"format      {kind}",
        f"model       {cfg.get('model_type')} {cfg.get('arch')}",
        f"dataset     {cfg.get('dataset')} ({cfg.get('num_classes')} classes, {cfg.get('in_channels')} input channels)",
        f"image size  {cfg.get('img_size')}",
        f"timesteps   {cfg.get('timesteps') if cfg.get('model_type') == 'snn' else '- (ANN)'}",
        f"epoch       {checkpoint.get('epoch')}",
        f"best mIoU   {best:.4f}" if isinstance(best, (int, float)) else f"best mIoU   {best}",
        f"state dict  {len(state)} tensors, {params:,} parameters (buffers not counted)",
    ]
    lines += [f"  {key:<40} {tuple(value.shape)}" for key, value in state.items()]
    if not is_paper_checkpoint(checkpoint) and cfg.get("model_type") == "snn":
        lines += neuron_lines(checkpoint, path)
    lines += threshold_lines(checkpoint.get("thresholds"))
    return lines


def neuron_lines(checkpoint, path) -> list:
    """The neuron model and each neuron layer's reset, leak and threshold, as the layer describes itself
    (Neuron.describe), from the model the checkpoint rebuilds."""
    cfg = checkpoint["config"]
    kind = cfg.get("neuron", "lif")
    ignored = NEURONS[kind].ignores.get("detach_reset") if kind in NEURONS else None
    reset_gradient = ignored or f"detach_reset {str(cfg.get('detach_reset', True)).lower()}"
    head = f"neurons     {kind}, {reset_gradient}"
    try:
        model = build_model_from_checkpoint(checkpoint, path)
    except (CheckpointError, ValueError, KeyError, RuntimeError) as err:
        return [f"{head} (the model does not rebuild: {str(err).splitlines()[0]})"]
    layers = [(name, layer) for name, layer in model.named_modules() if layer in set(model.neuron_layers())]
    lines = [f"{head}, {len(layers)} layers"]
    for name, layer in layers:
        info = layer.describe()
        lines.append(f"  {name:<28} reset {info['reset']}; leak {info['leak']}; threshold {info['threshold']}")
    return lines


def _paper_view(config) -> dict:
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    return {
        "model_type": config.get("model_type"),
        "arch": config.get("architecture"),
        "dataset": dataset.get("name"),
        "num_classes": dataset.get("num_cls"),
        "in_channels": dataset.get("input_dim"),
        "img_size": config.get("img_size"),
        "timesteps": config.get("timesteps"),
    }


def threshold_lines(thresholds) -> list:
    if not thresholds:
        return ["thresholds  none"]
    if not isinstance(thresholds, dict):
        return [f"thresholds  malformed ({type(thresholds).__name__}, expected a dict)"]
    lines = ["thresholds"]
    for kind, table in thresholds.items():
        if isinstance(table, dict):
            entries = ", ".join(
                f"T={t}: {len(v)} layers" if isinstance(v, (list, tuple)) else f"T={t}: malformed"
                for t, v in table.items()
            )
            lines.append(f"  {kind}: {entries}")
        elif isinstance(table, (list, tuple)):
            lines.append(f"  T={kind}: {len(table)} layers (flat; nest with `converter.py thresholds`)")
        else:
            lines.append(f"  {kind}: malformed ({type(table).__name__})")
    return lines


# ---------------------------------------------------------------------------------------- rewriting
def nest_thresholds(checkpoint, path, threshold_type: str) -> dict:
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found a {type(checkpoint).__name__}")
    thresholds = checkpoint.get("thresholds")
    if thresholds is None:
        raise ValueError(f"{path}: no 'thresholds' in the checkpoint (keys: {', '.join(map(str, checkpoint))})")
    if not isinstance(thresholds, dict) or not thresholds:
        raise ValueError(f"{path}: 'thresholds' must be a non-empty dict {{T: [per-layer thresholds]}}")
    nested = [k for k in thresholds if k in THRESHOLD_TYPES]
    if nested:
        raise ValueError(f"{path}: thresholds are already nested by type ({', '.join(nested)})")
    for steps, values in thresholds.items():
        if not str(steps).isdigit() or not isinstance(values, (list, tuple)):
            raise ValueError(f"{path}: thresholds entry {steps!r} is not T -> list of per-layer thresholds")
    return {**checkpoint, "thresholds": {threshold_type: {str(k): list(v) for k, v in thresholds.items()}}}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.command == "export-nir":
        require_nir()  # a missing package first: no path can fix that
    inputs = [("the input", args.path, "file")]
    preflight.check_inputs(inputs)
    if getattr(args, "output", None):  # never replaces its input: refused before anything is read
        preflight.check_outputs([("-o", args.output, "file")], inputs=inputs)
        if args.command in OUTPUT_KINDS:  # nor a file of another kind (export-nir: utils/nir_export.py)
            kind, description = OUTPUT_KINDS[args.command]
            files.check_replace(args.output, "-o", description, lambda path: checkpoint_kind(path) == kind)
    if args.command == "export-nir":
        return run_export(args)
    if args.command == "import-published":
        for flag in ("window_ms", "window_events"):
            value = getattr(args, flag)
            if value is not None and not value > 0:
                raise ValueError(f"--{flag} must be > 0, got {value:g}")
        result, what = import_published(args.arch, args.path, args.window_ms, args.window_events)
        save_checkpoint(args.output, result)
        print(f"wrote {args.output}: {what}")
        return
    checkpoint = read_weights_only(args.path)
    if args.command == "inspect":
        print("\n".join(inspect_lines(checkpoint, args.path)))
        return
    if args.command == "import-paper":
        result = import_paper_checkpoint(checkpoint, args.path)
        cfg = result["config"]
        what = f"{cfg['model_type']} {cfg['arch']} ({cfg['dataset']}, {cfg['num_classes']} classes)"
    elif args.command == "thresholds":
        result = nest_thresholds(checkpoint, args.path, args.type)
        what = f"thresholds nested under {args.type!r}"
    else:
        if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
            raise ValueError(
                f"{args.path} is a snnseg checkpoint: state-dict applies to checkpoints of the "
                f"paper's repository (test.py --conversion folds BN of ours directly)"
            )
        result = conv_weights_only(checkpoint, args.path)
        what = f"{len(result['state_dict'])} conv weights kept"
    save_checkpoint(args.output, result)
    print(f"wrote {args.output}: {what}")


if __name__ == "__main__":
    sys.exit(run_main(main))
