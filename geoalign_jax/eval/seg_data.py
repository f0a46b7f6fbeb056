"""Reading a segmentation folder (``python -m geoalign_jax.prepare segmentation``) for evaluation.

``load_segmentation(path, split)`` reads ``segmentation.json`` and checks it (format, version, classes,
label settings, the split's entries); an image and its mask are decoded on access (``SegmentationSet.pair``),
the mask reduced as the manifest says (``reduce_zero_label``) and checked: a mask of another size than its
image or with a value that is neither a class nor the ignore index is an ``EvalDataError`` naming the file.
The folder may be local or in a bucket (``gs://...``): every file is reached through ``data.filesystem``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from geoalign_jax.data import filesystem
from geoalign_jax.data import prepare_segmentation as prepared
from geoalign_jax.data import segmentation_presets
from geoalign_jax.eval.datasets import EvalDataError

_SPLIT_PREFERENCE = ("test", "val", "validation")


def is_segmentation_dir(path: str | pathlib.Path) -> bool:
    return filesystem.isfile(filesystem.join(path, prepared.MANIFEST))


def read_manifest(root: Any) -> dict[str, Any]:
    """The checked manifest of a segmentation folder (a path, or ``filesystem.path`` of a bucket location);
    EvalDataError naming the file and field otherwise."""
    root = filesystem.path(root)
    path = root / prepared.MANIFEST
    if not path.is_file():
        raise EvalDataError(f"{root}: not a segmentation folder (no {prepared.MANIFEST}); make one with "
                            "python -m geoalign_jax.prepare segmentation")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvalDataError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != prepared.FORMAT_NAME:
        raise EvalDataError(f"{path}: format must be {prepared.FORMAT_NAME!r}")
    if manifest.get("version") != prepared.FORMAT_VERSION:
        raise EvalDataError(f"{path}: version {manifest.get('version')!r} is not {prepared.FORMAT_VERSION} "
                            "(written by another geoalign-jax version)")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(
            isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)
            for names in classes):
        raise EvalDataError(f"{path}: classes must be a non-empty list of non-empty name lists")
    ignore_index = manifest.get("ignore_index")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or ignore_index < len(classes):
        raise EvalDataError(f"{path}: ignore_index must be an integer >= the number of classes, got {ignore_index!r}")
    if not isinstance(manifest.get("reduce_zero_label"), bool):
        raise EvalDataError(f"{path}: reduce_zero_label must be true or false")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise EvalDataError(f"{path}: splits must name at least one split")
    return manifest


def choose_split(manifest: dict[str, Any], split: str | None, root: Any) -> str:
    """The asked split, else test / val / validation, else the only split."""
    splits = sorted(manifest["splits"])
    if split is not None:
        if split not in manifest["splits"]:
            raise EvalDataError(f"{root}: no split {split!r} (splits: {', '.join(splits)})")
        return split
    for name in _SPLIT_PREFERENCE:
        if name in manifest["splits"]:
            return name
    if len(splits) == 1:
        return splits[0]
    raise EvalDataError(f"{root}: several splits ({', '.join(splits)}) and none is test/val: name one (split=...)")


def resolve_split(root: str | pathlib.Path, split: str | None) -> tuple[str, str, list[str]]:
    """(split that will be evaluated, dataset name, the folder's splits), for the runner's split guard."""
    root = filesystem.path(root)
    manifest = read_manifest(root)
    chosen = choose_split(manifest, split, root)
    return chosen, str(manifest.get("name") or root.name), sorted(manifest["splits"])


class SegmentationImages:
    """The split's image files (``provenance.image_digests`` reads them)."""

    def __init__(self, root: Any, entries: Sequence[dict[str, Any]]) -> None:
        self.root, self.entries = root, list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def where(self, index: int) -> str:
        return str(self.root / self.entries[index]["image"])

    def image_bytes(self, index: int) -> bytes:
        try:
            return (self.root / self.entries[index]["image"]).read_bytes()
        except OSError as error:
            raise EvalDataError(f"{self.where(index)}: cannot read the image ({error})") from None

    def expected_size(self, index: int) -> tuple[int, int]:
        entry = self.entries[index]
        return int(entry["width"]), int(entry["height"])


@dataclasses.dataclass
class SegmentationSet:
    """One split: classes (names per class), label settings, protocol settings of its preset, images."""

    root: Any  # pathlib.Path, or etils.epath.Path of a gs:// folder
    name: str
    split: str
    classes: list[list[str]]
    ignore_index: int
    reduce_zero_label: bool
    protocol: dict[str, Any]
    images: SegmentationImages
    skipped: dict[str, int]
    sources: list[str]

    @property
    def description(self) -> str:
        return (f"{self.name} split {self.split}: {len(self.images)} images, {len(self.classes)} classes "
                f"(ignore {self.ignore_index}, reduce_zero_label {self.reduce_zero_label})")

    @property
    def class_names(self) -> list[str]:
        """One name per class for metric keys: its first name, spaces as underscores."""
        return [names[0].replace(" ", "_") for names in self.classes]

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 RGB image [H, W, 3], labels [H, W] int32 in 0..C-1 or the ignore index)."""
        from geoalign_jax.eval import preprocess

        entry = self.images.entries[index]
        where = self.images.where(index)
        try:
            image = np.asarray(preprocess.decode_image(self.images.image_bytes(index), where=where,
                                                       expected_size=self.images.expected_size(index)))
        except ValueError as error:
            raise EvalDataError(str(error)) from None
        mask_path = self.root / entry["mask"]
        try:
            mask = prepared.read_mask(mask_path, io.BytesIO(mask_path.read_bytes()))
        except OSError as error:
            raise EvalDataError(f"{mask_path}: cannot read the mask ({error})") from None
        except ValueError as error:
            raise EvalDataError(str(error)) from None
        if mask.shape != image.shape[:2]:
            raise EvalDataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                                f"{image.shape[1]}x{image.shape[0]}")
        allowed = prepared.allowed_label_values(len(self.classes), self.ignore_index, self.reduce_zero_label)
        unknown = np.setdiff1d(np.unique(mask), allowed)
        if unknown.size:
            raise EvalDataError(f"{mask_path}: label values {unknown[:5].tolist()} are neither classes "
                                f"(0..{len(self.classes) - 1}{', reduced from 1..' if self.reduce_zero_label else ''}"
                                f"{len(self.classes) if self.reduce_zero_label else ''}) nor the ignore index "
                                f"{self.ignore_index}")
        return image, prepared.reduce_labels(mask, self.ignore_index, self.reduce_zero_label)


def load_segmentation(path: str | pathlib.Path, *, split: str | None = None, limit: int | None = None
                      ) -> SegmentationSet:
    root = filesystem.path(path)
    manifest = read_manifest(root)
    chosen = choose_split(manifest, split, root)
    entries = manifest["splits"][chosen].get("images") if isinstance(manifest["splits"][chosen], dict) else None
    where = f"{root / prepared.MANIFEST} split {chosen!r}"
    if not isinstance(entries, list) or not entries:
        raise EvalDataError(f"{where}: no images")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("image", "mask")) \
                or not all(isinstance(entry.get(key), int) and entry[key] > 0 for key in ("width", "height")):
            raise EvalDataError(f"{where}: image entry {number} needs image, mask (paths) and width, height")
        for key in ("image", "mask"):
            if pathlib.PurePosixPath(entry[key]).is_absolute() or ".." in pathlib.PurePosixPath(entry[key]).parts:
                raise EvalDataError(f"{where}: image entry {number}: {key} path {entry[key]!r} leaves the folder")
    if limit is not None:
        entries = entries[:limit]
    protocol = manifest.get("protocol") or {}
    preset = manifest.get("preset")
    if preset and not protocol:  # a manifest written by hand naming a preset
        chosen_preset = segmentation_presets.get_preset(preset)
        protocol = {"threshold": chosen_preset.threshold, "background_index": chosen_preset.background_index,
                    "resize": list(chosen_preset.resize)}
    return SegmentationSet(
        root=root, name=str(manifest.get("name") or root.name), split=chosen, classes=manifest["classes"],
        ignore_index=manifest["ignore_index"], reduce_zero_label=manifest["reduce_zero_label"],
        protocol=dict(protocol), images=SegmentationImages(root, entries),
        skipped=dict(manifest["splits"][chosen].get("skipped") or {}), sources=list(manifest.get("sources") or []))
