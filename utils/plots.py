"""Pictures for the analysis: prediction grids (Pillow only) and charts (matplotlib, optional).

Prediction grids use the data package's renderer (data.visualize.render_sample / render_grid): one row per
image, input | ground truth | prediction, labels in the dataset's palette (VOC, the 6-colour DDD17 one, ...),
ignored pixels white; image inputs are un-normalised to RGB, event inputs show positive events in red and
negative events in blue. Small images are enlarged by an integer factor (nearest) so that they can be seen.
Charts need matplotlib; without it they are skipped with a message (the caller gets None).
"""

from pathlib import Path

from PIL import Image

from data.visualize import render_grid, render_sample

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


def save_prediction_grid(samples, path, dataset: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prediction_grid(samples, dataset).save(path)
    return path


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


def _save(fig, plt, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    return _save(fig, plt, path)


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
    return _save(fig, plt, path)
