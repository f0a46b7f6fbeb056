"""``python -m geoalign_jax.prepare segmentation``: images + label-map masks -> a segmentation folder.

Layout written (docs/data_format.md, "Segmentation folders")::

    OUT/segmentation.json            format "geoalign-segmentation", version 1: classes, ignore index,
                                     label reduction, protocol settings of a preset, per split the images
    OUT/<split>/images/<stem><ext>   the image files, byte for byte
    OUT/<split>/masks/<stem>.png     the masks as single-channel PNG label maps (values as given)

An image and its mask are matched by file stem (a mask suffix such as ``_instance_color_RGB.png`` is cut
first). A pair is skipped, counted and named in the summary when the image or the mask cannot be read,
the mask is not a single-channel label map, the sizes differ, or the mask holds a value that is neither a
class nor the ignore index (after ``reduce_zero_label``: 0 is the ignore label and 1..C the classes).
Nothing is guessed: masks keep their raw values and the reduction is applied when evaluating, as mmseg does.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Any, BinaryIO, Sequence

import numpy as np
from PIL import Image

from geoalign_jax.data import segmentation_presets as presets

MANIFEST = "segmentation.json"
FORMAT_NAME = "geoalign-segmentation"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
#: Image modes that convert to RGB without losing meaning (16-bit / float rasters are refused, not scaled).
_IMAGE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
#: Mask modes that are label maps: one value per pixel ("P": palette indices are the labels).
_MASK_MODES = {"L", "P", "I", "I;16", "I;16L", "I;16B"}
_EXAMPLES = 5


class SegmentationPrepareError(ValueError):
    """Options or input folders that cannot be converted at all; the message names the option or path."""


@dataclasses.dataclass
class PrepareSummary:
    out: pathlib.Path
    split: str
    written: int
    skipped: collections.Counter
    examples: dict[str, list[str]]

    def format(self) -> str:
        lines = [f"segmentation: wrote {self.written} image/mask pairs of split {self.split!r} to {self.out}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count}: {reason} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


def allowed_label_values(num_classes: int, ignore_index: int, reduce_zero_label: bool) -> np.ndarray:
    """Raw mask values that are classes or ignored: 0..C-1 and the ignore index, or with the reduction
    0 (ignored), 1..C and the ignore index."""
    top = num_classes + 1 if reduce_zero_label else num_classes
    return np.union1d(np.arange(top), [ignore_index])


def reduce_labels(mask: np.ndarray, ignore_index: int, reduce_zero_label: bool) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> ignore, v -> v - 1, the ignore index stays. int32 out."""
    labels = mask.astype(np.int32)
    if not reduce_zero_label:
        return labels
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


def read_mask(path: pathlib.Path | str, data: BinaryIO | None = None) -> np.ndarray:
    """A single-channel label map -> [H, W] integers; ValueError naming the file otherwise. ``data``: the
    file's bytes already opened (e.g. read from a bucket), ``path`` then only names it."""
    try:
        with Image.open(path if data is None else data) as image:
            mode = image.mode
            if mode not in _MASK_MODES:
                raise ValueError(f"mask {path}: not a single-channel label map (PIL mode {mode}); give masks "
                                 "as 8/16-bit grey or palette PNG/TIF")
            return np.asarray(image)
    except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some broken files
        raise ValueError(f"mask {path}: cannot read it ({error.__class__.__name__}: {error})") from None


