"""Per-example training transforms: decode, box-aware augmentation, resize + CLIP normalisation, tokenisation.

Everything here works on one decoded record (see ``records.py``) and returns one example of fixed-shape numpy
arrays (the batch contract of ``geoalign_jax/batch_contract.py`` without the batch axis). The geometry is a set
of small pure numpy functions (crop parameters -> image op + box op) so that the property "a box still covers its
object after the augmentation" is testable on its own; ``TrainTransform`` strings them together and is the grain
``RandomMap`` used by ``pipeline.py``.

Why the geometry is planned before the image is decoded: the record carries the pixel size, so the crops, the
flip and the surviving boxes are known first; the JPEG is then decoded with ``Image.draft`` at the smallest
scale that still gives every output (global view, local crops, both kinds of region crops) full resolution,
which is most of the speed on large images.

Coordinates: continuous pixel coordinates, pixel ``k`` covers ``[k, k + 1)``; boxes are ``(x1, y1, x2, y2)``.
PIL's ``resize(box=...)`` uses the same convention, so a crop ``(x0, y0, w, h)`` maps a source point ``x`` to
``(x - x0) / w`` of the output width.
"""
from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

import grain

from geoalign_jax import tokenizer as tokenizer_lib

# Kept here (equal to geoalign_jax.models.clip.OPENAI_MEAN/STD, checked by a test) because data/ must not
# import models/ (docs/design.md: one direction, no back-edges; grain workers would also import jax for nothing).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CATEGORY_PROMPT = "a satellite image of {}."
#: Resampling filters for the data config's ``interpolation`` (bicubic = open_clip / FarSLIP training).
RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


# ----------------------------------------------------------------------------------------------------------
# Geometry: pure numpy.


