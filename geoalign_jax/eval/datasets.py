"""Evaluation sets read from geoalign record shards (`prepare`'s output) or class-per-folder trees.

Each loader makes one metadata pass (labels, captions, boxes; image bytes are not kept) and returns
random access to the encoded images, so that large sets are decoded lazily, batch by batch, while
embedding. Inputs that cannot be evaluated (an unlabelled record in a classification set, a region
without a category) are dropped and counted in ``skipped``, never guessed. A record that cannot be read
(damaged shard bytes, bytes that are not a record) is an EvalDataError naming the shard and the record's
index, or, with ``skip_bad_records=True``, dropped and counted as ``unreadable_records``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Any, Sequence

import numpy as np

from geoalign_jax.data import filesystem
from geoalign_jax.eval import classnames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_SPLIT_PREFERENCE = ("test", "val", "validation")
#: The ``skipped`` reason of records that could not be read (only with ``skip_bad_records=True``).
UNREADABLE_RECORDS = "unreadable_records"


class EvalDataError(ValueError):
    """An evaluation set that cannot be read as asked; the message names the path / split / record."""


# ---------------------------------------------------------------------------------------------------------
# Random access to encoded images.


class FolderImages:
    """Image files on disk."""

    def __init__(self, paths: Sequence[pathlib.Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image_bytes(self, index: int) -> bytes:
        return self.paths[index].read_bytes()

    def where(self, index: int) -> str:
        return str(self.paths[index])

    def expected_size(self, index: int) -> None:
        """Plain image files carry no separate size to check the decoded image against."""
        return None


class RecordImages:
    """The images of selected records of a record source (decoded on access, in any thread), with each
    record's (width, height): the decoder checks the image against it (boxes are measured on that size)."""

    def __init__(self, source: Any, record_indices: Sequence[int], wheres: Sequence[str],
                 sizes: Sequence[tuple[int, int]]) -> None:
        if not len(record_indices) == len(wheres) == len(sizes):
            raise ValueError(f"RecordImages: {len(record_indices)} indices, {len(wheres)} names, {len(sizes)} sizes")
        self.source = source
        self.record_indices = list(record_indices)
        self.wheres = list(wheres)
        self.sizes = [(int(width), int(height)) for width, height in sizes]

    def __len__(self) -> int:
        return len(self.record_indices)

    def image_bytes(self, index: int) -> bytes:
        from geoalign_jax.data import records

        try:
            return self.source[self.record_indices[index]]["image"]
        except records.RecordError as error:  # read fine in the metadata pass: the file changed since
            raise EvalDataError(str(error)) from None

    def where(self, index: int) -> str:
        return self.wheres[index]

    def expected_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]


# ---------------------------------------------------------------------------------------------------------
# Records.


def is_record_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def choose_split(manifest: dict[str, Any], split: str | None, path: pathlib.Path) -> str:
    """The requested split, or the only one, or test/val; an error listing the splits otherwise."""
    splits = sorted(manifest.get("splits", {}))
    if split is not None:
        if split not in splits:
            raise EvalDataError(f"{path}: split {split!r} not in the manifest (splits: {splits})")
        return split
    if len(splits) == 1:
        return splits[0]
    for preferred in _SPLIT_PREFERENCE:
        if preferred in splits:
            return preferred
    raise EvalDataError(f"{path}: several splits {splits} and none is test/val; name one with split=...")


def open_records(path: pathlib.Path, split: str | None) -> tuple[dict[str, Any], str, Any, list[str]]:
    """(manifest, split, random-access source of decoded records, shard paths)."""
    from geoalign_jax.data import sources

    try:
        manifest = sources.read_manifest(str(path))
        chosen = choose_split(manifest, split, path)
        shard_paths = sources.shard_paths(str(path), chosen)
        if not shard_paths:
            raise EvalDataError(f"{path}: split {chosen!r} has no shards")
        return manifest, chosen, sources.RecordSource(shard_paths), shard_paths
    except sources.SourceError as error:  # a missing, truncated or foreign shard: named, never a traceback
        raise EvalDataError(str(error)) from None


def _record_size(record: dict[str, Any]) -> tuple[int, int]:
    return int(record["width"]), int(record["height"])


def _iterate_records(source: Any, path: pathlib.Path, split: str, limit: int | None, skip_bad_records: bool,
                     skipped: dict[str, int]):
    """(index, decoded record, name) of the first ``limit`` records. A record that cannot be read or decoded
    raises EvalDataError naming the shard and index, or with ``skip_bad_records`` is counted in
    ``skipped[UNREADABLE_RECORDS]`` and logged once."""
    from geoalign_jax.data import records

    count = len(source) if limit is None else min(limit, len(source))
    for index in range(count):
        try:
            record = source[index]
        except records.RecordError as error:
            if not skip_bad_records:
                raise EvalDataError(f"{error} (skip_bad_records / --skip-bad-records skips and counts such "
                                    "records)") from None
            skipped[UNREADABLE_RECORDS] = skipped.get(UNREADABLE_RECORDS, 0) + 1
            log.warning("skipping unreadable record: %s", error)
            continue
        yield index, record, f"{path}[{split}][{index}]"


