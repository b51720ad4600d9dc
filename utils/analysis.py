"""test.py's analysis step: spike activity, energy estimate, robustness sweeps and prediction pictures.

    python test.py --model_path SNN.pth --count_spikes --energy --compare ANN.pth --results r.json
    python test.py --model_path SNN.pth --attack gaussiannoise --atk_factor 0,0.1,0.2 --plot
    python test.py --model_path SNN.pth --save_predictions pictures --num_pictures 4

What each number means and how it is computed: docs/analysis.md. Operation counting: utils/energy.py.
"""

from pathlib import Path

import torch

from data.corruptions import apply_corruption
from utils import plots
from utils.checkpoint import load_model
from utils.energy import AC_ENERGY_PJ, MAC_ENERGY_PJ, OpCounter
from utils.evaluation import to_model_input

ATTACKS = ("gaussiannoise", "saltpepper", "gaussianblur")


def add_test_args(parser):
    group = parser.add_argument_group("analysis (utils/analysis.py)")
    group.add_argument(
        "--count_spikes",
        "--count-spikes",
        action="store_true",
        help="per spiking layer: spikes per image, neurons, firing rate",
    )
    group.add_argument("--energy", action="store_true", help="MACs / SOPs and energy per image (45 nm constants)")
    group.add_argument(
        "--mac_energy_pj",
        "--mac-energy-pj",
        type=float,
        default=MAC_ENERGY_PJ,
        help="energy of one multiply-accumulate in pJ",
    )
    group.add_argument(
        "--ac_energy_pj",
        "--ac-energy-pj",
        type=float,
        default=AC_ENERGY_PJ,
        help="energy of one accumulate (synaptic operation) in pJ",
    )
    group.add_argument(
        "--analysis_images",
        "--analysis-images",
        type=int,
        default=0,
        help="images of the split used by --count_spikes/--energy (0 = all)",
    )
    group.add_argument(
        "--compare",
        type=str,
        metavar="ANN.pth",
        help="also evaluate this checkpoint (an ANN) and report the energy ratio",
    )
    group.add_argument("--attack", choices=ATTACKS, help="evaluate under this input corruption")
    group.add_argument(
        "--atk_factor", "--atk-factor", type=str, default="0", help="corruption strength(s), a comma list (0 = clean)"
    )
    group.add_argument("--plot", action="store_true", help="draw PNG charts (needs matplotlib) into --plot_dir")
    group.add_argument("--plot_dir", "--plot-dir", type=str, default="analysis_plots")
    group.add_argument(
        "--save_predictions",
        "--save-predictions",
        type=str,
        metavar="DIR",
        help="write PNG grids (input, prediction, ground truth) into DIR",
    )
    group.add_argument("--num_pictures", "--num-pictures", type=int, default=4)


def analyze(ctx, results: dict):
    args = ctx.args
    check_args(args)
    other = load_compared_model(ctx) if args.compare else None
    if other is not None:
        results["compare"] = {"model_path": str(args.compare), "model_type": other.config["model_type"]}
    if args.count_spikes or args.energy:
        analyze_activity(ctx, results, other)
    if args.attack:
        analyze_robustness(ctx, results, other)
    if args.save_predictions:
        paths = save_predictions(ctx, args.save_predictions, args.num_pictures)
        print("wrote " + ", ".join(map(str, paths)))
    if args.plot:
        draw_plots(args, results)


