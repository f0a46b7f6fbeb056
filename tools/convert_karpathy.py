"""Convert a Karpathy-style caption JSON (RSICD, RSITMD, UCM-captions, Sydney-captions) to geoalign shards.

    python tools/convert_karpathy.py --json dataset_rsicd.json --images RSICD/images --out data/rsicd \
        [--name rsicd] [--split-map restval=train] [--splits train test] [--workers 8] [--num-shards 4]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="Karpathy-layout JSON (images[].filename/split/sentences)")
    parser.add_argument("--images", required=True, help="folder holding the image files")
    parser.add_argument("--name", default=None, help="dataset name (default: the JSON's 'dataset' field)")
    parser.add_argument("--splits", nargs="*", default=None, help="keep only these splits (after --split-map)")
    parser.add_argument("--split-map", nargs="*", default=None, metavar="FROM=TO", help="rename splits")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return converters.run_cli(lambda: converters.convert_karpathy(
        args.json, args.images, args.out, name=args.name, splits=args.splits,
        split_map=converters.parse_key_values(args.split_map, "--split-map"), **converters.common_kwargs(args)))


if __name__ == "__main__":
    sys.exit(main())
