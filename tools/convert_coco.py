"""Convert COCO-style JSON (DIOR, NWPU VHR-10 as usually distributed; COCO caption files) to geoalign shards.

Boxes ([x, y, w, h]) become regions named by their category; `caption` annotations become captions.

    python tools/convert_coco.py --ann train=annotations/train.json --ann test=annotations/test.json \
        --images DIOR/JPEGImages --out data/dior --name dior [--workers 8]
    (per-split image folders: --images train=DIR --images test=DIR)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", action="append", required=True, metavar="SPLIT=JSON", help="COCO JSON of a split")
    parser.add_argument("--images", action="append", required=True, metavar="DIR|SPLIT=DIR",
                        help="image folder (one for all splits, or one per split)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)

    def convert() -> converters.ConversionSummary:
        image_dir = args.images[0] if len(args.images) == 1 and "=" not in args.images[0] \
            else converters.parse_key_values(args.images, "--images")
        return converters.convert_coco(converters.parse_key_values(args.ann, "--ann"), image_dir, args.out,
                                       name=args.name, **converters.common_kwargs(args))

    return converters.run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())
