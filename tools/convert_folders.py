"""Convert a class-per-folder scene classification set (UCM, AID, RESISC45, EuroSAT, WHU-RS19) to shards.

root/<ClassName>/*.jpg|png|tif: label = index in sorted folder names, class_name = readable folder name.

    python tools/convert_folders.py --root AID --out data/aid --name aid [--split test]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder with one sub-folder per class")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--split", default="test", help="split name for all images (default: test, zero-shot eval)")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return converters.run_cli(lambda: converters.convert_folders(
        args.root, args.out, name=args.name, split=args.split, **converters.common_kwargs(args)))


if __name__ == "__main__":
    sys.exit(main())
