"""Render samples (input | label | optional prediction) to PNG.

    python -m data.visualize --dataset synthetic --split val --index 0 1 2 3 --out samples.png
    python -m data.visualize --dataset ddd17 --data-root DDD17 --split val --index 0 --out ddd17.png

render_sample(x, y, dataset, pred=None) -> PIL.Image is the building block for
prediction grids: image inputs are un-normalised to RGB; event inputs (the last frame of
a THL window) show the first chosen channel (positive events by default) in red and the
second (negative events) in blue; labels and predictions use the dataset's palette with
ignored pixels (255) white.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cli import ArgumentParser, run_main
from common.files import atomic_path, check_replace, is_image
from data import build_dataset, dataset_info
from data.palettes import IGNORE_COLOUR
from data.registry import EVENTS, get
from data.transforms import denormalize_image


def colourize(mask, palette) -> np.ndarray:
    """[H, W] class indices -> uint8 RGB [H, W, 3]; 255 and unknown indices in IGNORE_COLOUR."""
    table = np.array([IGNORE_COLOUR] * 256, dtype=np.uint8)
    table[: len(palette)] = np.array(palette, dtype=np.uint8)
    return table[np.asarray(mask, dtype=np.int64).clip(0, 255)]


def input_to_rgb(x: torch.Tensor, dataset: str) -> np.ndarray:
    """Dataset input [C, H, W] (or [T, C, H, W]: last frame) -> uint8 RGB [H, W, 3]."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[-1]
    if get(dataset).modality != EVENTS:
        return denormalize_image(x).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    level = ((x + 0.5).clamp(0, 1) * 255).byte().numpy()  # events are scaled to [-0.5, 0.5]
    rgb = np.zeros(x.shape[1:] + (3,), dtype=np.uint8)
    rgb[..., 0] = level[0]
    if len(level) > 1:
        rgb[..., 2] = level[1]
    else:
        rgb[..., 1] = rgb[..., 2] = level[0]
    return rgb


def render_sample(x, y, dataset, pred=None) -> Image.Image:
    """One row: input | label | prediction (if given), each at the input's size."""
    palette = dataset_info(dataset)["palette"]
    panels = [input_to_rgb(x, dataset), colourize(y, palette)]
    if pred is not None:
        panels.append(colourize(pred, palette))
    gap = np.full((panels[0].shape[0], 2, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return Image.fromarray(np.concatenate(row, axis=1))


def render_grid(rows) -> Image.Image:
    """Stack rendered rows vertically (rows may differ in width)."""
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height + 2 for r in rows)), IGNORE_COLOUR)
    top = 0
    for r in rows:
        grid.paste(r, (0, top))
        top += r.height + 2
    return grid


def _main(argv):
    parser = ArgumentParser(prog="python -m data.visualize", description="render dataset samples")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--index", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--img-size", type=int, nargs="+", default=None)
    parser.add_argument("--channels", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scale", type=int, default=1, help="enlarge the picture by this factor")
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args(argv)
    check_replace(args.out, "--out", "an image", is_image)
    cfg = dict(dataset=args.dataset, data_root=args.data_root, channels=args.channels, img_size=args.img_size)
    ds = build_dataset(cfg, args.split)
    try:
        grid = render_grid([render_sample(*ds[i], args.dataset) for i in args.index])
    except IndexError as err:
        raise ValueError(f"--index: {err}") from None
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    with atomic_path(args.out) as tmp:
        grid.save(tmp, format=Image.registered_extensions().get(Path(args.out).suffix.lower(), "PNG"))
    print(f"wrote {args.out} ({len(args.index)} samples)")


def main(argv=None) -> int:
    """Exit code 0, or 2 with one `error:` line (common/cli.py)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
