"""``python -m geoalign_jax.prepare FORMAT ...``: prepare a dataset as geoalign record shards (docs/data_format.md).

```
python -m geoalign_jax.prepare karpathy   --json dataset_rsicd.json --images RSICD/images --out data/rsicd
python -m geoalign_jax.prepare coco       --ann train=train.json --images JPEGImages --out data/dior --name dior
python -m geoalign_jax.prepare dota       --images DOTA/images --labels DOTA/labelTxt --out data/dota
python -m geoalign_jax.prepare jsonl      --jsonl corpus.jsonl --out data/corpus --name rsfg
python -m geoalign_jax.prepare folders    --root AID --out data/aid --name aid
python -m geoalign_jax.prepare tfds       --dataset resisc45 --splits train --out data/resisc45
python -m geoalign_jax.prepare mgrs       --json text_info.json --images MGRS/global_imgs --out data/mgrs
python -m geoalign_jax.prepare webdataset --shards 'RS5M/{pub11,rs3}-train-{0000..0031}.tar' --out data/rs5m --name rs5m
python -m geoalign_jax.prepare csv        --csv train=SkyScript_train.csv --csv val=SkyScript_val.csv --out data/skyscript --name skyscript
python -m geoalign_jax.prepare labels-csv --csv bench/aid/aid_img_txt_pairs_test.csv --classnames bench/aid/classnames.txt --image-root bench --out data/aid --name aid
python -m geoalign_jax.prepare segmentation --preset loveda --images LoveDA/img_dir/val --masks LoveDA/ann_dir/val --out data/loveda
```
`segmentation` (image + label-map mask folders, for `evaluate --tasks segmentation:...`) writes a folder of its own
(data/prepare_segmentation.py) and takes only its own options.
Every format also takes `--out --workers --num-shards|--records-per-shard --max-bad-fraction --min-box-visible
--overwrite --no-progress`. Prints the summary; exit status 1 (nothing written) on too much bad input or a
configuration that cannot be used, 2 on bad command-line usage.

```
python -m geoalign_jax.prepare fingerprints data/rsicd 'data/extra/*.array_record' [--workers 8]
```
writes the image fingerprint sidecars (`<shard>.hashes.npy`) that shards prepared by older versions, or
copied without them, lack, so the train/test overlap check stops decoding every training image on each
run; it lists them in the manifest's `image_hashes`. Exit status 1 naming each shard it cannot read.
Locations may be `gs://` (the sidecars and the manifest are uploaded beside the shards, each object whole).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from geoalign_jax.data import (filesystem, fingerprints, prepare_corpora, prepare_csv, prepare_detection,
                               prepare_formats, prepare_segmentation)
from geoalign_jax.data.skip_accounting import ConversionError
from geoalign_jax.error_text import run_main
from geoalign_jax.data.writers import MANIFEST_NAME, ConversionSummary

# Command-line plumbing every format shares

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every prepare format has (output, workers, sharding, bad-input policy)."""
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and check images (1 = none; output is the same for any value)")
    shards = parser.add_mutually_exclusive_group()
    shards.add_argument("--num-shards", type=int, default=None, help="shards per split (default 1)")
    shards.add_argument("--records-per-shard", type=int, default=None, help="records per shard instead")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="fail (nothing written) when more than this fraction of inputs or annotations is bad")
    parser.add_argument("--min-box-visible", type=float, default=0.5,
                        help="keep a box partly outside the image (clipped) when this fraction of it is inside")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of every `prepare_<format>` from the options of `add_common_arguments`."""
    return {"workers": args.workers, "num_shards": args.num_shards, "records_per_shard": args.records_per_shard,
            "max_bad_fraction": args.max_bad_fraction, "min_box_visible": args.min_box_visible,
            "overwrite": args.overwrite, "progress": not args.no_progress}


def parse_key_values(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """`["train=a.json", "test=b.json"]` -> {"train": "a.json", "test": "b.json"}; clear error otherwise."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConversionError(f"{option} expects KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def run_cli(prepare_dataset: Callable[[], ConversionSummary]) -> int:
    """Run one preparation, print its summary; exit status 1 with the summary on ConversionError (or a bad
    option it raises), so a shell script or a launcher stops on bad input. Interrupted (SIGINT / SIGTERM):
    one line and the shell's 128 + signal number; no manifest was written, so nothing looks prepared."""
    try:
        summary = prepare_dataset()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"error: conversion interrupted ({signal.Signals(signum).name}); the new dataset was not written "
              f"(no {MANIFEST_NAME} for it); run the same command again", file=sys.stderr)
        return 128 + signum
    print(summary.format())
    return 0