def image_key(data: bytes) -> str:
    """Identity of an image for de-duplication: a hash of its encoded bytes."""
    return hashlib.sha1(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Zero-shot classification.


@dataclasses.dataclass
class ClassificationSet:
    """images[i] has label labels[i] in 0..C-1; class_ids name classes in results, class_names go in prompts."""

    images: Any
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]
    skipped: dict[str, int]
    description: str


def _class_folders(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_classification(path: str | pathlib.Path, *, split: str | None = None, dataset: str | None = None,
                        limit: int | None = None, skip_bad_records: bool = False) -> ClassificationSet:
    """A classification set from record shards or from ``path/<ClassFolder>/<images>``.

    Prompt names come from the named dataset's class table when it knows the classes
    (``classnames.prompt_names_for``), else from the records' / folders' readable names.
    """
    root = filesystem.path(path)  # pathlib.Path, or epath.Path for gs://
    if not root.exists():
        raise EvalDataError(f"zero-shot data not found: {root}")
    if is_record_dir(root):
        return _classification_from_records(root, split, dataset, limit, skip_bad_records)
    if root.is_dir() and _class_folders(root):
        if split is not None:
            log.warning("%s is a class-folder tree; split=%r is ignored", root, split)
        return _classification_from_folders(root, dataset, limit)
    raise EvalDataError(f"{root}: neither a record folder (manifest.json) nor a tree of class folders")


def _classification_from_folders(root: pathlib.Path, dataset: str | None, limit: int | None) -> ClassificationSet:
    folders = _class_folders(root)
    paths, labels, skipped = [], [], {"not_an_image_file": 0}
    for label, folder in enumerate(folders):
        for file in sorted(folder.iterdir()):
            if file.name.startswith(".") or not file.is_file():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped["not_an_image_file"] += 1
                continue
            paths.append(file)
            labels.append(label)
    if not paths:
        raise EvalDataError(f"{root}: the class folders hold no image files")
    if limit is not None:
        paths, labels = _stratified_head(paths, labels, limit)
    class_ids = [folder.name for folder in folders]
    return ClassificationSet(FolderImages(paths), np.asarray(labels, np.int64), class_ids,
                             classnames.prompt_names_for(class_ids, dataset), _nonzero(skipped),
                             f"{root} ({len(paths)} images, {len(class_ids)} class folders)")


def _stratified_head(items: list[Any], labels: list[int], limit: int) -> tuple[list[Any], list[int]]:
    """The first ``limit`` items taken round-robin over classes, so a small limit still covers them all."""
    by_class: dict[int, list[Any]] = {}
    for item, label in zip(items, labels):
        by_class.setdefault(label, []).append(item)
    chosen: list[tuple[Any, int]] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(chosen) < limit:
                chosen.append((by_class[label][depth], label))
        depth += 1
    return [item for item, _ in chosen], [label for _, label in chosen]


def _classification_from_records(root: pathlib.Path, split: str | None, dataset: str | None,
                                  limit: int | None, skip_bad_records: bool) -> ClassificationSet:
    manifest, chosen, source, _ = open_records(root, split)
    raw_ids = manifest.get("raw_class_names") or manifest.get("class_names") or None  # [] = none listed (JSONL)
    readable = manifest.get("class_names")
    indices, labels, wheres, sizes, skipped = [], [], [], [], {"unlabelled": 0}
    seen_names: dict[int, str] = {}
    for index, record, where in _iterate_records(source, root, chosen, None, skip_bad_records, skipped):
        label = int(record.get("label", -1))
        if label < 0:
            skipped["unlabelled"] += 1
            continue
        if raw_ids is not None and label >= len(raw_ids):
            raise EvalDataError(f"{where}: label {label} but the manifest lists {len(raw_ids)} classes")
        if record.get("class_name"):
            seen_names.setdefault(label, record["class_name"])
        indices.append(index)
        labels.append(label)
        wheres.append(where)
        sizes.append(_record_size(record))
    if not indices:
        raise EvalDataError(f"{root}[{chosen}]: no labelled records (label >= 0) for zero-shot classification")
    if raw_ids is None:
        if sorted(seen_names) != list(range(max(labels) + 1)):
            raise EvalDataError(f"{root}: no class_names in the manifest and the records do not name every label")
        raw_ids = [seen_names[label] for label in range(max(labels) + 1)]
    if limit is not None:
        picked, labels = _stratified_head(list(zip(indices, wheres, sizes)), labels, limit)
        indices, wheres, sizes = [p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]
    class_ids = list(raw_ids)
    if classnames.canonical_dataset_name(dataset or "") is not None:
        class_names = classnames.prompt_names_for(class_ids, dataset)
    elif readable is not None and len(readable) == len(class_ids):
        class_names = list(readable)
    else:
        class_names = classnames.prompt_names_for(class_ids, None)
    return ClassificationSet(RecordImages(source, indices, wheres, sizes), np.asarray(labels, np.int64), class_ids,
                             class_names, _nonzero(skipped),
                             f"{root} [{chosen}] ({len(indices)} images, {len(class_ids)} classes)")


# ---------------------------------------------------------------------------------------------------------
# Retrieval.


@dataclasses.dataclass
class RetrievalSet:
    """images[i] is described by captions[i]; image_keys[i] identifies identical images."""

    images: Any
    image_keys: list[str]
    captions: list[list[str]]
    skipped: dict[str, int]
    description: str


def load_retrieval(path: str | pathlib.Path, *, split: str | None = None, limit: int | None = None,
                   skip_bad_records: bool = False, text: str = "short") -> RetrievalSet:
    """A caption set from record shards; records without captions are counted and left out.
    ``text="long"``: each image's text is its ``long_caption`` (records without one counted and left out)."""
    root = filesystem.path(path)  # pathlib.Path, or epath.Path for gs://
    if not is_record_dir(root):
        raise EvalDataError(f"retrieval data must be a record folder with manifest.json: {root}")
    if text not in ("short", "long"):
        raise EvalDataError(f"text must be 'short' or 'long', got {text!r}")
    _, chosen, source, _ = open_records(root, split)
    missing = "records_without_captions" if text == "short" else "records_without_long_caption"
    indices, keys, captions, wheres, sizes, skipped = [], [], [], [], [], {missing: 0}
    for index, record, where in _iterate_records(source, root, chosen, limit, skip_bad_records, skipped):
        texts = list(record.get("captions") or []) if text == "short" else \
            ([record["long_caption"]] if record.get("long_caption") else [])
        if not texts:
            skipped[missing] += 1
            continue
        indices.append(index)
        keys.append(image_key(record["image"]))
        captions.append(texts)
        wheres.append(where)
        sizes.append(_record_size(record))
    if not indices:
        raise EvalDataError(f"{root}[{chosen}]: no records with "
                            + ("captions" if text == "short" else "a long_caption (text=long)"))
    return RetrievalSet(RecordImages(source, indices, wheres, sizes), keys, captions, _nonzero(skipped),
                        f"{root} [{chosen}] ({len(indices)} images, {sum(map(len, captions))} captions)")


# ---------------------------------------------------------------------------------------------------------
# Region classification.


@dataclasses.dataclass
class RegionSet:
    """Per image: pixel size and its regions as (box [x1, y1, x2, y2] pixels, category index)."""

    images: Any
    sizes: list[tuple[int, int]]
    regions: list[list[tuple[tuple[float, float, float, float], int]]]
    category_names: list[str]
    skipped: dict[str, int]
    description: str

    @property
    def num_regions(self) -> int:
        return sum(len(r) for r in self.regions)


def load_regions(path: str | pathlib.Path, *, split: str | None = None, limit: int | None = None,
                 skip_bad_records: bool = False) -> RegionSet:
    """Object boxes with categories from record shards (detection / referring sets after conversion).

    The category vocabulary is the manifest's ``category_names`` when present, else the sorted set of
    categories in the records. Regions without a category (free-text captions) are counted and skipped.
    """
    root = filesystem.path(path)  # pathlib.Path, or epath.Path for gs://
    if not is_record_dir(root):
        raise EvalDataError(f"region data must be a record folder with manifest.json: {root}")
    manifest, chosen, source, _ = open_records(root, split)
    rows: list[tuple[int, str, tuple[int, int], list[tuple[tuple[float, ...], str]]]] = []
    skipped = {"regions_without_category": 0, "records_without_regions": 0}
    for index, record, where in _iterate_records(source, root, chosen, limit, skip_bad_records, skipped):
        kept = []
        for region in record.get("regions", []):
            if not region.get("category"):
                skipped["regions_without_category"] += 1
                continue
            kept.append((tuple(float(v) for v in region["box"]), str(region["category"])))
        if not kept:
            skipped["records_without_regions"] += 1
            continue
        rows.append((index, where, _record_size(record), kept))
    if not rows:
        raise EvalDataError(f"{root}[{chosen}]: no regions with a category")
    vocabulary = manifest.get("category_names") or sorted({c for *_, kept in rows for _, c in kept})
    position = {name: i for i, name in enumerate(vocabulary)}
    regions = []
    for _, where, _, kept in rows:
        image_regions = []
        for box, category in kept:
            if category not in position:
                raise EvalDataError(f"{where}: category {category!r} is not in the manifest's category_names")
            image_regions.append((box, position[category]))
        regions.append(image_regions)
    images = RecordImages(source, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return RegionSet(images, [r[2] for r in rows], regions, list(vocabulary), _nonzero(skipped),
                     f"{root} [{chosen}] ({len(rows)} images, {sum(map(len, regions))} regions)")


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in counts.items() if count}
