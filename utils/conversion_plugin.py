"""test.py's conversion step: `--conversion` turns the ANN checkpoint into SNNs and evaluates them.

    python test.py --model_path ann.pth --conversion --timesteps 8,16,32,64,128 \
        --threshold_type layer,channel,neuron --results results.json

For every threshold type and T: fold BN, calibrate the thresholds on `--calib_batches` batches of the
training split (or reuse those cached in the ANN checkpoint as thresholds[type][str(T)]; the checkpoint
is rewritten atomically when new ones are found), scale them by `--scaling_factor`, evaluate. The first
(type, T) is the model of test.py's main results; all of them, and the ANN's mIoU, go into the JSON
results as `conversion`, and a PNG plot of mIoU versus T is written.
"""

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import data
from models.conversion import (
    CONVERSION_ENCODERS,
    THRESHOLD_TYPES,
    apply_thresholds,
    cached_thresholds,
    calibrate_thresholds,
    check_thresholds,
    convert_ann,
    store_thresholds,
)
from models.neurons import conversion_neurons
from utils.checkpoint import FORMAT, save_checkpoint
from utils.plots import save_figure


def _comma_list(kind, choices=None):
    def parse(text):
        items = [item.strip() for item in str(text).split(",") if item.strip()]
        try:
            values = [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        bad = [v for v in values if (choices and v not in choices) or (kind is int and v < 1)]
        if bad:
            allowed = f"one of {', '.join(choices)}" if choices else "positive integers"
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not allowed here; expected {allowed}")
        return values

    return parse


def add_test_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("ANN-to-SNN conversion (--conversion)")
    group.add_argument(
        "--conversion",
        action="store_true",
        help="convert the ANN checkpoint into an SNN by threshold balancing and evaluate it",
    )
    group.add_argument(
        "--timesteps",
        type=_comma_list(int),
        default=[20],
        help="T, or a comma list (8,16,32) to evaluate each (default 20)",
    )
    group.add_argument(
        "--threshold_type",
        "--threshold-type",
        type=_comma_list(str, THRESHOLD_TYPES),
        default=["layer"],
        help="layer, channel or neuron, or a comma list of them (default layer)",
    )
    group.add_argument(
        "--percentile",
        type=float,
        default=None,
        help="threshold statistic: this percentile of the input currents instead of the max",
    )
    group.add_argument(
        "--calib_batches",
        "--calib-batches",
        type=int,
        default=1,
        help="training batches used for calibration (the paper used 1)",
    )
    group.add_argument(
        "--scaling_factor",
        "--scaling-factor",
        type=float,
        default=0.7,
        help="thresholds = statistic x this factor (default 0.7)",
    )
    group.add_argument(
        "--leak_mem",
        "--leak-mem",
        type=float,
        default=1.0,
        help="membrane leak of the converted SNN (1.0 = IF neurons; the paper ran 0.99)",
    )
    group.add_argument(
        "--neuron",
        dest="conversion_neuron",
        choices=conversion_neurons(),
        default="lif",
        help="neurons of the converted SNN, those whose class declares 'converts' (lif: leak --leak_mem; if: "
        "no leak) (default lif)",
    )
    group.add_argument(
        "--reset",
        dest="conversion_reset",
        choices=("subtract", "zero"),
        default="subtract",
        help="reset of the converted SNN's neurons after a spike (default subtract)",
    )
    group.add_argument(
        "--conversion_encoder",
        "--conversion-encoder",
        choices=CONVERSION_ENCODERS,
        default="poisson",
        help="input coding of the converted SNN (default poisson)",
    )
    group.add_argument(
        "--unit_spikes",
        "--unit-spikes",
        action="store_true",
        help="spikes of weight 1 as in the paper's code, instead of folding each layer's "
        "threshold into the weights that read its spikes",
    )
    group.add_argument(
        "--reset_thresholds",
        "--reset-thresholds",
        action="store_true",
        help="calibrate again even if the checkpoint caches thresholds for this type and T",
    )
    group.add_argument(
        "--save_snn",
        "--save-snn",
        type=str,
        default=None,
        help="write the converted SNN as a checkpoint; {type} and {T} in the path save each one",
    )
    group.add_argument(
        "--conversion_plot",
        "--conversion-plot",
        type=str,
        default=None,
        help="PNG of mIoU vs T (default: next to --results, else next to the checkpoint)",
    )


def _check_args(args, cfg):
    if cfg["model_type"] != "ann":
        raise ValueError(f"--conversion needs an ANN checkpoint; {args.model_path} holds a {cfg['model_type']!r} model")
    if args.calib_batches < 1:
        raise ValueError(f"--calib_batches must be >= 1, got {args.calib_batches}")
    if args.scaling_factor <= 0:
        raise ValueError(f"--scaling_factor must be > 0, got {args.scaling_factor}")
    if args.percentile is not None and not 0 < args.percentile <= 100:
        raise ValueError(f"--percentile must be in (0, 100], got {args.percentile}")
    if not 0 < args.leak_mem <= 1:
        raise ValueError(f"--leak_mem must be in (0, 1], got {args.leak_mem}")


def calibration_batches(cfg: dict, count: int, seed: int, device) -> list:
    """The first `count` shuffled batches of the training split, without augmentation."""
    train_set = data.build_dataset({**cfg, "augment": False}, "train")
    loader = DataLoader(
        train_set,
        batch_size=cfg["batch_size"],
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = []
    for x, _ in loader:
        batches.append(x.to(device))
        if len(batches) == count:
            break
    return batches


def calibration_settings(args, cfg) -> dict:
    """What the raw thresholds depend on besides (type, T); cached thresholds must match it."""
    return {
        "statistic": "max" if args.percentile is None else f"percentile {args.percentile:g}",
        "calib_batches": args.calib_batches,
        "leak_mem": args.leak_mem,
        "encoder": args.conversion_encoder,
        "unit_spikes": args.unit_spikes,
        "img_size": cfg["img_size"],
        "batch_size": cfg["batch_size"],
        # only when not the default, so that thresholds cached before these settings existed still match
        **({"neuron": args.conversion_neuron} if args.conversion_neuron != "lif" else {}),
        **({"reset": args.conversion_reset} if args.conversion_reset != "subtract" else {}),
    }


def converted_snn(ctx, threshold_type: str, timesteps: int, batches):
    """The SNN for (type, T) with its scaled thresholds, calibrated now or taken from the cache."""
    args = ctx.args
    snn = convert_ann(
        ctx.model, timesteps, args.leak_mem, args.conversion_encoder, args.conversion_neuron, args.conversion_reset
    )
    settings = calibration_settings(args, ctx.cfg)
    raw = None if args.reset_thresholds else cached_thresholds(ctx.checkpoint, threshold_type, timesteps, settings)
    where = f"{args.model_path} thresholds[{threshold_type!r}][{str(timesteps)!r}]"
    if raw is not None:
        check_thresholds(raw, snn, threshold_type, where)  # a malformed cache is an error, not a silent recompute
        print(f"using cached {threshold_type} thresholds for T={timesteps} from {args.model_path}")
    else:
        if batches[0] is None:
            batches[0] = calibration_batches(ctx.cfg, args.calib_batches, args.seed, ctx.device)
        torch.manual_seed(args.seed)
        raw = calibrate_thresholds(
            snn, batches[0], threshold_type, args.percentile, fold_amplitude=not args.unit_spikes
        )
        store_thresholds(ctx.checkpoint, threshold_type, timesteps, raw, settings)
        save_checkpoint(args.model_path, ctx.checkpoint)  # at once: a long sweep may be interrupted
        print(f"cached the new {threshold_type} thresholds for T={timesteps} in {args.model_path}")
    apply_thresholds(snn, raw, threshold_type, args.scaling_factor, fold_amplitude=not args.unit_spikes)
    return snn.to(ctx.device).eval()


def prepare_model(ctx):
    args = ctx.args
    if not args.conversion:
        return ctx.model
    _check_args(args, ctx.cfg)
    torch.manual_seed(args.seed)
    ann_miou = ctx.evaluate(desc="ANN")["miou"]
    print(f"ANN mIoU {ann_miou:.4f}")
    combos = [(kind, steps) for kind in args.threshold_type for steps in args.timesteps]
    batches, miou, models = [None], {}, {}
    for index, (kind, steps) in enumerate(combos):
        snn = converted_snn(ctx, kind, steps, batches)
        if index == 0:
            models[(kind, steps)] = snn  # evaluated by test.py itself, as the main result
            continue
        torch.manual_seed(args.seed)
        miou[(kind, steps)] = ctx.evaluate(model=snn, cfg=snn.config, desc=f"{kind} T={steps}")["miou"]
        print(f"converted SNN, {kind} thresholds, T={steps}: mIoU {miou[(kind, steps)]:.4f}")
        _maybe_save(ctx, snn, kind, steps, miou[(kind, steps)], first=False)
    first = combos[0]
    ctx.extras["conversion"] = {"ann_miou": ann_miou, "miou": miou, "first": first, "snn": models[first]}
    ctx.cfg = dict(models[first].config)
    torch.manual_seed(args.seed)  # the main evaluation sees the same Poisson stream as every other one
    return models[first]


def analyze(ctx, results: dict):
    args = ctx.args
    if not getattr(args, "conversion", False):
        return
    state = ctx.extras["conversion"]
    first = state["first"]
    state["miou"][first] = results["miou"]
    _maybe_save(ctx, state["snn"], *first, results["miou"], first=True)
    curves = {
        kind: {str(steps): state["miou"][(kind, steps)] for steps in args.timesteps} for kind in args.threshold_type
    }
    plot_path = _plot_path(args)
    plot_curves(curves, state["ann_miou"], plot_path, title=f"{ctx.cfg['arch']} on {ctx.cfg['dataset']}")
    results["conversion"] = {
        "ann_miou": state["ann_miou"],
        "miou": curves,
        "retention": {
            kind: {t: (m / state["ann_miou"] if state["ann_miou"] else None) for t, m in row.items()}
            for kind, row in curves.items()
        },
        "scaling_factor": args.scaling_factor,
        "statistic": "max" if args.percentile is None else f"percentile {args.percentile:g}",
        "calib_batches": args.calib_batches,
        "leak_mem": args.leak_mem,
        "encoder": args.conversion_encoder,
        "unit_spikes": args.unit_spikes,
        "plot": str(plot_path),
    }
    print(format_curves(curves, state["ann_miou"]))
    print(f"wrote {plot_path}")


def format_curves(curves: dict, ann_miou: float) -> str:
    steps = list(next(iter(curves.values())))
    lines = ["mIoU vs T (ANN " + f"{ann_miou:.4f})", "type     " + "".join(f"{'T=' + t:>9}" for t in steps)]
    for kind, row in curves.items():
        lines.append(f"{kind:<9}" + "".join(f"{row[t]:>9.4f}" for t in steps))
    return "\n".join(lines)


def plot_curves(curves: dict, ann_miou: float, path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, row in curves.items():
        ax.plot([int(t) for t in row], list(row.values()), marker="o", label=f"{kind}-wise")
    ax.axhline(ann_miou, color="gray", linestyle="--", label="ANN")
    ax.set_xscale("log", base=2)
    steps = sorted({int(t) for row in curves.values() for t in row})
    ax.set_xticks(steps, [str(t) for t in steps])
    ax.minorticks_off()
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("mIoU")
    ax.set_title(f"ANN-to-SNN conversion {title}".strip(), fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, plt, path)  # atomic; a failed write names the file


def _plot_path(args) -> Path:
    if args.conversion_plot:
        return Path(args.conversion_plot)
    if args.results:
        results = Path(args.results)
        return results.with_name(results.stem + "_conversion.png")
    return Path(args.model_path).with_name(Path(args.model_path).stem + "_conversion.png")


def _maybe_save(ctx, snn, kind, steps, miou, first: bool):
    """--save_snn: each (type, T) if the path has {type}/{T} in it, otherwise only the first."""
    path = ctx.args.save_snn
    if not path:
        return
    per_model = "{T}" in path or "{type}" in path
    if not (per_model or first):
        return
    target = Path(path.replace("{T}", str(steps)).replace("{type}", kind))
    save_checkpoint(
        target,
        {
            "format": FORMAT,
            "config": dict(snn.config),
            "state_dict": snn.state_dict(),
            "epoch": ctx.checkpoint.get("epoch"),
            "best_miou": float(miou),
            "conversion": {
                "source": str(ctx.args.model_path),
                "threshold_type": kind,
                "timesteps": steps,
                "scaling_factor": ctx.args.scaling_factor,
                "leak_mem": ctx.args.leak_mem,
                "encoder": ctx.args.conversion_encoder,
                "percentile": ctx.args.percentile,
            },
        },
    )
    print(f"saved the converted SNN ({kind}, T={steps}) to {target}")