def _image_size(path: pathlib.Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            if image.mode not in _IMAGE_MODES:
                raise ValueError(f"image mode {image.mode} is not an 8-bit colour or grey image")
            image.load()
            return image.size
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{error.__class__.__name__}: {error}") from None


def _files_by_stem(folder: pathlib.Path, suffix: str | None, what: str) -> dict[str, pathlib.Path]:
    if not folder.is_dir():
        raise SegmentationPrepareError(f"--{what}: folder not found: {folder}")
    found: dict[str, pathlib.Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if suffix:
            if not name.lower().endswith(suffix.lower()):
                continue
            stem = name[: -len(suffix)]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            stem = path.stem
        else:
            continue
        if stem in found:
            raise SegmentationPrepareError(f"--{what}: two files with stem {stem!r}: {found[stem].name}, {name}")
        found[stem] = path
    return found


def prepare_segmentation(images: str | os.PathLike, masks: str | os.PathLike, out: str | os.PathLike, *,
                         classes: Sequence[Sequence[str]] | None = None, split: str | None = None,
                         ignore_index: int | None = None, reduce_zero_label: bool | None = None,
                         preset: str | None = None, name: str | None = None, image_suffix: str | None = None,
                         mask_suffix: str | None = None, overwrite: bool = False) -> PrepareSummary:
    """Convert one split (see the module docstring); a preset fills every option left None."""
    chosen = presets.get_preset(preset) if preset else None
    if classes is None:
        if chosen is None:
            raise SegmentationPrepareError("--classes FILE or --preset NAME is required")
        classes = chosen.classes
    classes = [list(names) for names in classes]
    split = split or (chosen.split if chosen else "test")
    ignore_index = ignore_index if ignore_index is not None else (chosen.ignore_index if chosen else 255)
    reduce_zero_label = bool(reduce_zero_label if reduce_zero_label is not None
                             else (chosen.reduce_zero_label if chosen else False))
    image_suffix = image_suffix if image_suffix is not None else (chosen.image_suffix if chosen else None)
    mask_suffix = mask_suffix if mask_suffix is not None else (chosen.mask_suffix if chosen else None)
    if not split or any(ch in split for ch in "/\\ ") or split.startswith("."):
        raise SegmentationPrepareError(f"--split {split!r}: a split name is one word without '/' or spaces")
    if not 0 <= ignore_index < 65536:
        raise SegmentationPrepareError(f"--ignore-index {ignore_index}: must be in 0..65535")
    if ignore_index < len(classes) + int(reduce_zero_label):
        raise SegmentationPrepareError(f"--ignore-index {ignore_index} is also a class label "
                                       f"({len(classes)} classes)")
    out = pathlib.Path(out)
    manifest = _existing_manifest(out, classes, ignore_index, reduce_zero_label, split, overwrite)
    image_files = _files_by_stem(pathlib.Path(images), image_suffix, "images")
    mask_files = _files_by_stem(pathlib.Path(masks), mask_suffix, "masks")
    if not image_files:
        raise SegmentationPrepareError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    allowed = allowed_label_values(len(classes), ignore_index, reduce_zero_label)
    skipped: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)

    def skip(reason: str, what: str) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < _EXAMPLES:
            examples[reason].append(what)

    for stem in sorted(set(mask_files) - set(image_files)):
        skip("mask without image", mask_files[stem].name)
    split_dir = out / split
    if split_dir.exists():
        shutil.rmtree(split_dir)
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "masks").mkdir(parents=True)
    entries = []
    for stem, image_path in image_files.items():
        mask_path = mask_files.get(stem)
        if mask_path is None:
            skip("image without mask", image_path.name)
            continue
        try:
            width, height = _image_size(image_path)
        except ValueError as error:
            skip("unreadable image", f"{image_path.name} ({error})")
            continue
        try:
            mask = read_mask(mask_path)
        except ValueError as error:
            skip("unreadable or multi-channel mask", f"{mask_path.name} ({error})")
            continue
        if mask.shape != (height, width):
            skip("mask size differs from image", f"{mask_path.name} ({mask.shape[1]}x{mask.shape[0]} vs "
                                                 f"{width}x{height})")
            continue
        unknown = np.setdiff1d(np.unique(mask), allowed)
        if unknown.size:
            skip("unknown label values", f"{mask_path.name} ({', '.join(map(str, unknown[:5].tolist()))})")
            continue
        image_name = f"{stem}{image_path.suffix.lower()}"
        shutil.copyfile(image_path, split_dir / "images" / image_name)
        dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
        Image.fromarray(mask.astype(dtype)).save(split_dir / "masks" / f"{stem}.png")
        entries.append({"id": stem, "image": f"{split}/images/{image_name}", "mask": f"{split}/masks/{stem}.png",
                        "width": width, "height": height})
    if not entries:
        shutil.rmtree(split_dir)
        summary = PrepareSummary(out, split, 0, skipped, examples)
        raise SegmentationPrepareError(f"no usable image/mask pairs; nothing written\n{summary.format()}")
    manifest["splits"][split] = {"images": entries, "skipped": dict(skipped),
                                 "source": {"images": str(images), "masks": str(masks)}}
    if chosen is not None:
        manifest["preset"] = chosen.name
        manifest["protocol"] = {"threshold": chosen.threshold, "background_index": chosen.background_index,
                                "resize": list(chosen.resize)}
        manifest["sources"] = chosen.sources
    manifest["name"] = name or manifest.get("name") or (chosen.name if chosen else out.name)
    temporary = out / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, out / MANIFEST)
    return PrepareSummary(out, split, len(entries), skipped, examples)


