"""Write and validate split lists for VOC2012 and DDD17 (flags only).

# VOC: write a standard split's list (only ids whose image and mask exist), or build the
# SBD train_aug list (every SegmentationClassAug mask with an image, minus the val ids)
python -m data.datalists --dataset voc2012 --root VOC --split train_aug
python -m data.datalists --dataset voc2012 --root VOC --split train --out my_train.txt
# validate a list (files exist; --deep also decodes every image/mask and checks labels and events); a split's
# name instead of a list file checks that split (VOC: its list; DDD17: every frame of its folder)
python -m data.datalists --dataset voc2012 --root VOC --check my_train.txt --deep
python -m data.datalists --dataset ddd17 --root DDD17 --check train
# DDD17: frame names in (recording, frame) order; --timesteps T keeps only THL targets
python -m data.datalists --dataset ddd17 --root DDD17 --split train --out train.txt --timesteps 10
python -m data.datalists --dataset ddd17 --root DDD17 --split train --check train.txt --deep
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from common import files
from common.cli import ArgumentParser, run_main
from data.ddd17 import DDD17, NUM_EVENT_CHANNELS, frame_name
from data.voc2012 import VOC2012, find_voc_dir, missing_files, read_ids, split_list_and_masks


def voc_train_aug_ids(voc_dir: Path):
    """SBD-augmented training ids: masks in SegmentationClassAug with an image, excluding VOC val."""
    mask_dir = voc_dir / "SegmentationClassAug"
    if not mask_dir.is_dir():
        raise FileNotFoundError(
            f"{mask_dir} not found: unpack SegmentationClassAug there (see README.md, section Data)"
        )
    val = set(read_ids(voc_dir / "ImageSets" / "Segmentation" / "val.txt"))
    ids = sorted(p.stem for p in mask_dir.glob("*.png") if p.stem not in val)
    return [i for i in ids if (voc_dir / "JPEGImages" / f"{i}.jpg").is_file()]


def write_voc(root, split, out):
    voc_dir = find_voc_dir(root)
    if split == "train_aug":
        ids = voc_train_aug_ids(voc_dir)
        out = out or voc_dir / "ImageSets" / "Segmentation" / "train_aug.txt"
    else:
        list_path, mask_dir = split_list_and_masks(voc_dir, split)
        listed = read_ids(list_path)
        missing = set(missing_files(voc_dir, mask_dir, listed))
        ids = [i for i in listed if i not in missing]
        if out is None:
            raise ValueError("--out is required for VOC splits other than train_aug")
    return _write(out, ids)


def write_ddd17(root, split, out, timesteps):
    ds = DDD17(root, split, thl=timesteps > 1, timesteps=timesteps)
    if out is None:
        raise ValueError("--out is required for DDD17 lists")
    return _write(out, [frame_name(ds.frame_keys(i)[-1]) for i in range(len(ds))])


def _write(out, names):
    if not names:
        raise ValueError(f"no entries to write to {out}")
    out = Path(out)
    files.check_replace(out, "--out", "a text list", files.is_text)  # e.g. never a checkpoint
    files.atomic_write_bytes(out, "".join(f"{n}\n" for n in names).encode())
    return out, len(names)


DDD17_SPLITS = ("train", "test")


def check(dataset, root, split, list_path, deep):
    """Open the list as the dataset would (which names missing entries); --deep reads every item. A split's
    name that is not a file checks that split (VOC: its list file; DDD17: all the frames of its folder)."""
    if dataset == "voc2012":
        ds = VOC2012(root, str(list_path))
    elif str(list_path) in DDD17_SPLITS and not Path(list_path).exists():
        ds = DDD17(root, str(list_path), channels=range(NUM_EVENT_CHANNELS))
    else:
        ds = DDD17(root, split, datalist=list_path, channels=range(NUM_EVENT_CHANNELS))  # --deep: all channels
    if deep:
        for i in tqdm(range(len(ds)), desc=f"checking {list_path}", unit="item"):
            ds[i]
    return len(ds)


def get_args_parser():
    parser = ArgumentParser(
        prog="python -m data.datalists", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=["voc2012", "ddd17"])
    parser.add_argument("--root", required=True, help="dataset root (see README.md, section Data)")
    parser.add_argument("--split", default="train", help="voc2012: train/val/trainval/train_aug; ddd17: train/test")
    parser.add_argument("--out", help="list file to write")
    parser.add_argument(
        "--check",
        metavar="LIST",
        help="validate this list (or a split's name: its list or folder) instead of writing one",
    )
    parser.add_argument("--deep", action="store_true", help="with --check: decode and validate every item")
    parser.add_argument("--timesteps", type=int, default=1, help="ddd17: keep only frames with T-1 predecessors")
    return parser


def _main(argv):
    args = get_args_parser().parse_args(argv)
    if args.out and not args.check:  # before any list is read
        files.check_replace(args.out, "--out", "a text list", files.is_text)
    if args.check:
        n = check(args.dataset, args.root, args.split, args.check, args.deep)
        print(f"{args.check}: {n} entries OK")
    elif args.dataset == "voc2012":
        out, n = write_voc(args.root, args.split, args.out)
        print(f"wrote {n} ids to {out}")
    else:
        out, n = write_ddd17(args.root, args.split, args.out, args.timesteps)
        print(f"wrote {n} frames to {out}")


def main(argv=None) -> int:
    """Exit code 0, or 2 with one `error:` line (common/cli.py)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
