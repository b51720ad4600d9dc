"""DDD17 tools: ``python -m data.ddd17 pack ROOT SPLIT OUT.h5`` packs a split into one HDF5 file.

A module of its own, so that ``python -m`` runs a module the data package has not imported already.
"""

import sys

from common.cli import ArgumentParser, run_main
from data.ddd17 import pack


def _main(argv):
    parser = ArgumentParser(prog="python -m data.ddd17", description="DDD17 tools")
    commands = parser.add_subparsers(dest="command", required=True)
    pack_cmd = commands.add_parser("pack", help="pack a split into one HDF5 file")
    pack_cmd.add_argument("root", help="folder with events/ and labels/ (Ev-SegNet layout)")
    pack_cmd.add_argument("split", help="train or test")
    pack_cmd.add_argument("out", help="output .h5 file, e.g. ROOT/train.h5 (then DDD17(ROOT) reads it)")
    pack_cmd.add_argument(
        "--compression",
        default="gzip",
        choices=["gzip", "lzf", "none"],
        help="gzip: smallest; lzf: faster to pack; none: fastest to read, as large as the .npy",
    )
    args = parser.parse_args(argv)
    n = pack(args.root, args.split, args.out, None if args.compression == "none" else args.compression)
    print(f"packed {n} frames of {args.split} into {args.out}")


def main(argv=None) -> int:
    """Exit code 0, or 2 with one `error:` line (common/cli.py)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