@dataclasses.dataclass(frozen=True)
class Crop:
    """A crop rectangle in source pixel coordinates: left, top, width, height (floats allowed)."""

    x0: float
    y0: float
    width: float
    height: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` as PIL's ``resize(box=...)`` wants it."""
        return (self.x0, self.y0, self.x0 + self.width, self.y0 + self.height)

    def scaled(self, scale_x: float, scale_y: float) -> Crop:
        """The same rectangle in an image resized by ``(scale_x, scale_y)`` (e.g. a JPEG decoded with draft)."""
        return Crop(self.x0 * scale_x, self.y0 * scale_y, self.width * scale_x, self.height * scale_y)


def full_crop(width: int, height: int) -> Crop:
    """The whole image (the global view without random resized crop: a squash resize, as FarSLIP does)."""
    return Crop(0.0, 0.0, float(width), float(height))


def sample_resized_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> Crop:
    """torchvision's ``RandomResizedCrop.get_params`` (integer crop of a ``width x height`` image).

    Same algorithm (10 tries of area fraction ~ U(scale) and log-uniform aspect ratio, then a centre crop with
    the ratio clamped), so the crop statistics match the PyTorch recipes we reproduce; the RNG is numpy's.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return Crop(float(left), float(top), float(crop_w), float(crop_h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return Crop(float((width - crop_w) // 2), float((height - crop_h) // 2), float(crop_w), float(crop_h))


def sample_crop_within(
    rng: np.random.Generator, parent: Crop, scale: tuple[float, float], ratio: tuple[float, float]
) -> Crop:
    """A random resized crop of the region ``parent`` (source coordinates).

    Used for the local crops: sampling inside the global view keeps every local crop box within [0, 1] of the
    global view, which the patch-to-patch distillation needs (RoI-Align on the global patch map). With the
    global view being the whole image this is exactly FarSLIP's multicrop.
    """
    inner = sample_resized_crop(
        rng, max(1, int(round(parent.width))), max(1, int(round(parent.height))), scale, ratio
    )
    fx = parent.width / max(1, int(round(parent.width)))
    fy = parent.height / max(1, int(round(parent.height)))
    return Crop(parent.x0 + inner.x0 * fx, parent.y0 + inner.y0 * fy, inner.width * fx, inner.height * fy)


def transform_boxes(
    boxes: np.ndarray,
    crop: Crop,
    flip: bool,
    out_size: tuple[int, int],
    *,
    min_visible_fraction: float = 0.25,
    min_size_px: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the source image -> boxes of the augmented view, and which of them survive.

    ``boxes`` [N, 4] source pixels (x1, y1, x2, y2); the view is ``crop`` resized to ``out_size`` = (width,
    height), then mirrored left-right when ``flip``. Each box is clipped to the crop; it is kept when the visible
    part is at least ``min_visible_fraction`` of its area and at least ``min_size_px`` output pixels wide and
    high (a sliver at the crop border teaches nothing and RoI-Align of it is noise).

    Returns ``(normalised [N, 4] float32 in [0, 1] of the view, keep [N] bool)``; rows of dropped boxes hold
    their clipped (possibly empty) value and must be ignored.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1c, y1c, x2c, y2c = crop.box
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x1c, x2c),
            np.clip(boxes[:, 1], y1c, y2c),
            np.clip(boxes[:, 2], x1c, x2c),
            np.clip(boxes[:, 3], y1c, y2c),
        ],
        axis=1,
    )
    visible_w = np.maximum(clipped[:, 2] - clipped[:, 0], 0.0)
    visible_h = np.maximum(clipped[:, 3] - clipped[:, 1], 0.0)
    full_area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-12)
    out_w, out_h = out_size
    keep = (
        (visible_w * visible_h >= min_visible_fraction * full_area)
        & (visible_w * out_w / crop.width >= min_size_px)
        & (visible_h * out_h / crop.height >= min_size_px)
    )
    normalised = (clipped - np.array([x1c, y1c, x1c, y1c])) / np.array(
        [crop.width, crop.height, crop.width, crop.height]
    )
    if flip:
        normalised = np.stack(
            [1.0 - normalised[:, 2], normalised[:, 1], 1.0 - normalised[:, 0], normalised[:, 3]], axis=1
        )
    return np.clip(normalised, 0.0, 1.0).astype(np.float32), keep


def source_size_keep(boxes: np.ndarray, width: int, height: int, min_size: float, max_size: float) -> np.ndarray:
    """Which boxes ([N, 4] source pixels) FarSLIP's area filter keeps: the box clipped to the image, area in
    [min_size ** 2, max_size ** 2] source pixels (max_size 0 = no upper bound), as its data.py does before
    taking the crop."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped_w = np.clip(boxes[:, 2], 0, width) - np.clip(boxes[:, 0], 0, width)
    clipped_h = np.clip(boxes[:, 3], 0, height) - np.clip(boxes[:, 1], 0, height)
    area = clipped_w * clipped_h
    keep = area >= min_size**2
    if max_size > 0:
        keep &= area <= max_size**2
    return keep


def visible_part(box: tuple[float, float, float, float] | np.ndarray, view: Crop) -> Crop:
    """The part of source box ``(x1, y1, x2, y2)`` inside the view's crop, in source pixels (may be empty).

    The same clip as ``transform_boxes``, so ``crop_box_in_view(visible_part(box, view), view, flip)`` is that
    box's row of the view boxes: the region a ``region_view_crops`` entry shows is the region RoI-Align pools.
    """
    x1c, y1c, x2c, y2c = view.box
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    left, top = min(max(x1, x1c), x2c), min(max(y1, y1c), y2c)
    right, bottom = min(max(x2, x1c), x2c), min(max(y2, y1c), y2c)
    return Crop(left, top, max(right - left, 0.0), max(bottom - top, 0.0))


def crop_box_in_view(inner: Crop, view: Crop, flip: bool) -> np.ndarray:
    """Where the source rectangle ``inner`` lies in the (possibly flipped) view of ``view``: [4] in [0, 1]."""
    x1 = (inner.x0 - view.x0) / view.width
    x2 = (inner.x0 + inner.width - view.x0) / view.width
    y1 = (inner.y0 - view.y0) / view.height
    y2 = (inner.y0 + inner.height - view.y0) / view.height
    if flip:
        x1, x2 = 1.0 - x2, 1.0 - x1
    return np.clip(np.array([x1, y1, x2, y2], dtype=np.float32), 0.0, 1.0)


def crop_resize(
    image: Image.Image, crop: Crop, size: tuple[int, int], flip: bool = False, resample: int = Image.BICUBIC
) -> Image.Image:
    """The image op matching ``transform_boxes``: crop (float box), resize to ``size`` (w, h), mirror.

    PIL resizes straight from the crop box (no intermediate crop copy) and reduces large downscales first
    (``reducing_gap``), which keeps this fast for big aerial images.
    """
    out = image.resize(size, resample=resample, box=crop.box, reducing_gap=None if resample == Image.NEAREST else 3.0)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def normalise(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 CLIP-normalised (OpenAI mean/std), the model's input convention.

    A per-channel lookup table of the 256 possible values: the same numbers as ``(x / 255 - mean) / std`` in
    float32, at about half the cost of the arithmetic (this runs on every pixel of every view).
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels [H, W, 3], got {pixels.dtype} {pixels.shape}")
    out = np.empty(pixels.shape, np.float32)
    for channel in range(3):
        np.take(_NORM_TABLE[channel], pixels[..., channel], out=out[..., channel])
    return out


_NORM_SCALE = (1.0 / (255.0 * np.asarray(OPENAI_STD, dtype=np.float64))).astype(np.float32)
_NORM_SHIFT = (np.asarray(OPENAI_MEAN, dtype=np.float64) / np.asarray(OPENAI_STD, dtype=np.float64)).astype(
    np.float32
)
#: [3, 256] float32: normalised value of each uint8 level per channel.
_NORM_TABLE = np.ascontiguousarray(
    (np.arange(256, dtype=np.float32)[:, None] * _NORM_SCALE - _NORM_SHIFT).T.astype(np.float32)
)


def draft_scale_needed(crop: Crop, out_size: tuple[int, int]) -> float:
    """Smallest source scale at which ``crop`` still has at least ``out_size`` pixels (1 = full resolution)."""
    return min(1.0, max(out_size[0] / max(crop.width, 1e-6), out_size[1] / max(crop.height, 1e-6)))


def decode_image(
    data: bytes,
    expected_size: tuple[int, int] | None,
    min_scale: float = 1.0,
    *,
    where: str = "",
) -> tuple[Image.Image, float, float]:
    """Decode encoded image bytes to RGB, letting JPEG decode at a reduced scale >= ``min_scale``.

    The one image decoder of training and evaluation. Returns ``(image, scale_x, scale_y)`` (decoded size /
    ``expected_size``). Raises ``ValueError`` naming ``where`` (the record) when the bytes do not decode or the
    decoded size differs from ``expected_size`` (the record's width and height), so a broken record is skipped
    or reported, never used with boxes measured on another size. ``expected_size=None`` (image files that
    carry no size of their own) skips that check.
    """
    label = where or "(bytes)"
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several unrelated types for data that is not an image
        raise ValueError(f"cannot decode image {label}: {error}") from error
    width, height = expected_size if expected_size is not None else image.size
    if image.size != (width, height):
        raise ValueError(f"{where + ': ' if where else ''}image is {image.size[0]}x{image.size[1]} "
                         f"but the record says {width}x{height}")
    if image.format == "JPEG" and min_scale < 0.5:
        image.draft("RGB", (max(1, math.ceil(width * min_scale)), max(1, math.ceil(height * min_scale))))
    try:
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
    except Exception as error:  # truncated or corrupt pixel data only shows when decoding
        raise ValueError(f"cannot decode image {label}: {error}") from error
    return image, image.size[0] / width, image.size[1] / height


# ----------------------------------------------------------------------------------------------------------
# The per-example transform.


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """The part of the data config a worker needs, as a frozen (hashable, picklable) value.

    Field meanings are documented once, in ``pipeline.default_data_config``.
    """

    image_size: int = 224
    context_length: int = 77
    long_context_length: int = 248
    num_hard_negatives: int = 0
    max_regions: int = 0
    region_crop_size: int = 0
    region_view_crop_size: int = 0
    num_local_crops: int = 0
    local_crop_size: int = 0
    local_crop_scale: tuple[float, float] = (0.3, 0.7)
    local_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    random_resized_crop: bool = True
    random_resized_crop_scale: tuple[float, float] = (0.5, 1.0)
    random_resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    min_box_visible_fraction: float = 0.25
    min_box_size_px: float = 2.0
    region_min_source_size: float = 0.0
    region_max_source_size: float = 0.0
    category_prompt: str = DEFAULT_CATEGORY_PROMPT
    category_ids: tuple[tuple[str, int], ...] = ()
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("image_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data config: {name} must be positive, got {getattr(self, name)}")
        for name in (
            "long_context_length",
            "num_hard_negatives",
            "max_regions",
            "region_crop_size",
            "region_view_crop_size",
            "num_local_crops",
            "local_crop_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"data config: {name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("random_resized_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"data config: {name} must satisfy 0 < min <= max <= 1, got {(low, high)}")
        for name in ("random_resized_crop_ratio", "local_crop_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"data config: {name} must satisfy 0 < min <= max, got {(low, high)}")
        for name in ("region_min_source_size", "region_max_source_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"data config: {name} must be >= 0 (0 = no bound), got {getattr(self, name)}")
        if 0 < self.region_max_source_size < self.region_min_source_size:
            raise ValueError(
                f"data config: region_max_source_size {self.region_max_source_size} is below region_min_source_size "
                f"{self.region_min_source_size}"
            )
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"data config: hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.interpolation not in RESAMPLING:
            raise ValueError(
                f"data config: interpolation must be one of {sorted(RESAMPLING)}, got {self.interpolation!r}"
            )
        if "{}" not in self.category_prompt:
            raise ValueError(f"data config: category_prompt needs a '{{}}' placeholder, got {self.category_prompt!r}")

    @property
    def local_size(self) -> int:
        return self.local_crop_size or self.image_size


def output_spec(config: TransformConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Keys, shapes (no batch axis) and dtypes of one example for ``config``: the batch contract."""
    size, length = config.image_size, config.context_length
    spec: dict[str, tuple[tuple[int, ...], Any]] = {
        "image": ((size, size, 3), np.float32),
        "text": ((length,), np.int32),
    }
    if config.long_context_length:
        spec["long_text"] = ((config.long_context_length,), np.int32)
        spec["long_text_mask"] = ((), np.bool_)  # True: a real long caption; False: the short caption stands in
    if config.num_hard_negatives:
        spec["hard_negatives"] = ((config.num_hard_negatives, length), np.int32)
        spec["hard_negative_mask"] = ((config.num_hard_negatives,), np.bool_)
    if config.max_regions:
        regions = config.max_regions
        spec["region_boxes"] = ((regions, 4), np.float32)
        spec["region_mask"] = ((regions,), np.bool_)
        spec["region_text"] = ((regions, length), np.int32)
        spec["region_category"] = ((regions,), np.int32)
        if config.region_crop_size:
            crop = config.region_crop_size
            spec["region_crops"] = ((regions, crop, crop, 3), np.float32)
        if config.region_view_crop_size:
            crop = config.region_view_crop_size
            spec["region_view_crops"] = ((regions, crop, crop, 3), np.float32)
    if config.num_local_crops:
        local = config.local_size
        spec["local_crops"] = ((config.num_local_crops, local, local, 3), np.float32)
        spec["local_crop_boxes"] = ((config.num_local_crops, 4), np.float32)
    return {key: (shape, np.dtype(dtype)) for key, (shape, dtype) in spec.items()}


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Sentinel for a record that could not be turned into an example; counted and dropped downstream."""

    where: str
    reason: str


class ExampleError(ValueError):
    """A record that decodes but cannot make a training example (no text at all, image size mismatch...)."""


def _region_category(region: Mapping[str, Any], category_ids: Mapping[str, int]) -> int:
    """Category id used by the category losses: -1 for free-text regions (FarSLIP), else the id.

    With an explicit ``category_ids`` mapping the id comes from the category name (a name missing from the
    mapping gets -1: still a region-text pair, excluded from the category losses); otherwise the record's
    own ``category_id``, assigned once by the converter, so every host and worker agrees without coordination.
    """
    if region.get("caption"):
        return -1
    name = region.get("category")
    if category_ids:
        return int(category_ids.get(name, -1)) if name else -1
    return int(region.get("category_id", -1))


def fallback_caption(record: Mapping[str, Any], prompt: str) -> str:
    """A caption for a record that has none (classification or detection data such as DOTA): the category
    prompt of its class name, else of its (up to three most frequent) region categories. Raises ExampleError
    when there is nothing to say, so such a record is skipped and counted rather than paired with no text."""
    class_name = record.get("class_name")
    if class_name:
        return prompt.format(class_name)
    counts: dict[str, int] = {}
    for region in record.get("regions") or []:
        if region.get("category"):
            counts[region["category"]] = counts.get(region["category"], 0) + 1
    if not counts:
        raise ExampleError("record has no caption, no long caption, no class name and no region category")
    names = sorted(counts, key=lambda name: (-counts[name], name))[:3]
    return prompt.format(names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def _region_text(region: Mapping[str, Any], prompt: str) -> str:
    caption = region.get("caption")
    if caption:
        return caption
    category = region.get("category")
    if not category:
        raise ExampleError("a region has neither a caption nor a category")
    return prompt.format(category)


class TrainTransform(grain.transforms.RandomMap):
    """Decoded record + per-example RNG -> one training example (dict of fixed-shape numpy arrays).

    Steps: choose the global crop and flip -> move/clip/drop the region boxes -> pick at most ``max_regions``
    of the survivors at random -> sample the local crops inside the global view -> decode the image once at
    the smallest JPEG draft scale that serves every output -> resize + normalise each view -> tokenise one
    random caption, the long text, ``num_hard_negatives`` random hard negatives and the region texts.

    Picklable (a frozen config and a tokenizer), so grain's spawned workers can rebuild it.
    """

    def __init__(self, config: TransformConfig):
        self.config = config
        self._tokenize = tokenizer_lib.Tokenizer(config.context_length)
        self._tokenize_long = (
            tokenizer_lib.Tokenizer(config.long_context_length) if config.long_context_length else None
        )
        self._category_ids = dict(config.category_ids)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return make_example(element, rng, self.config, self._tokenize, self._tokenize_long, self._category_ids)


def make_example(
    record: Mapping[str, Any],
    rng: np.random.Generator,
    config: TransformConfig,
    tokenize: tokenizer_lib.Tokenizer,
    tokenize_long: tokenizer_lib.Tokenizer | None,
    category_ids: Mapping[str, int],
) -> dict[str, np.ndarray]:
    """The body of ``TrainTransform.random_map`` (see there). Raises ``ExampleError``/``ValueError``/``OSError``
    for records that cannot make an example; the pipeline turns those into counted skips."""
    width, height = int(record["width"]), int(record["height"])
    size = config.image_size
    captions = [c for c in record.get("captions") or [] if c]
    long_caption = record.get("long_caption") or None
    if not captions and not long_caption:
        captions = [fallback_caption(record, config.category_prompt)]

    # Geometry first (record size is known), pixels later.
    if config.random_resized_crop:
        view = sample_resized_crop(
            rng, width, height, config.random_resized_crop_scale, config.random_resized_crop_ratio
        )
    else:
        view = full_crop(width, height)
    flip = bool(rng.random() < config.hflip_prob) if config.hflip_prob > 0 else False
    needed_scale = draft_scale_needed(view, (size, size))

    example: dict[str, np.ndarray] = {}
    chosen_regions: list[Mapping[str, Any]] = []
    if config.max_regions:
        regions = list(record.get("regions") or [])
        boxes = np.asarray([r["box"] for r in regions], dtype=np.float64).reshape(-1, 4)
        view_boxes, keep = transform_boxes(
            boxes,
            view,
            flip,
            (size, size),
            min_visible_fraction=config.min_box_visible_fraction,
            min_size_px=config.min_box_size_px,
        )
        if config.region_min_source_size or config.region_max_source_size:
            keep &= source_size_keep(boxes, width, height, config.region_min_source_size, config.region_max_source_size)
        survivors = np.flatnonzero(keep)
        if len(survivors) > config.max_regions:
            survivors = np.sort(rng.choice(survivors, size=config.max_regions, replace=False))
        chosen_regions = [regions[i] for i in survivors]
        count = len(survivors)
        region_boxes = np.zeros((config.max_regions, 4), np.float32)
        region_boxes[:count] = view_boxes[survivors]
        region_mask = np.zeros((config.max_regions,), np.bool_)
        region_mask[:count] = True
        region_category = np.full((config.max_regions,), -1, np.int32)
        region_category[:count] = [_region_category(r, category_ids) for r in chosen_regions]
        example["region_boxes"] = region_boxes
        example["region_mask"] = region_mask
        example["region_category"] = region_category
        if config.region_crop_size:
            crop_out = (config.region_crop_size, config.region_crop_size)
            for region in chosen_regions:
                x1, y1, x2, y2 = region["box"]
                needed_scale = max(needed_scale, draft_scale_needed(Crop(x1, y1, x2 - x1, y2 - y1), crop_out))
        if config.region_view_crop_size:
            view_crop_out = (config.region_view_crop_size, config.region_view_crop_size)
            visible = [visible_part(region["box"], view) for region in chosen_regions]
            for part in visible:
                needed_scale = max(needed_scale, draft_scale_needed(part, view_crop_out))

    local_views: list[Crop] = []
    if config.num_local_crops:
        local = config.local_size
        for _ in range(config.num_local_crops):
            local_views.append(sample_crop_within(rng, view, config.local_crop_scale, config.local_crop_ratio))
        needed_scale = max(needed_scale, *(draft_scale_needed(c, (local, local)) for c in local_views))

    # Texts (rng order fixed: caption, then hard negatives).
    if captions:
        caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    else:
        caption = long_caption
    short_texts = [caption]
    negatives: list[str] = []
    if config.num_hard_negatives:
        pool = [n for n in record.get("hard_negatives") or [] if n]
        if len(pool) > config.num_hard_negatives:
            picks = rng.choice(len(pool), size=config.num_hard_negatives, replace=False)
            negatives = [pool[i] for i in sorted(picks)]
        else:
            negatives = pool
        short_texts += negatives
    if config.max_regions:
        short_texts += [_region_text(r, config.category_prompt) for r in chosen_regions]

    # Pixels.
    resample = RESAMPLING[config.interpolation]
    image, scale_x, scale_y = decode_image(record["image"], (width, height), needed_scale)
    example["image"] = normalise(crop_resize(image, view.scaled(scale_x, scale_y), (size, size), flip, resample))
    if config.max_regions and config.region_crop_size:
        # The ORIGINAL image at the record's box (FarSLIP's CLS region alignment): whole, not clipped to the
        # global crop and not flipped, squashed to a square like FarSLIP's region transform.
        crop_out = (config.region_crop_size, config.region_crop_size)
        region_crops = np.zeros((config.max_regions, *crop_out[::-1], 3), np.float32)
        for index, region in enumerate(chosen_regions):
            x1, y1, x2, y2 = region["box"]
            region_crops[index] = normalise(
                crop_resize(image, Crop(x1, y1, x2 - x1, y2 - y1).scaled(scale_x, scale_y), crop_out, False, resample)
            )
        example["region_crops"] = region_crops
    if config.max_regions and config.region_view_crop_size:
        # What the RoI side of global<->region consistency pools: the box's part inside the global crop,
        # flipped with the view, at crop resolution (from the source pixels, not upsampled from the view).
        region_view_crops = np.zeros((config.max_regions, *view_crop_out[::-1], 3), np.float32)
        for index, part in enumerate(visible):
            region_view_crops[index] = normalise(
                crop_resize(image, part.scaled(scale_x, scale_y), view_crop_out, flip, resample)
            )
        example["region_view_crops"] = region_view_crops
    if config.num_local_crops:
        local = config.local_size
        example["local_crops"] = np.stack(
            [
                normalise(crop_resize(image, c.scaled(scale_x, scale_y), (local, local), flip, resample))
                for c in local_views
            ]
        )
        example["local_crop_boxes"] = np.stack([crop_box_in_view(c, view, flip) for c in local_views])

    # Tokens.
    tokens = tokenize(short_texts)
    example["text"] = tokens[0]
    if config.num_hard_negatives:
        k = config.num_hard_negatives
        hard_negatives = np.zeros((k, config.context_length), np.int32)
        hard_negatives[: len(negatives)] = tokens[1 : 1 + len(negatives)]
        mask = np.zeros((k,), np.bool_)
        mask[: len(negatives)] = True
        example["hard_negatives"] = hard_negatives
        example["hard_negative_mask"] = mask
    if config.max_regions:
        region_text = np.zeros((config.max_regions, config.context_length), np.int32)
        start = 1 + len(negatives)
        region_text[: len(chosen_regions)] = tokens[start : start + len(chosen_regions)]
        example["region_text"] = region_text
    if tokenize_long is not None:
        # No long description: the chosen caption stands in (a fixed-shape placeholder) and `long_text_mask` is
        # False, so the long-text and short-long consistency losses leave the example out instead of training
        # "long" text on a short caption.
        example["long_text"] = tokenize_long([long_caption or caption])[0]
        example["long_text_mask"] = np.bool_(long_caption is not None)
    return example


def describe_failure(error: BaseException) -> str:
    """One line for the skip log: exception type and message."""
    return f"{type(error).__name__}: {error}"