def _existing_manifest(out: pathlib.Path, classes: list[list[str]], ignore_index: int, reduce_zero_label: bool,
                       split: str, overwrite: bool) -> dict[str, Any]:
    """The manifest to add the split to: a new one, or the folder's own when its classes and labels agree."""
    fresh = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": classes, "ignore_index": ignore_index,
             "reduce_zero_label": reduce_zero_label, "splits": {}}
    path = out / MANIFEST
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        return fresh
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SegmentationPrepareError(f"{path}: cannot read the existing manifest ({error}); remove the folder")
    if overwrite:
        return fresh
    same = {key: manifest.get(key) for key in ("classes", "ignore_index", "reduce_zero_label")}
    if same != {"classes": classes, "ignore_index": ignore_index, "reduce_zero_label": reduce_zero_label}:
        raise SegmentationPrepareError(f"{path}: holds another class list or label settings; use another --out "
                                       "or --overwrite")
    if split in manifest.get("splits", {}):
        raise SegmentationPrepareError(f"{path}: split {split!r} exists; --overwrite replaces the folder")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--masks", required=True, help="folder of single-channel label maps (PNG/TIF), same stems")
    parser.add_argument("--out", required=True, help="output folder (segmentation.json + split folders)")
    parser.add_argument("--classes", default=None,
                        help="class file: line i names class i, several names comma-separated (SegEarth-OV)")
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                        help="one of FarSLIP's 8 OVSS benchmarks: SegEarth-OV's classes, labels, threshold, "
                             "background class and resize (explicit options override)")
    parser.add_argument("--split", default=None, help="split name (default: the preset's, else test)")
    parser.add_argument("--ignore-index", type=int, default=None, help="label value that is not scored (255)")
    parser.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                        help="label 0 is ignored and 1..C are the classes (mmseg's reduce_zero_label; "
                             "--no-reduce-zero-label turns a preset's off; default: the preset's, else off)")
    parser.add_argument("--name", default=None, help="dataset name (default: preset or folder name)")
    parser.add_argument("--image-suffix", default=None, help="only images ending so (default: any image)")
    parser.add_argument("--mask-suffix", default=None,
                        help="mask file ending cut to find the image stem, e.g. _instance_color_RGB.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder's manifest")


def run_cli(args: argparse.Namespace) -> int:
    """Exit status 0 with the summary, 1 with one line naming the problem."""
    try:
        classes = presets.read_class_file(args.classes) if args.classes else None
        summary = prepare_segmentation(
            args.images, args.masks, args.out, classes=classes, split=args.split, ignore_index=args.ignore_index,
            reduce_zero_label=args.reduce_zero_label, preset=args.preset, name=args.name,
            image_suffix=args.image_suffix, mask_suffix=args.mask_suffix, overwrite=args.overwrite)
    except (SegmentationPrepareError, presets.ClassFileError, KeyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0
