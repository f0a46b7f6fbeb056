"""Per-example training transforms: decode, box-aware augmentation, resize + CLIP normalisation, tokenisation.

Everything here works on one decoded record (see ``records.py``) and returns one example of fixed-shape numpy
arrays (the batch contract of ``geoalign_jax/batch_contract.py`` without the batch axis). The geometry
(``image_ops.py``) is a set of small pure numpy functions (crop parameters -> image op + box op) so that the property "a box still covers its
object after the augmentation" is testable on its own; ``TrainTransform`` strings them together and is the grain
``RandomMap`` used by ``pipeline.py``.

Why the geometry is planned before the image is decoded: the record carries the pixel size, so the crops, the
flip and the surviving boxes are known first; the JPEG is then decoded with ``Image.draft`` at the smallest
scale that still gives every output (global view, local crops, both kinds of region crops) full resolution,
which is most of the speed on large images.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import grain

from geoalign_jax import tokenizer as tokenizer_lib
from geoalign_jax.data.image_ops import (
    RESAMPLING, Crop, crop_box_in_view, crop_resize, decode_image, draft_scale_needed, full_crop, normalise,
    sample_crop_within, sample_resized_crop, source_size_keep, transform_boxes, visible_part,
)

DEFAULT_CATEGORY_PROMPT = "a satellite image of {}."


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
    own ``category_id``, assigned once by `prepare`, so every host and worker agrees without coordination.
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
        return make_train_example(element, rng, self.config, self._tokenize, self._tokenize_long, self._category_ids)


def make_train_example(
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

