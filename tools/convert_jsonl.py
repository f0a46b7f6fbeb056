"""Convert JSONL multi-granular corpora (RSFG-100k, MGRS-200k, DGTRSD, ...) to geoalign shards.

One JSON object per line (schema and example in docs/data_format.md):
    {"image": "imgs/a.jpg", "split": "train", "captions": ["..."], "long_caption": "...",
     "hard_negatives": ["..."], "regions": [{"box": [x1, y1, x2, y2], "category": "ship", "caption": "..."}]}

    python tools/convert_jsonl.py --jsonl corpus.jsonl --out data/corpus --name rsfg [--image-root DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", nargs="+", required=True, help="JSONL file(s)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--image-root", default=None, help="image paths are relative to this (default: JSONL's folder)")
    parser.add_argument("--default-split", default="train", help="split of lines without a 'split' field")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return converters.run_cli(lambda: converters.convert_jsonl(
        args.jsonl, args.out, name=args.name, image_root=args.image_root, default_split=args.default_split,
        **converters.common_kwargs(args)))


if __name__ == "__main__":
    sys.exit(main())
