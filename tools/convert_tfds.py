"""Convert a TFDS dataset that was already prepared in array_record format to geoalign shards.

Reads with `tfds.data_source` (tensorflow-datasets + importlib_resources, no TensorFlow); never downloads.

    python tools/convert_tfds.py --dataset resisc45 --splits train --data-dir ~/tensorflow_datasets \
        --out data/resisc45 [--map image=image label=label captions=captions id=filename]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import converters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="TFDS name, e.g. 'resisc45' or 'my_set:1.0.0'")
    parser.add_argument("--splits", nargs="+", required=True, help="TFDS splits to convert")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's default)")
    parser.add_argument("--name", default=None, help="dataset name (default: the TFDS name)")
    parser.add_argument("--map", nargs="*", default=None, metavar="FIELD=FEATURE",
                        help="our field (image, label, captions, long_caption, hard_negatives, id) = TFDS feature; "
                             "FEATURE 'none' drops a default")
    converters.add_common_arguments(parser)
    args = parser.parse_args(argv)

    def convert() -> converters.ConversionSummary:
        mapping = {key: (None if value.lower() == "none" else value)
                   for key, value in converters.parse_key_values(args.map, "--map").items()}
        return converters.convert_tfds(args.dataset, args.splits, args.out, data_dir=args.data_dir, name=args.name,
                                       mapping=mapping, **converters.common_kwargs(args))

    return converters.run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())
