"""Dataset converters: from the layouts RS datasets ship in to geoalign record shards (docs/data_format.md).

Each `convert_*` function only reads annotation files and turns every image into an `ImageTask`; the shared
machinery (`record_builder.py`, `skip_accounting.py`, `writers.py`) loads and checks the images in worker processes,
drops what does not fit (counted and named), writes the shards and the manifest, and fails past `max_bad_fraction`. The CLI
(`python -m geoalign_jax.prepare`) is a thin wrapper over these functions and those of `prepare_corpora.py` (the
seed papers' corpora), so tests and `tools/make_demo_data.py` call the same code.

Inputs are processed in a deterministic order (the annotation file's order, or sorted directory listings),
so the same input gives byte-identical shards whatever the number of workers.

Options every `convert_*` shares: `workers` processes build records (<= 1: in this process); `num_shards`
per split (at most; fewer when inputs are skipped) or `records_per_shard`; a region box partly outside the
image is clipped when at least `min_box_visible` of its area is inside, else dropped; ConversionError
(nothing written) when more than `max_bad_fraction` of the inputs or of the annotations are bad; an
existing dataset in `out_dir` is replaced only with `overwrite`; `progress` shows a tqdm bar.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from geoalign_jax.data import record_builder, skip_accounting, writers
from geoalign_jax.data.record_builder import BuildOptions, ImageTask, RawRegion
from geoalign_jax.data.skip_accounting import ConversionError, Skip, SkipLog
from geoalign_jax.data.writers import ConversionSummary, ShardingOptions

PathLike = str | os.PathLike


class PrepareOptions(TypedDict, total=False):
    """The options every `convert_*` takes as keyword arguments (defaults in `_write`, meanings in the module
    docstring); `common_kwargs` builds them from the CLI flags."""

    workers: int
    num_shards: int | None
    records_per_shard: int | None
    max_bad_fraction: float
    min_box_visible: float
    overwrite: bool
    progress: bool


def _write(
    tasks: Iterable[ImageTask],
    out_dir: PathLike,
    *,
    name: str,
    created_by: str,
    log: SkipLog,
    manifest_extra: Mapping[str, Any],
    expected_counts: Mapping[str, int] | None = None,
    workers: int = 1,
    num_shards: int | None = None,
    records_per_shard: int | None = None,
    max_bad_fraction: float = 0.05,
    min_box_visible: float = 0.5,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """The one call into `writers.write_dataset` of every converter, with the shared options (`PrepareOptions`)
    checked and defaulted here once. `expected_counts` (tasks per split) lets `tasks` be a lazy iterable.
    An unknown option raises TypeError naming it."""
    return writers.write_dataset(
        tasks, out_dir, name=name, created_by=created_by, skip_log=log, workers=workers,
        sharding=_sharding(num_shards, records_per_shard),
        build_options=_build_options(max_bad_fraction, min_box_visible), max_bad_fraction=max_bad_fraction,
        manifest_extra=manifest_extra, overwrite=overwrite, progress=progress, expected_counts=expected_counts,
    )


def _sharding(num_shards: int | None, records_per_shard: int | None) -> ShardingOptions:
    if num_shards is not None and records_per_shard is not None:
        raise ConversionError("give num_shards or records_per_shard, not both")
    for label, value in (("num_shards", num_shards), ("records_per_shard", records_per_shard)):
        if value is not None and value < 1:
            raise ConversionError(f"{label} must be >= 1, got {value}")
    return ShardingOptions(num_shards=num_shards, records_per_shard=records_per_shard)


def _build_options(max_bad_fraction: float, min_box_visible: float) -> BuildOptions:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConversionError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
    if not 0.0 < min_box_visible <= 1.0:
        raise ConversionError(f"min_box_visible must lie in (0, 1], got {min_box_visible}")
    return BuildOptions(min_box_visible=min_box_visible)


def readable_class_name(folder_name: str) -> str:
    """A class folder name as words for prompts: 'DenseResidential' -> 'dense residential',
    'sparse_residential' -> 'sparse residential', 'storage-tanks' -> 'storage tanks'."""
    spaced = re.sub(r"[_\-\s]+", " ", folder_name)
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", spaced)
    return " ".join(spaced.lower().split())


def _claim_id(seen_ids: set[str], record_id: str, name: str, log: SkipLog) -> bool:
    """False (and a counted skip) when the id was already used: ids identify images in retrieval metrics."""
    if record_id in seen_ids:
        log.add_input(Skip(skip_accounting.DUPLICATE_ID, name))
        return False
    seen_ids.add(record_id)
    return True


def _load_json(path: PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConversionError(f"annotation file not found: {path}") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"annotation file {path} is not readable JSON: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# Karpathy-style caption JSON (RSICD, RSITMD, UCM-captions, Sydney-captions)


def prepare_karpathy(
    json_path: PathLike,
    image_dir: PathLike,
    out_dir: PathLike,
    *,
    name: str | None = None,
    splits: Sequence[str] | None = None,
    split_map: Mapping[str, str] | None = None,
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert a Karpathy-layout caption JSON (`images[].filename`, `.split`, `.sentences[].raw`, optional
    `.filepath` and scene `.label`) with its image folder.

    Blank captions are dropped (counted); an image keeps its record while one caption is left. `split_map`
    renames splits (e.g. {"restval": "train"}), `splits` keeps only those (after renaming). A scene `label`
    string becomes `label` (index into the sorted label names) and `class_name` (readable).
    """
    data = _load_json(json_path)
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise ConversionError(f"{json_path}: expected a Karpathy JSON object with an 'images' list")
    name = name or str(data.get("dataset") or pathlib.Path(json_path).stem).lower()
    image_root = pathlib.Path(image_dir)
    json_name = pathlib.Path(json_path).name
    split_map = dict(split_map or {})
    labels = sorted({entry["label"] for entry in data["images"]
                     if isinstance(entry, Mapping) and isinstance(entry.get("label"), str)})
    label_index = {label: index for index, label in enumerate(labels)}

    log, tasks, seen_ids = SkipLog(), [], set()
    for index, entry in enumerate(data["images"]):
        where = f"{json_name}:images[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("filename"), str) \
                or not isinstance(entry.get("split"), str) or not isinstance(entry.get("sentences"), list):
            log.add_input(Skip(skip_accounting.MALFORMED_ANNOTATION, where))
            continue
        split = split_map.get(entry["split"], entry["split"])
        if splits is not None and split not in splits:
            continue
        filename = entry["filename"]
        if not _claim_id(seen_ids, filename, filename, log):
            continue
        path = image_root / filename
        if isinstance(entry.get("filepath"), str) and (image_root / entry["filepath"] / filename).is_file():
            path = image_root / entry["filepath"] / filename
        captions = tuple(s.get("raw") if isinstance(s, Mapping) else None for s in entry["sentences"])
        label = entry.get("label")
        tasks.append(ImageTask(
            split=split, id=filename, source=name, name=filename, image_path=str(path), captions=captions,
            label=label_index.get(label, -1) if isinstance(label, str) else -1,
            class_name=readable_class_name(label) if isinstance(label, str) else None, require="captions",
        ))
    extra = {"class_names": [readable_class_name(label) for label in labels], "raw_class_names": labels}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare karpathy", log=log,
                  manifest_extra=extra, **options)


