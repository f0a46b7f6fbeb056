"""The geoalign record format, version 1: one image with all of its text, as a pickle-free msgpack map.

Why msgpack and a closed schema: shards are exchanged between people, so reading one must never run code
(pickle would), and a reader must be able to tell a record of another format or version from a broken one
and say which shard and record it is. See docs/data_format.md for the documented layout.

A decoded record is a plain dict::

    {"format": "geoalign-record", "version": 1, "id": str, "source": str, "split": str,
     "image": bytes (encoded JPEG or PNG), "width": int, "height": int,
     "captions": [str, ...], "long_caption": str | None, "hard_negatives": [str, ...],
     "regions": [{"box": [x1, y1, x2, y2] (float pixels), "category": str | None,
                  "category_id": int (-1 = none), "caption": str | None}, ...],
     "label": int (-1 = none), "class_name": str | None}
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

FORMAT_NAME = "geoalign-record"
FORMAT_VERSION = 1
#: Present in a dataset folder while `prepare` puts shards into place (written before the first shard is
#: renamed / uploaded or the old manifest removed, deleted once the new manifest is in place): a reader of a
#: shard glob refuses such a folder, whose shards may be part old dataset, part new.
UNFINISHED_NAME = ".prepare-unfinished"

#: Fields every example must carry (the image and where it comes from).
REQUIRED_FIELDS = ("id", "source", "split", "image", "width", "height")
#: Optional fields and the value a record gets when the example leaves them out.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "captions": [],
    "long_caption": None,
    "hard_negatives": [],
    "regions": [],
    "label": -1,
    "class_name": None,
}
RECORD_FIELDS = ("format", "version") + REQUIRED_FIELDS + tuple(OPTIONAL_DEFAULTS)
REGION_FIELDS = ("box", "category", "category_id", "caption")

#: Leading bytes of the two image encodings a record may hold (`prepare` re-encodes anything else to PNG).
_IMAGE_SIGNATURES = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


class RecordError(ValueError):
    """A record or example that does not follow the format; the message names the field and where it is."""


def image_format(image: bytes) -> str | None:
    """'jpeg' or 'png' from the leading bytes of an encoded image, None for anything else."""
    for signature, name in _IMAGE_SIGNATURES.items():
        if image.startswith(signature):
            return name
    return None


def make_region(
    box: Sequence[float],
    *,
    category: str | None = None,
    category_id: int = -1,
    caption: str | None = None,
) -> dict[str, Any]:
    """A region dict with every field present (box as floats), so callers need not remember the defaults."""
    return {
        "box": [float(value) for value in box],
        "category": category,
        "category_id": int(category_id),
        "caption": caption,
    }


def make_record(
    *,
    id: str,  # noqa: A002 - the field is called id in the format
    source: str,
    split: str,
    image: bytes,
    width: int,
    height: int,
    captions: Sequence[str] = (),
    long_caption: str | None = None,
    hard_negatives: Sequence[str] = (),
    regions: Sequence[Mapping[str, Any]] = (),
    label: int = -1,
    class_name: str | None = None,
) -> dict[str, Any]:
    """An example dict with every field present; regions are completed with `make_region` defaults."""
    return {
        "id": id,
        "source": source,
        "split": split,
        "image": image,
        "width": width,
        "height": height,
        "captions": list(captions),
        "long_caption": long_caption,
        "hard_negatives": list(hard_negatives),
        "regions": [_complete_region(region) for region in regions],
        "label": label,
        "class_name": class_name,
    }


def _complete_region(region: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(region, Mapping):
        return region  # left for validate_example to report with its index
    completed = {"category": None, "category_id": -1, "caption": None}
    completed.update(region)
    return completed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_text(value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        expected = "a string or None" if optional else "a string"
        raise RecordError(f"field {field!r}: expected {expected}, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"field {field!r}: empty text (use None or leave it out)")


def _check_text_list(value: Any, field: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"field {field!r}: expected a list of strings, got {type(value).__name__}")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise RecordError(f"field '{field}[{index}]': expected a string, got {type(text).__name__}")
        if not text.strip():
            raise RecordError(f"field '{field}[{index}]': empty caption")


def validate_box(box: Any, width: int, height: int, field: str = "box") -> None:
    """Raise RecordError unless `box` is [x1, y1, x2, y2] finite pixels with 0 <= x1 < x2 <= width (same for y)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise RecordError(f"field {field!r}: expected [x1, y1, x2, y2] numbers, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RecordError(f"field {field!r}: non-finite coordinate in {box!r}")
    if x2 <= x1 or y2 <= y1:
        raise RecordError(f"field {field!r}: degenerate box {box!r} (needs x2 > x1 and y2 > y1)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise RecordError(f"field {field!r}: box {box!r} outside the {width}x{height} image")


def _validate_region(region: Any, index: int, width: int, height: int) -> None:
    field = f"regions[{index}]"
    if not isinstance(region, Mapping):
        raise RecordError(f"field {field!r}: expected a mapping, got {type(region).__name__}")
    unknown = sorted(set(region) - set(REGION_FIELDS))
    if unknown:
        raise RecordError(f"field {field!r}: unknown keys {unknown} (allowed: {list(REGION_FIELDS)})")
    if "box" not in region:
        raise RecordError(f"field '{field}.box': missing")
    validate_box(region["box"], width, height, f"{field}.box")
    _check_text(region.get("category"), f"{field}.category", optional=True)
    _check_text(region.get("caption"), f"{field}.caption", optional=True)
    category_id = region.get("category_id", -1)
    if not _is_int(category_id) or category_id < -1:
        raise RecordError(f"field '{field}.category_id': expected an int >= -1, got {category_id!r}")
    if region.get("category") is None and region.get("caption") is None:
        raise RecordError(f"field {field!r}: a region needs a category or a caption")


def validate_example(example: Mapping[str, Any]) -> None:
    """Raise RecordError naming the first field that breaks the format; return None for a valid example.

    Optional fields may be left out (they get their defaults when encoded); unknown fields are refused so a
    misspelt field cannot be dropped silently. The image is checked to be JPEG/PNG bytes but not decoded
    (decoding is the job of `prepare`, and too slow to repeat on every read).
    """
    if not isinstance(example, Mapping):
        raise RecordError(f"expected a mapping, got {type(example).__name__}")
    where = f" (id {example['id']!r})" if isinstance(example.get("id"), str) else ""
    try:
        _validate_example_fields(example)
    except RecordError as error:
        raise RecordError(f"{error}{where}") from None


def _validate_example_fields(example: Mapping[str, Any]) -> None:
    unknown = sorted(set(example) - set(RECORD_FIELDS))
    if unknown:
        raise RecordError(f"unknown fields {unknown} (allowed: {list(RECORD_FIELDS)})")
    if "format" in example and example["format"] != FORMAT_NAME:
        raise RecordError(f"field 'format': expected {FORMAT_NAME!r}, got {example['format']!r}")
    if "version" in example and example["version"] != FORMAT_VERSION:
        raise RecordError(f"field 'version': expected {FORMAT_VERSION}, got {example['version']!r}")
    for field in REQUIRED_FIELDS:
        if field not in example or example[field] is None:
            raise RecordError(f"field {field!r}: missing")
    for field in ("id", "source", "split"):
        _check_text(example[field], field, optional=False)
    image = example["image"]
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise RecordError(f"field 'image': expected encoded image bytes, got {type(image).__name__}")
    if len(image) == 0:
        raise RecordError("field 'image': missing (empty bytes)")
    if image_format(bytes(image[:8])) is None:
        raise RecordError("field 'image': not JPEG or PNG bytes (converters re-encode other formats to PNG)")
    width, height = example["width"], example["height"]
    for field, value in (("width", width), ("height", height)):
        if not _is_int(value) or value <= 0:
            raise RecordError(f"field {field!r}: expected a positive int, got {value!r}")
    if "captions" in example:
        _check_text_list(example["captions"], "captions")
    if "hard_negatives" in example:
        _check_text_list(example["hard_negatives"], "hard_negatives")
    _check_text(example.get("long_caption"), "long_caption", optional=True)
    _check_text(example.get("class_name"), "class_name", optional=True)
    label = example.get("label", -1)
    if not _is_int(label) or label < -1:
        raise RecordError(f"field 'label': expected an int >= -1, got {label!r}")
    regions = example.get("regions", [])
    if not isinstance(regions, (list, tuple)):
        raise RecordError(f"field 'regions': expected a list, got {type(regions).__name__}")
    for index, region in enumerate(regions):
        _validate_region(region, index, width, height)


def _normalised(example: Mapping[str, Any]) -> dict[str, Any]:
    """The full record dict in field order: defaults filled in, boxes as floats, image as bytes."""
    record: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    for field in REQUIRED_FIELDS:
        record[field] = example[field]
    record["image"] = bytes(record["image"])
    for field, default in OPTIONAL_DEFAULTS.items():
        value = example.get(field, default)
        record[field] = list(value) if isinstance(value, (list, tuple)) else value
    record["regions"] = [make_region(r["box"], category=r.get("category"), category_id=r.get("category_id", -1),
                                     caption=r.get("caption")) for r in record["regions"]]
    return record


def encode_record(example: Mapping[str, Any]) -> bytes:
    """Validate `example` and serialise it as a version-1 record (msgpack map, no pickle)."""
    validate_example(example)
    return msgpack.packb(_normalised(example), use_bin_type=True)


def decode_record(data: bytes, *, where: str = "") -> dict[str, Any]:
    """Parse and check one record; RecordError names `where` (shard path and record index) when it is not ours.

    Records of another format or version and broken bytes are told apart, so a user knows whether to
    upgrade geoalign-jax, re-run `prepare`, or replace a damaged shard.
    """
    prefix = f"{where}: " if where else ""
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # msgpack raises several unrelated types for broken input
        raise RecordError(f"{prefix}broken record, not a valid msgpack map ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{prefix}broken record, expected a msgpack map, got {type(record).__name__}")
    if record.get("format") != FORMAT_NAME:
        raise RecordError(f"{prefix}not a {FORMAT_NAME} record (format field {record.get('format')!r})")
    version = record.get("version")
    if version != FORMAT_VERSION:
        newer = _is_int(version) and version > FORMAT_VERSION
        hint = " (written by a newer geoalign-jax; upgrade to read it)" if newer else ""
        raise RecordError(f"{prefix}record format version {version!r}, this reader reads version {FORMAT_VERSION}{hint}")
    missing = [field for field in RECORD_FIELDS if field not in record]
    if missing:
        raise RecordError(f"{prefix}broken record, missing fields {missing}")
    try:
        validate_example(record)
    except RecordError as error:
        raise RecordError(f"{prefix}invalid record: {error}") from None
    return record