Runner = Callable[[argparse.Namespace], ConversionSummary]


@dataclasses.dataclass(frozen=True)
class Format:
    """One input layout: what it is for, its own options, and the `prepare_<format>` call."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Runner


def _karpathy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="Karpathy-layout JSON (images[].filename/split/sentences)")
    parser.add_argument("--images", required=True, help="folder holding the image files")
    parser.add_argument("--name", default=None, help="dataset name (default: the JSON's 'dataset' field)")
    parser.add_argument("--splits", nargs="*", default=None, help="keep only these splits (after --split-map)")
    parser.add_argument("--split-map", nargs="*", default=None, metavar="FROM=TO", help="rename splits")


def _karpathy(args: argparse.Namespace) -> ConversionSummary:
    return prepare_formats.prepare_karpathy(
        args.json, args.images, args.out, name=args.name, splits=args.splits,
        split_map=parse_key_values(args.split_map, "--split-map"), **common_kwargs(args))


def _coco_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", action="append", required=True, metavar="SPLIT=JSON", help="COCO JSON of a split")
    parser.add_argument("--images", action="append", required=True, metavar="DIR|SPLIT=DIR",
                        help="image folder (one for all splits, or one per split)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")


def _coco(args: argparse.Namespace) -> ConversionSummary:
    image_dir = args.images[0] if len(args.images) == 1 and "=" not in args.images[0] \
        else parse_key_values(args.images, "--images")
    return prepare_detection.prepare_coco(parse_key_values(args.ann, "--ann"), image_dir, args.out,
                                          name=args.name, **common_kwargs(args))


def _dota_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--labels", required=True, help="labelTxt folder (one .txt per image)")
    parser.add_argument("--split", default="train", help="split name of these images")
    parser.add_argument("--name", default="dota", help="dataset name (shard file prefix)")
    parser.add_argument("--categories", nargs="*", default=None,
                        help="category list fixing category_id order (default: sorted names found)")
    parser.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult (1)")


def _dota(args: argparse.Namespace) -> ConversionSummary:
    return prepare_detection.prepare_dota(
        args.images, args.labels, args.out, name=args.name, split=args.split, categories=args.categories,
        skip_difficult=args.skip_difficult, **common_kwargs(args))


def _jsonl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jsonl", nargs="+", required=True, help="JSONL file(s)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--image-root", default=None, help="image paths are relative to this (default: JSONL's folder)")
    parser.add_argument("--default-split", default="train", help="split of lines without a 'split' field")


def _jsonl(args: argparse.Namespace) -> ConversionSummary:
    return prepare_formats.prepare_jsonl(
        args.jsonl, args.out, name=args.name, image_root=args.image_root, default_split=args.default_split,
        **common_kwargs(args))


def _folders_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="folder with one sub-folder per class")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--split", default="test", help="split name for all images (default: test, zero-shot eval)")


def _folders(args: argparse.Namespace) -> ConversionSummary:
    return prepare_formats.prepare_folders(args.root, args.out, name=args.name, split=args.split,
                                           **common_kwargs(args))


def _tfds_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="TFDS name, e.g. 'resisc45' or 'my_set:1.0.0'")
    parser.add_argument("--splits", nargs="+", required=True, help="TFDS splits to prepare")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's default)")
    parser.add_argument("--name", default=None, help="dataset name (default: the TFDS name)")
    parser.add_argument("--map", nargs="*", default=None, metavar="FIELD=FEATURE",
                        help="our field (image, label, captions, long_caption, hard_negatives, id) = TFDS feature; "
                             "FEATURE 'none' drops a default")


def _tfds(args: argparse.Namespace) -> ConversionSummary:
    mapping = {key: (None if value.lower() == "none" else value)
               for key, value in parse_key_values(args.map, "--map").items()}
    return prepare_formats.prepare_tfds(args.dataset, args.splits, args.out, data_dir=args.data_dir, name=args.name,
                                        mapping=mapping, **common_kwargs(args))


def _mgrs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="MGRS JSON list (global_filepath, captions, segment)")
    parser.add_argument("--images", required=True, help="folder the global_filepath entries are relative to")
    parser.add_argument("--name", default="mgrs", help="dataset name (shard file prefix)")
    parser.add_argument("--split", default="train", help="split name of these images")
    parser.add_argument("--captions", choices=prepare_corpora.MGRS_CAPTION_RULES, default="all",
                        help="short captions: 'all' = global_caption and brief_caption; 'farslip' = FarSLIP's "
                             "scene text, global_caption else detailed_caption (configs/farslip.py s2)")


def _mgrs(args: argparse.Namespace) -> ConversionSummary:
    return prepare_corpora.prepare_mgrs(args.json, args.images, args.out, name=args.name, split=args.split,
                                        captions=args.captions, **common_kwargs(args))


def _webdataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", required=True, metavar="PATTERN",
                        help="shard files or patterns: {a,b} and {0000..0031} braces, then * ? wildcards (quote them)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--split", default="train", help="split name of these samples")
    parser.add_argument("--image-ext", nargs="+", default=list(prepare_corpora.WEBDATASET_IMAGE_EXTS),
                        help="member extensions holding the image, in order of preference")
    parser.add_argument("--caption-ext", nargs="+", default=list(prepare_corpora.WEBDATASET_CAPTION_EXTS),
                        help="member extensions holding the caption (UTF-8), in order of preference")


def _webdataset(args: argparse.Namespace) -> ConversionSummary:
    return prepare_corpora.prepare_webdataset(args.shards, args.out, name=args.name, split=args.split,
                                              image_exts=args.image_ext, caption_exts=args.caption_ext,
                                              **common_kwargs(args))


def _csv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", action="append", required=True, metavar="FILE|SPLIT=FILE",
                        help="CSV/TSV file (repeat for more; SPLIT=FILE puts a file in its own split)")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--image-column", default="filepath", help="column with the image path (default: filepath)")
    parser.add_argument("--caption-column", default="title", help="column with the caption (default: title)")
    parser.add_argument("--separator", default=None,
                        help="field separator: one character or tab/comma/semicolon/pipe (default: tab for .tsv, "
                             "else comma)")
    parser.add_argument("--image-root", default=None, help="image paths are relative to this (default: CSV's folder)")
    parser.add_argument("--split", default="train", help="split of files given without SPLIT=")


def _csv(args: argparse.Namespace) -> ConversionSummary:
    with_split = [item for item in args.csv if "=" in item]
    if with_split and len(with_split) != len(args.csv):
        raise ConversionError("--csv: give every file as SPLIT=FILE, or none")
    files = parse_key_values(with_split, "--csv") if with_split else args.csv
    return prepare_corpora.prepare_csv(files, args.out, name=args.name, image_column=args.image_column,
                                       caption_column=args.caption_column, separator=args.separator,
                                       image_root=args.image_root, split=args.split, **common_kwargs(args))


def _labels_csv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="CSV with an image-path and a label column (SkyScript / FarSLIP)")
    parser.add_argument("--classnames", required=True, help="class list, one name per line in label order")
    parser.add_argument("--name", required=True, help="dataset name (shard file prefix)")
    parser.add_argument("--image-root", default=None, help="image paths are relative to this (default: CSV's folder)")
    parser.add_argument("--split", default=None, help="split name (default: from the file name, e.g. *_test.csv, "
                                                      "else test)")
    parser.add_argument("--image-column", default="filepath")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--separator", default=None, help="field separator (default: tab for .tsv, else comma)")


def _labels_csv(args: argparse.Namespace) -> ConversionSummary:
    return prepare_csv.prepare_label_csv(
        args.csv, args.classnames, args.out, name=args.name, image_root=args.image_root, split=args.split,
        separator=args.separator, image_column=args.image_column, label_column=args.label_column,
        **common_kwargs(args))


FORMATS: dict[str, Format] = {
    "karpathy": Format("Karpathy caption JSON (RSICD, RSITMD, UCM-captions, Sydney-captions)", _karpathy_arguments,
                       _karpathy),
    "coco": Format("COCO JSON with boxes and/or captions (DIOR, NWPU VHR-10)", _coco_arguments, _coco),
    "dota": Format("DOTA labelTxt oriented boxes", _dota_arguments, _dota),
    "jsonl": Format("JSONL multi-granular corpora (one object per image; docs/data_format.md)", _jsonl_arguments,
                    _jsonl),
    "folders": Format("class-per-folder scene classification (UCM, AID, RESISC45, EuroSAT, WHU-RS19)",
                      _folders_arguments, _folders),
    "tfds": Format("TFDS dataset prepared as array_record (no TensorFlow needed)", _tfds_arguments, _tfds),
    "mgrs": Format("MGRS-200k JSON (FarSLIP stage 2): captions and segment boxes", _mgrs_arguments, _mgrs),
    "webdataset": Format("webdataset .tar shards (RS5M, FarSLIP stage 1): image + txt caption per sample",
                         _webdataset_arguments, _webdataset),
    "csv": Format("SkyScript-style CSV/TSV: image-path and caption columns", _csv_arguments, _csv),
    "labels-csv": Format("label-column CSV + classnames.txt (SkyScript / FarSLIP zero-shot benchmarks)",
                         _labels_csv_arguments, _labels_csv),
}


SEGMENTATION_HELP = ("images + single-channel label-map masks matched by file stem (open-vocabulary segmentation; "
                     "--preset for FarSLIP's 8 benchmarks)")
FINGERPRINTS_HELP = "write the missing image fingerprint sidecars of prepared shards (for the overlap check)"


def _fingerprints_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("locations", nargs="+", metavar="DIR_OR_GLOB",
                        help="prepared folders (every split), shard files or shard globs (quote them)")
    parser.add_argument("--workers", type=int, default=fingerprints.default_workers(),
                        help="processes that decode images (1 = none; the sidecars are the same for any value)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fingerprints(args: argparse.Namespace) -> int:
    """Print what was written; exit status 1 naming every shard that cannot be read (it gets no sidecar)."""
    try:
        report = fingerprints.add_sidecars(args.locations, workers=args.workers, progress=not args.no_progress)
    except fingerprints.ShardReadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; each sidecar written so far is complete (written atomically): run the same "
              "command again for the rest", file=sys.stderr)
        return 130
    print(report.format())
    if not report.ok:
        print(f"error: {len(report.failed)} shards or manifests could not be read (no sidecar written for them): "
              + "; ".join(f"{path}: {why}" for path, why in report.failed), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m geoalign_jax.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, fmt in FORMATS.items():
        command = commands.add_parser(name, help=fmt.help, description=fmt.help)
        fmt.add_arguments(command)
        add_common_arguments(command)
    _fingerprints_arguments(commands.add_parser("fingerprints", help=FINGERPRINTS_HELP, description=FINGERPRINTS_HELP))
    prepare_segmentation.add_arguments(commands.add_parser("segmentation", help=SEGMENTATION_HELP,
                                                           description=SEGMENTATION_HELP))
    return parser


def missing_input_folder(args: argparse.Namespace) -> str | None:
    """The one-line refusal for an `--images` / `--image-root` folder that does not exist (else every image of
    the dataset would be skipped as missing, one by one); None when the folders given exist."""
    for option in ("images", "image_root"):
        folder = getattr(args, option, None)
        if isinstance(folder, str) and not filesystem.is_gcs(folder) and not pathlib.Path(folder).is_dir():
            return f"--{option.replace('_', '-')} {folder}: no such folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "fingerprints":
        return _fingerprints(args)
    if args.format == "segmentation":
        if filesystem.is_gcs(args.out):  # pathlib would write a local folder "gs:/..." instead
            print(f"error: --out {args.out}: a segmentation folder (images, masks, segmentation.json) is written "
                  "to local disk only; prepare it locally, then copy it to the bucket", file=sys.stderr)
            return 1
        return prepare_segmentation.run_cli(args)
    if (missing := missing_input_folder(args)) is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    if filesystem.is_gcs(args.out):  # staged locally, then uploaded with the manifest last
        from geoalign_jax.data import bucket_output

        return bucket_output.run_to_bucket(args.out, args.overwrite, lambda staging: run_cli(
            lambda: FORMATS[args.format].run(argparse.Namespace(**{**vars(args), 'out': staging}))))
    return run_cli(lambda: FORMATS[args.format].run(args))


if __name__ == "__main__":
    sys.exit(run_main(main))