# ---------------------------------------------------------------------------------------------------------
# JSONL multi-granular corpora (RSFG-100k, MGRS-200k, DGTRSD, the demo data)

JSONL_FIELDS = {"image", "split", "id", "captions", "caption", "long_caption", "hard_negatives", "regions",
                "label", "class_name", "metadata"}
JSONL_REGION_FIELDS = {"box", "category", "caption"}


class _LineError(ValueError):
    pass


def _text_list(value: Any, field: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise _LineError(f"'{field}' must be a list of strings")
    return tuple(value)


def _parse_jsonl_line(line: str) -> dict[str, Any]:
    """Check one JSONL object's structure (types, known fields); text content is checked by the builder."""
    try:
        obj = json.loads(line)
    except ValueError as error:
        raise _LineError(f"bad JSON ({error.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise _LineError("not a JSON object")
    unknown = sorted(set(obj) - JSONL_FIELDS)
    if unknown:
        raise _LineError(f"unknown fields {unknown} (allowed: {sorted(JSONL_FIELDS)})")
    if not isinstance(obj.get("image"), str) or not obj["image"].strip():
        raise _LineError("missing 'image'")
    for field in ("split", "id", "class_name"):
        if field in obj and obj[field] is not None and (not isinstance(obj[field], str) or not obj[field].strip()):
            raise _LineError(f"'{field}' must be a non-empty string")
    if "long_caption" in obj and obj["long_caption"] is not None and not isinstance(obj["long_caption"], str):
        raise _LineError("'long_caption' must be a string")
    if "label" in obj and (not isinstance(obj["label"], int) or isinstance(obj["label"], bool) or obj["label"] < -1):
        raise _LineError("'label' must be an int >= -1")
    obj["captions"] = _text_list(obj.get("captions", []), "captions") + \
        (_text_list(obj["caption"], "caption") if "caption" in obj else ())
    obj["hard_negatives"] = _text_list(obj.get("hard_negatives", []), "hard_negatives")
    regions = obj.get("regions", [])
    if not isinstance(regions, list):
        raise _LineError("'regions' must be a list")
    for index, region in enumerate(regions):
        if not isinstance(region, dict) or "box" not in region:
            raise _LineError(f"regions[{index}] needs a 'box'")
        if set(region) - JSONL_REGION_FIELDS:
            raise _LineError(f"regions[{index}] has unknown fields {sorted(set(region) - JSONL_REGION_FIELDS)} "
                             f"(allowed: {sorted(JSONL_REGION_FIELDS)}; category ids are derived from names)")
        box = region["box"]
        if not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise _LineError(f"regions[{index}].box must be [x1, y1, x2, y2] numbers")
        for field in ("category", "caption"):
            if region.get(field) is not None and not isinstance(region[field], str):
                raise _LineError(f"regions[{index}].{field} must be a string")
    return obj


def _category_name(value: Any) -> str | None:
    """A region category as records store it (`record_builder.build_record`): stripped, None when blank or absent."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def prepare_jsonl(
    jsonl_paths: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    name: str,
    image_root: PathLike | None = None,
    default_split: str = "train",
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert JSONL files (one JSON object per image, schema in docs/data_format.md).

    Image paths are relative to `image_root` (default: the JSONL file's folder). A line that is not valid
    JSON, misses `image`, or has a field of the wrong type or an unknown field is skipped and reported as
    `file.jsonl:LINE`. A record needs some text: a caption, a long caption or a region. `category_id` of a
    region indexes the sorted category names found, listed in the manifest's `category_names`.
    """
    paths = [jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else list(jsonl_paths)
    log, entries = SkipLog(), []
    for path in paths:
        path = pathlib.Path(path)
        root = pathlib.Path(image_root) if image_root is not None else path.parent
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConversionError(f"JSONL file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConversionError(f"JSONL file {path} is unreadable: {error}") from None
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_number}"
            try:
                obj = _parse_jsonl_line(line)
            except _LineError as error:
                log.add_input(Skip(f"{skip_accounting.MALFORMED_LINE}", f"{where} ({error})"))
                continue
            entries.append((where, root, obj))
    # Names are stripped here exactly as the record builder strips them, so the manifest's category_names, the
    # record's category and its category_id always agree (" ship" and "ship" are one category).
    category_names = sorted({_category_name(region.get("category")) for _, _, obj in entries
                             for region in obj.get("regions", [])} - {None})
    category_index = {category: index for index, category in enumerate(category_names)}

    tasks, seen_ids = [], set()
    for where, root, obj in entries:
        record_id = obj.get("id") or obj["image"]
        if not _claim_id(seen_ids, record_id, where, log):
            continue
        regions = tuple(
            RawRegion(box=tuple(region["box"]), category=region.get("category"),
                      category_id=category_index.get(_category_name(region.get("category")), -1),
                      caption=region.get("caption"), name=f"{where} (region {index})")
            for index, region in enumerate(obj.get("regions", []))
        )
        tasks.append(ImageTask(
            split=obj.get("split") or default_split, id=record_id, source=name, name=f"{where} ({obj['image']})",
            image_path=str(root / obj["image"]), captions=obj["captions"], long_caption=obj.get("long_caption"),
            hard_negatives=obj["hard_negatives"], regions=regions, label=obj.get("label", -1),
            class_name=obj.get("class_name"), require="text",
        ))
    extra = {"category_names": category_names}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare jsonl", log=log, manifest_extra=extra,
                  **options)


# ---------------------------------------------------------------------------------------------------------
# Class-per-folder classification sets (UCM, AID, RESISC45, EuroSAT, WHU-RS19)


def prepare_folders(
    root: PathLike,
    out_dir: PathLike,
    *,
    name: str,
    split: str = "test",
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert `root/<ClassFolder>/*.jpg|png|tif...` into one split (default 'test', for zero-shot eval).

    `label` is the index of the folder in sorted folder names; `class_name` the readable name
    ('DenseResidential' -> 'dense residential'). The manifest lists `class_names` (readable) and
    `raw_class_names` (folder names), both in label order. Non-image files in class folders are skipped
    and counted ('not an image file'); files directly in `root` are ignored.
    """
    root_path = pathlib.Path(root)
    if not root_path.is_dir():
        raise ConversionError(f"class folder root not found: {root_path}")
    folders = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConversionError(f"{root_path} has no class folders (expected root/<ClassName>/<image files>)")
    readable = [readable_class_name(folder.name) for folder in folders]
    log, tasks = SkipLog(), []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            record_id = f"{folder.name}/{path.name}"
            if path.suffix.lower() not in record_builder.IMAGE_SUFFIXES:
                log.add_input(Skip(skip_accounting.NOT_AN_IMAGE_FILE, record_id))
                continue
            tasks.append(ImageTask(split=split, id=record_id, source=name, name=record_id, image_path=str(path),
                                   label=label, class_name=readable[label]))
    extra = {"class_names": readable, "raw_class_names": [folder.name for folder in folders]}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare folders", log=log, manifest_extra=extra,
                  **options)


# ---------------------------------------------------------------------------------------------------------
# TFDS datasets prepared in array_record format


def _tfds_tasks(source: Any, *, split: str, name: str, where: str) -> Iterator[ImageTask]:
    """Lazy tasks over a mapped TFDS source (image bytes read one example at a time, bounded memory)."""
    for index in range(len(source)):
        example = source[index]
        record_id = str(example.get("id") or f"{split}/{index:08d}")
        yield ImageTask(
            split=split, id=record_id, source=name, name=f"{where}[{index}] ({record_id})",
            image_bytes=bytes(example.get("image") or b""), captions=tuple(example.get("captions", ())),
            long_caption=example.get("long_caption"), hard_negatives=tuple(example.get("hard_negatives", ())),
            label=int(example.get("label", -1)),
            class_name=readable_class_name(example["class_name"]) if example.get("class_name") else None,
        )


def prepare_tfds(
    dataset: str,
    splits: Sequence[str],
    out_dir: PathLike,
    *,
    data_dir: PathLike | None = None,
    name: str | None = None,
    mapping: Mapping[str, str] | None = None,
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert splits of a TFDS dataset prepared in array_record format (read with `tfds.data_source`,
    no TensorFlow needed) into geoalign shards. `mapping` names the TFDS features (see
    `sources.DEFAULT_TFDS_MAPPING`); label names come from the label feature's `names` when it has them.
    Ids are the mapped `id` feature, else `<split>/<index>`; empty image bytes count as broken images."""
    from geoalign_jax.data import sources

    name = name or re.sub(r"[^A-Za-z0-9_.]+", "-", dataset.split("/")[0])
    log = SkipLog()
    try:
        split_sources = {split: sources.tfds_source(dataset, split, data_dir=data_dir, mapping=mapping)
                         for split in splits}
    except (sources.SourceError, ImportError) as error:
        raise ConversionError(str(error)) from None
    class_names = next((s.class_names for s in split_sources.values() if s.class_names), [])
    tasks = itertools.chain.from_iterable(
        _tfds_tasks(source, split=split, name=name, where=f"{dataset}/{split}")
        for split, source in split_sources.items()
    )
    extra = {"class_names": [readable_class_name(c) for c in class_names], "raw_class_names": list(class_names)}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare tfds", log=log, manifest_extra=extra,
                  expected_counts={split: len(source) for split, source in split_sources.items()}, **options)