def check_args(args):
    for flag in ("mac_energy_pj", "ac_energy_pj"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("analysis_images", "num_pictures"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.attack:
        parse_factors(args.atk_factor)


def parse_factors(text: str) -> list:
    try:
        factors = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--atk_factor must be a comma list of numbers, got {text!r}") from None
    if not factors or any(f < 0 for f in factors):
        raise ValueError(f"--atk_factor needs one or more factors >= 0, got {text!r}")
    return factors


def load_compared_model(ctx):
    model = load_model(ctx.args.compare).to(ctx.device)
    cfg = model.config
    for key in ("num_classes", "in_channels"):
        if int(cfg[key]) != int(ctx.cfg[key]):
            raise ValueError(
                f"--compare {ctx.args.compare} has {key}={cfg[key]}, but the evaluated model "
                f"({ctx.args.model_path}) has {key}={ctx.cfg[key]}"
            )
    return model


# ------------------------------------------------------------------------------------------- activity
@torch.no_grad()
def measure_activity(
    model,
    loader,
    cfg: dict,
    device,
    max_images: int = 0,
    seed: int = 0,
    count_spikes: bool = True,
    count_ops: bool = True,
):
    """Run the model over (the first max_images of) the loader; returns (spike rows, op summary or None,
    input_size [C, H, W], images). Spike rows are those of model.spike_stats() (empty for an ANN)."""
    model.eval()
    spiking = bool(getattr(model, "spiking", False)) and count_spikes
    torch.manual_seed(seed)  # the Poisson encoder draws from the global generator
    if spiking:
        model.reset_spike_stats()
        model.record_spikes(True)
    counter = OpCounter(model) if count_ops else None
    images, input_size = 0, None
    try:
        if counter is not None:
            counter.__enter__()
        for x, _ in loader:
            if max_images:
                x = x[: max_images - images]
            input_size = list(x.shape[-3:])
            model(to_model_input(x.to(device), cfg))
            images += x.shape[0]
            if max_images and images >= max_images:
                break
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
        if spiking:
            model.record_spikes(False)
    return (spike_rows(model.spike_stats()) if spiking else []), counter, input_size, images


def spike_rows(stats: list) -> list:
    """{name, neurons, levels, spikes_per_image, rate, firing, steps} per layer. Spikes are events: a spike of
    level k counts k, as energy counts its synaptic operations; rate = spikes / neurons / simulated steps (up to
    the declared levels); firing = the fraction of neuron-steps that emit at all (at most 1; equal to the rate
    for binary spikes)."""
    rows = []
    for layer in stats:
        images, steps, neurons = layer["images"], layer["steps"], layer["neurons"]
        per_image = layer["spikes"] / images if images else 0.0
        firing = layer.get("firing", layer["spikes"]) / images if images else 0.0
        neuron_steps = neurons * steps
        rows.append(
            {
                "name": layer["name"],
                "neurons": neurons,
                "levels": layer.get("levels", 1),
                "spikes_per_image": per_image,
                "rate": per_image / neuron_steps if neuron_steps else 0.0,
                "firing": firing / neuron_steps if neuron_steps else 0.0,
                "steps": steps,
            }
        )
    return rows


def spike_totals(rows: list) -> dict:
    spikes = sum(row["spikes_per_image"] for row in rows)
    firing = sum(row["firing"] * row["neurons"] * row["steps"] for row in rows)
    neuron_steps = sum(row["neurons"] * row["steps"] for row in rows)
    return {
        "spikes_per_image": spikes,
        "neurons": sum(row["neurons"] for row in rows),
        "levels": max((row["levels"] for row in rows), default=1),
        "rate": spikes / neuron_steps if neuron_steps else 0.0,
        "firing": firing / neuron_steps if neuron_steps else 0.0,
    }


def analyze_activity(ctx, results: dict, other=None):
    args = ctx.args
    rows, counter, input_size, images = measure_activity(
        ctx.model,
        ctx.loader,
        ctx.cfg,
        ctx.device,
        args.analysis_images,
        args.seed,
        count_spikes=args.count_spikes,
        count_ops=args.energy,
    )
    if args.count_spikes:
        if rows:
            results["spikes"] = rows
            results["spikes_total"] = spike_totals(rows)
            print(format_spike_table(rows, results["spikes_total"], images))
        else:
            print("--count_spikes: the model has no spiking layers (an ANN): nothing to count")
    if not args.energy:
        return
    energy = counter.summary(args.mac_energy_pj, args.ac_energy_pj)
    energy.update(input_size=input_size, images=images, model_type=ctx.cfg["model_type"])
    results["energy"] = energy
    print(format_energy(energy, f"{ctx.cfg['model_type'].upper()} ({ctx.args.model_path})"))
    if other is not None:
        compare_energy(ctx, results, other)


def compare_energy(ctx, results: dict, other):
    args = ctx.args
    _, counter, input_size, images = measure_activity(
        other, ctx.loader, ctx.cfg, ctx.device, args.analysis_images, args.seed, count_spikes=False, count_ops=True
    )
    energy = counter.summary(args.mac_energy_pj, args.ac_energy_pj)
    energy.update(input_size=input_size, images=images, model_type=other.config["model_type"])
    torch.manual_seed(args.seed)
    miou = ctx.evaluate(model=other, desc="compare")["miou"]
    own = results["energy"]["energy_mj"]
    ratio = energy["energy_mj"] / own if own else float("inf")
    results["compare"].update(miou=miou, energy=energy, energy_ratio=ratio)
    print(format_energy(energy, f"{other.config['model_type'].upper()} ({args.compare})"))
    print(
        f"compared model mIoU {miou:.4f}; energy ratio {other.config['model_type']} / "
        f"{ctx.cfg['model_type']} = {ratio:.2f}x"
    )


def format_spike_table(rows: list, totals: dict, images: int) -> str:
    width = max([len(row["name"]) for row in rows] + [5])
    multi = any(row["levels"] > 1 for row in rows)
    lines = [
        f"spikes over {images} images, rate = spikes / neurons / steps (steps = {rows[0]['steps']} simulated)"
        + (
            "; a spike of level k counts k (as energy counts it), firing = share of neuron-steps that emit"
            if multi
            else ""
        ),
        f"{'layer':<{width}}  {'neurons':>9}  {'spikes/image':>13}  {'rate':>7}"
        + (f"  {'levels':>6}  {'firing':>7}" if multi else ""),
    ]
    for row in rows + [dict(totals, name="total")]:
        line = f"{row['name']:<{width}}  {row['neurons']:>9d}  {row['spikes_per_image']:>13.1f}  {row['rate']:>7.4f}"
        if multi:
            line += f"  {row['levels']:>6d}  {row['firing']:>7.4f}"
        lines.append(line)
    return "\n".join(lines)


def format_energy(energy: dict, title: str) -> str:
    width = max([len(row["name"]) for row in energy["per_layer"]] + [5])
    lines = [
        f"energy per image of {title}, input {energy['input_size']}, {energy['images']} images "
        f"(MAC {energy['mac_energy_pj']} pJ, AC {energy['ac_energy_pj']} pJ)",
        f"{'layer':<{width}}  {'input':<6}  {'MACs':>10}  {'SOPs':>10}  {'mJ':>9}",
    ]
    for row in energy["per_layer"]:
        lines.append(
            f"{row['name']:<{width}}  {row['input']:<6}  {row['macs']:>10.4g}  {row['sops']:>10.4g}  "
            f"{row['energy_mj']:>9.3g}"
        )
    lines.append(
        f"{'total':<{width}}  {'':<6}  {energy['macs']:>10.4g}  {energy['sops']:>10.4g}  {energy['energy_mj']:>9.3g}"
    )
    if energy["sops"]:
        lines.append(f"(the rate x dense-MACs shortcut would give {energy['sops_rate_estimate']:.4g} SOPs)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- robustness
class CorruptInputs:
    """input_transform for ctx.evaluate: data.corruptions.apply_corruption on every image of every batch.

    Image k of the split (in loader order) gets seed ``seed + k``, so the noise does not depend on the batch
    size and every evaluation of the same factor sees the same corrupted inputs.
    """

    def __init__(self, kind: str, factor: float, dataset: str, seed: int = 0):
        self.apply = apply_corruption
        self.kind, self.factor, self.dataset, self.seed = kind, float(factor), dataset, int(seed)
        self.seen = 0

    def __call__(self, x: torch.Tensor, y=None) -> torch.Tensor:
        corrupted = [
            self.apply(x[i].cpu(), self.kind, self.factor, self.dataset, self.seed + self.seen + i)
            for i in range(x.shape[0])
        ]
        self.seen += x.shape[0]
        return torch.stack(corrupted).to(device=x.device, dtype=x.dtype)


def analyze_robustness(ctx, results: dict, other=None):
    args = ctx.args
    rows = []
    for factor in parse_factors(args.atk_factor):
        row = {"attack": args.attack, "factor": factor}
        for key, model in (("", ctx.model), ("compare_", other)):
            if model is None:
                continue
            torch.manual_seed(args.seed)
            metrics = ctx.evaluate(
                model=model,
                desc=f"{args.attack} {factor:g}",
                input_transform=CorruptInputs(args.attack, factor, ctx.cfg["dataset"], args.seed),
            )
            row.update({f"{key}{name}": metrics[name] for name in ("miou", "pixel_acc", "mean_acc", "fwiou")})
        rows.append(row)
        extra = f", compared model {row['compare_miou']:.4f}" if other is not None else ""
        print(f"{args.attack} factor {factor:g}: mIoU {row['miou']:.4f}{extra}")
    results["robustness"] = rows


# ------------------------------------------------------------------------------------------- pictures
@torch.no_grad()
def collect_predictions(model, loader, cfg: dict, device, count: int, seed: int = 0, input_transform=None) -> list:
    """(x, prediction, target) for the first `count` images of the loader."""
    model.eval()
    torch.manual_seed(seed)
    samples = []
    for x, y in loader:
        if len(samples) >= count:
            break
        x = x.to(device)
        if input_transform is not None:
            x = input_transform(x, y)
        prediction = model(to_model_input(x, cfg)).argmax(dim=1).cpu()
        samples.extend(zip(x.cpu(), prediction, y))
    return samples[:count]


def save_predictions(ctx, out_dir, count: int) -> list:
    """predictions.png (clean inputs), and with --attack predictions_<attack>_<factor>.png per factor."""
    if count == 0:
        return []
    dataset, out_dir = ctx.cfg["dataset"], Path(out_dir)
    samples = collect_predictions(ctx.model, ctx.loader, ctx.cfg, ctx.device, count, ctx.args.seed)
    paths = [plots.save_prediction_grid(samples, out_dir / "predictions.png", dataset)]
    if ctx.args.attack:  # the same images under each corruption
        for factor in parse_factors(ctx.args.atk_factor):
            corrupt = CorruptInputs(ctx.args.attack, factor, dataset, ctx.args.seed)
            samples = collect_predictions(ctx.model, ctx.loader, ctx.cfg, ctx.device, count, ctx.args.seed, corrupt)
            paths.append(
                plots.save_prediction_grid(samples, out_dir / f"predictions_{ctx.args.attack}_{factor:g}.png", dataset)
            )
    return paths


def draw_plots(args, results: dict):
    out = Path(args.plot_dir)
    drawn = []
    if results.get("spikes"):
        drawn.append(plots.plot_firing_rates(results["spikes"], out / "firing_rates.png"))
    if results.get("robustness"):
        rows = results["robustness"]
        curves = {results.get("model_type", "model").upper(): ([r["factor"] for r in rows], [r["miou"] for r in rows])}
        if "compare_miou" in rows[0]:
            label = results["compare"]["model_type"].upper()
            curves[f"{label} (--compare)"] = ([r["factor"] for r in rows], [r["compare_miou"] for r in rows])
        drawn.append(plots.plot_robustness(curves, args.attack, out / f"robustness_{args.attack}.png"))
    drawn = [str(path) for path in drawn if path is not None]
    if drawn:
        results["plots"] = drawn
        print("wrote " + ", ".join(drawn))
    elif not results.get("spikes") and not results.get("robustness"):
        print("--plot: nothing to draw (add --count_spikes on an SNN or --attack)")
