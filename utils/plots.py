"""Pictures for the analysis: prediction grids (Pillow only) and charts (matplotlib, optional).

Prediction grids use the data package's renderer (data.visualize.render_sample / render_grid): one row per
image, input | ground truth | prediction, labels in the dataset's palette (VOC, the 6-colour DDD17 one, ...),
ignored pixels white; image inputs are un-normalised to RGB, event inputs show positive events in red and
negative events in blue. Small images are enlarged by an integer factor (nearest) so that they can be seen.
Charts need matplotlib; without it they are skipped with a message (the caller gets None).

The training run's picture (`activity_grid`, `save_activity_grid`): the prediction grid with a fourth column,
the activity of one layer per pixel (spiking networks: its firing rate, spikes per neuron and timestep averaged
over its channels; ANNs: its mean ReLU output), coloured by matplotlib's viridis map, and a header naming the
columns. `layer_activity` records it with a forward hook.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.files import atomic_path
from data.visualize import render_grid, render_sample
from utils.evaluation import to_model_input

MIN_ROW_HEIGHT = 128


def upscale_factor(height: int) -> int:
    return max(1, -(-MIN_ROW_HEIGHT // height))


def prediction_grid(samples, dataset: str) -> Image.Image:
    """samples: (x, prediction, target) per image -> one grid, enlarged for small images."""
    rows = [render_sample(x, target, dataset, pred=prediction) for x, prediction, target in samples]
    if not rows:
        raise ValueError("no images to draw: the split is empty or --num_pictures is 0")
    grid = render_grid(rows)
    factor = upscale_factor(rows[0].height)
    return grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST) if factor > 1 else grid


def write_image(image, path) -> Path:
    """Save a PIL image atomically (common/files.py): a failed write (disk full) is a WriteError naming
    `path`, and leaves no half-written file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


def save_prediction_grid(samples, path, dataset: str) -> Path:
    return write_image(prediction_grid(samples, dataset), path)


# --------------------------------------------------------------------------- the training run's picture
ACTIVITY_COLOURMAP = "viridis"
HEADER_HEIGHT = 16


def activity_unit(model):
    """(name, module) of the layer the picture shows: the architecture's choice (``picture_layer``)."""
    return model.picture_layer()


@torch.no_grad()
def layer_activity(model, images: torch.Tensor, cfg: dict, device) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(layer name, predictions [N, H, W], activity [N, h, w]) for a batch of images, in eval mode.

    Activity: the layer's output averaged over its channels and all timesteps the network ran (for a
    spiking layer, its firing rate)."""
    model.eval()
    name, unit = activity_unit(model)
    seen = []
    hook = unit.register_forward_hook(lambda module, args, out: seen.append(out.detach().float()))
    try:
        logits = model(to_model_input(images.to(device), cfg))
    finally:
        hook.remove()
    out = seen[0]
    steps = out.shape[0] // images.shape[0]
    activity = out.reshape(steps, images.shape[0], *out.shape[1:]).mean(dim=(0, 2))
    return name, logits.argmax(dim=1).cpu(), activity.cpu()


def activity_panel(activity: np.ndarray, vmax: float, size) -> np.ndarray:
    """[h, w] activity -> uint8 RGB [H, W, 3] in the colour map (0 .. vmax), enlarged to `size` (nearest)."""
    import matplotlib

    level = np.clip(np.asarray(activity, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0)
    rgb = (matplotlib.colormaps[ACTIVITY_COLOURMAP](level)[..., :3] * 255).round().astype(np.uint8)
    if rgb.shape[:2] != tuple(size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.NEAREST))
    return rgb


def activity_grid(samples, dataset: str, layer: str, spiking: bool) -> Image.Image:
    """samples: (x, prediction, target, activity) per image -> rows input | ground truth | prediction |
    activity, enlarged for small images, under a header that names the columns (and the activity scale)."""
    if not samples:
        raise ValueError("no images to draw: the validation split is empty")
    vmax = max(float(np.max(a)) for *_, a in samples)
    rows = []
    for x, prediction, target, activity in samples:
        row = np.asarray(render_sample(x, target, dataset, pred=prediction))
        size = np.asarray(target).shape[-2:]  # every panel is at the label's size
        gap = np.full((row.shape[0], 2, 3), 255, dtype=np.uint8)
        panel = activity_panel(activity, vmax, size)
        rows.append(Image.fromarray(np.concatenate([row, gap, panel], axis=1)))
    grid = render_grid(rows)
    factor = upscale_factor(rows[0].height)
    if factor > 1:
        grid = grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST)
    kind = f"spikes {layer} (rate 0-{vmax:.2f})" if spiking else f"{layer} (mean 0-{vmax:.2f})"
    titles = ["input", "ground truth", "prediction", kind]
    out = Image.new("RGB", (grid.width, grid.height + HEADER_HEIGHT), (255, 255, 255))
    out.paste(grid, (0, HEADER_HEIGHT))
    draw, column = ImageDraw.Draw(out), grid.width / 4
    for k, title in enumerate(titles):
        draw.text((round(k * column) + 2, 2), title, fill=(0, 0, 0))
    return out


def save_activity_grid(model, dataset, cfg: dict, device, path, count: int = 4) -> Path:
    """The first `count` images of `dataset` through `model`: `activity_grid` written to `path` (PNG)."""
    count = min(count, len(dataset))
    items = [dataset[i] for i in range(count)]
    images = torch.stack([x for x, _ in items])
    layer, predictions, activity = layer_activity(model, images, cfg, device)
    samples = [(x, p, y, a.numpy()) for (x, y), p, a in zip(items, predictions, activity)]
    return write_image(activity_grid(samples, cfg["dataset"], layer, cfg["model_type"] == "snn"), path)


# ------------------------------------------------------------------------------------------- charts
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, plt, path):
    """fig.savefig atomically (a failed write names `path`), format from the suffix; closes the figure."""
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def plot_firing_rates(spikes: list, path):
    """Bar chart of the firing rate of each spiking layer (entries of the results' 'spikes' list)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(spikes) + 1.5), 3.5))
    ax.bar(range(len(spikes)), [row["rate"] for row in spikes], color="tab:blue")
    ax.set_xticks(range(len(spikes)))
    ax.set_xticklabels([row["name"] for row in spikes], rotation=45, ha="right")
    ax.set_ylabel("firing rate (spikes / neuron / step)")
    ax.set_title("Firing rate per spiking layer")
    return save_figure(fig, plt, path)


def plot_robustness(curves: dict, attack: str, path):
    """mIoU versus corruption factor; curves: label -> (factors, mious)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (factors, mious) in curves.items():
        ax.plot(factors, mious, marker="o", label=label)
    ax.set_xlabel(f"{attack} factor")
    ax.set_ylabel("mIoU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Robustness to {attack}")
    return save_figure(fig, plt, path)
