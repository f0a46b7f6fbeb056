"""Building one stored record from one input (`ImageTask` -> `BuildResult`): image loading and checking, box
clipping, text cleaning, the record's bytes, its fingerprint and token counts. Runs in worker processes, so it
never imports jax."""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from geoalign_jax.data import fingerprints, records, text_stats
from geoalign_jax.data.skip_accounting import (
    ANNOTATION,
    BOX_OUTSIDE_IMAGE,
    BROKEN_IMAGE,
    DEGENERATE_BOX,
    EMPTY_CAPTION,
    INVALID_RECORD,
    NO_CAPTIONS,
    NO_TEXT,
    RECORD,
    REGION_WITHOUT_TEXT,
    SIZE_MISMATCH,
    UNKNOWN_FILE,
    UNSUPPORTED_IMAGE_MODE,
    Skip,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
#: PIL modes that map to RGB without losing meaning; 16-bit / float images are refused, not silently scaled.
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclasses.dataclass(frozen=True)
class RawRegion:
    """A region as the annotation gives it, before clipping to the image: [x1, y1, x2, y2] float pixels."""

    box: tuple[float, float, float, float]
    category: str | None = None
    category_id: int = -1
    caption: str | None = None
    name: str = ""  # where it comes from, for skip reports (e.g. "P0706.txt:7")


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """Everything a worker needs to build one record; small and picklable (image bytes only when no path).

    Captions, hard negatives and regions are passed raw: the worker drops blank texts and boxes that do not
    fit, so every prepare format applies the same rules in one place.
    """

    split: str
    id: str
    source: str
    name: str  # file name used in skip reports
    image_path: str | None = None
    image_bytes: bytes | None = None
    captions: tuple[Any, ...] = ()
    long_caption: Any = None
    hard_negatives: tuple[Any, ...] = ()
    regions: tuple[RawRegion, ...] = ()
    label: int = -1
    class_name: str | None = None
    expected_size: tuple[int, int] | None = None  # (width, height) the annotation was made for
    require: str = "nothing"  # "captions": needs a caption; "text": caption, long caption or region


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Rules shared by every prepare format. `min_box_visible` = the fraction of a box's area that must stay inside
    the image for the clipped box to be kept (otherwise the region is dropped as 'box outside image')."""

    min_box_visible: float = 0.5
    reencode_format: str = "PNG"  # used for images that are not JPEG/PNG (TIFF, BMP, WebP): lossless


@dataclasses.dataclass(frozen=True)
class BuildResult:
    split: str
    record: bytes | None
    skips: tuple[Skip, ...]
    annotations_seen: int
    # of a written record: (SHA-256 of the stored image bytes, perceptual hash), see data/fingerprints.py
    fingerprint: tuple[bytes, int] | None = None
    # of a written record: token counts of its texts by kind, see data/text_stats.py
    token_counts: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def load_image(path: str | None, data: bytes | None, options: BuildOptions) -> tuple[bytes, int, int]:
    """Read, fully decode (truncated files fail here, `verify()` would not catch them) and return the bytes
    to store with the pixel size. JPEG/PNG bytes are kept as they are; other formats are re-encoded."""
    data, width, height, _ = _load_image(path, data, options)
    return data, width, height


def _load_image(path: str | None, data: bytes | None, options: BuildOptions
                ) -> tuple[bytes, int, int, tuple[bytes, int]]:
    """`load_image` plus the stored bytes' fingerprint, from the pixels already decoded when the bytes are
    stored as they came (re-encoded bytes are decoded once more: the fingerprint is of what is stored)."""
    from PIL import Image  # local: keeps the parent's import cheap

    if data is None:
        data = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
        if image.mode not in _CONVERTIBLE_MODES:
            raise _UnsupportedMode(f"mode {image.mode}")
        if records.image_format(data[:8]) is not None:
            return data, width, height, fingerprints.fingerprint(data, fingerprints.thumbnail(image))
        converted = image.convert("RGBA" if "A" in image.mode else "RGB") if image.mode not in ("RGB", "L") else image
        buffer = io.BytesIO()
        if options.reencode_format.upper() == "JPEG":
            converted.convert("RGB").save(buffer, format="JPEG", quality=95)
        else:
            converted.save(buffer, format="PNG")
        stored = buffer.getvalue()
        return stored, width, height, fingerprints.fingerprint(stored)


class _UnsupportedMode(ValueError):
    pass


def clip_box(
    box: Sequence[float], width: int, height: int, min_visible: float
) -> tuple[list[float] | None, str | None]:
    """Clip an [x1, y1, x2, y2] box to the image. Returns (box, None) or (None, reason): a degenerate box, or
    one of which less than `min_visible` of its area lies inside the image, is refused."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, DEGENERATE_BOX
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None, DEGENERATE_BOX
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
    if cx2 <= cx1 or cy2 <= cy1:
        return None, BOX_OUTSIDE_IMAGE
    visible = (cx2 - cx1) * (cy2 - cy1) / ((x2 - x1) * (y2 - y1))
    if visible < min_visible:
        return None, BOX_OUTSIDE_IMAGE
    return [cx1, cy1, cx2, cy2], None


def _clean_texts(texts: Iterable[Any], reason: str, name: str, skips: list[Skip]) -> list[str]:
    kept = []
    for text in texts:
        if isinstance(text, str) and text.strip():
            kept.append(text.strip())
        else:
            skips.append(Skip(reason, name, ANNOTATION))
    return kept


def build_record(task: ImageTask, options: BuildOptions) -> BuildResult:
    """Turn one task into record bytes, or into a record-level skip; never raises for bad input."""
    skips: list[Skip] = []
    annotations_seen = len(task.captions) + len(task.hard_negatives) + len(task.regions)
    annotations_seen += task.long_caption is not None

    def dropped(reason: str) -> BuildResult:
        # annotations count as seen only once the image loaded (then some may have been dropped already)
        seen = annotations_seen if skips else 0
        return BuildResult(task.split, None, tuple(skips) + (Skip(reason, task.name, RECORD),), seen)

    if task.image_bytes is None and (task.image_path is None or not os.path.isfile(task.image_path)):
        return dropped(UNKNOWN_FILE)
    try:
        image, width, height, image_fingerprint = _load_image(task.image_path, task.image_bytes, options)
    except _UnsupportedMode as error:
        return dropped(f"{UNSUPPORTED_IMAGE_MODE} ({error})")
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... for bad files
        return dropped(BROKEN_IMAGE)
    if task.expected_size is not None and tuple(task.expected_size) != (width, height):
        return dropped(SIZE_MISMATCH)

    captions = _clean_texts(task.captions, EMPTY_CAPTION, task.name, skips)
    hard_negatives = _clean_texts(task.hard_negatives, EMPTY_CAPTION, task.name, skips)
    long_caption = None
    if task.long_caption is not None:
        cleaned = _clean_texts([task.long_caption], EMPTY_CAPTION, task.name, skips)
        long_caption = cleaned[0] if cleaned else None
    regions = []
    for index, raw in enumerate(task.regions):
        region_name = raw.name or f"{task.name} (region {index})"
        box, reason = clip_box(raw.box, width, height, options.min_box_visible)
        category = raw.category.strip() if isinstance(raw.category, str) and raw.category.strip() else None
        caption = raw.caption.strip() if isinstance(raw.caption, str) and raw.caption.strip() else None
        if reason is None and category is None and caption is None:
            reason = REGION_WITHOUT_TEXT
        if reason is not None:
            skips.append(Skip(reason, region_name, ANNOTATION))
            continue
        regions.append(records.make_region(box, category=category, category_id=raw.category_id, caption=caption))

    if task.require == "captions" and not captions:
        return dropped(NO_CAPTIONS)
    if task.require == "text" and not (captions or long_caption or regions):
        return dropped(NO_TEXT)
    example = records.make_record(
        id=task.id, source=task.source, split=task.split, image=image, width=width, height=height,
        captions=captions, long_caption=long_caption, hard_negatives=hard_negatives, regions=regions,
        label=task.label, class_name=task.class_name,
    )
    try:
        data = records.encode_record(example)
    except records.RecordError as error:
        return dropped(f"{INVALID_RECORD}: {error}")
    return BuildResult(task.split, data, tuple(skips), annotations_seen, image_fingerprint,
                       text_stats.record_token_counts(example))


class RecordBuilder:
    """Picklable `build_record` with its options bound (a lambda would not cross to spawned workers)."""

    def __init__(self, options: BuildOptions):
        self.options = options

    def __call__(self, task: ImageTask) -> BuildResult:
        return build_record(task, self.options)
