"""Convert DOTA-style oriented-box labels (labelTxt/*.txt) with their images to geoalign shards.

Each 8-point polygon becomes its axis-aligned box (clipped to the image), named by its category.

    python tools/convert_dota.py --images DOTA/train/images --labels DOTA/train/labelTxt --split train \
        --out data/dota [--name dota] [--skip-difficult] [--categories plane ship ...]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--labels", required=True, help="labelTxt folder (one .txt per image)")
    parser.add_argument("--split", default="train", help="split name of these images")
    parser.add_argument("--name", default="dota", help="dataset name (shard file prefix)")
    parser.add_argument("--categories", nargs="*", default=None,
                        help="category list fixing category_id order (default: sorted names found)")
    parser.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult (1)")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return converters.run_cli(lambda: converters.convert_dota(
        args.images, args.labels, args.out, name=args.name, split=args.split, categories=args.categories,
        skip_difficult=args.skip_difficult, **converters.common_kwargs(args)))


if __name__ == "__main__":
    sys.exit(main())
