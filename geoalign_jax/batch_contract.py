"""The batch contract between the data pipeline and the losses, written once: every key a training batch may
hold, what it means, which data-config setting makes the pipeline produce it, and which loss terms read it.

Neutral ground: `data/` and `losses/` never import each other; both import this module.
- `data.pipeline.batch_spec` refuses to describe a batch holding a key not named in `BATCH_KEYS`;
  the shapes and dtypes for a given data config are the pipeline's (`batch_spec`).
- `losses.objective` hands every loss term only the keys `TERM_BATCH_KEYS` (and `OPTION_BATCH_KEYS`) declare
  for it, so a term that reads anything else fails when traced, and an enabled term whose key is absent is
  an error naming term and key.
- `train.experiment.check_config` refuses a config whose enabled terms read a key its data config does not
  produce, naming the data setting that turns it on (`BatchKey.produced_when`).

Shapes below are per host: B = data.batch_size // process_count, L = data.context_length, L_long =
data.long_context_length, K = data.num_hard_negatives, R = data.max_regions, C = data.num_local_crops.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# What "normalised" means for every image array of a batch (`image` and the crops): OpenAI CLIP's per-channel
# pixel mean and std on [0, 1] values. One definition for the data pipeline and the models (the converters'
# exported preprocessing configs), which may not import each other.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """One batch key: its per-host shape and dtype, what it holds, and the data setting that produces it."""

    shape: str
    meaning: str
    produced_when: str


BATCH_KEYS: Mapping[str, BatchKey] = {
    "image": BatchKey("[B, H, H, 3] float32", "the normalised global view (H = data.image_size)", "always"),
    "text": BatchKey("[B, L] int32", "tokens of one short caption", "always"),
    "long_text": BatchKey(
        "[B, L_long] int32", "tokens of the long description; the short caption stands in where there is none",
        "data.long_context_length > 0",
    ),
    "long_text_mask": BatchKey(
        "[B] bool", "True where long_text is a real long description; long-text terms drop the other rows",
        "data.long_context_length > 0",
    ),
    "hard_negatives": BatchKey("[B, K, L] int32", "captions with one fact changed, padded", "data.num_hard_negatives > 0"),
    "hard_negative_mask": BatchKey("[B, K] bool", "True for a real hard negative", "data.num_hard_negatives > 0"),
    "region_boxes": BatchKey(
        "[B, R, 4] float32", "object boxes (x1, y1, x2, y2) in [0, 1] of `image`, after its crop and flip",
        "data.max_regions > 0",
    ),
    "region_mask": BatchKey("[B, R] bool", "True for a real region", "data.max_regions > 0"),
    "region_text": BatchKey("[B, R, L] int32", "the region's caption, or its category prompt", "data.max_regions > 0"),
    "region_category": BatchKey("[B, R] int32", "category id; -1 for a free-text region", "data.max_regions > 0"),
    "region_crops": BatchKey(
        "[B, R, S, S, 3] float32", "crops of the original image at each box (S = data.region_crop_size)",
        "data.max_regions > 0 and data.region_crop_size > 0",
    ),
    "region_view_crops": BatchKey(
        "[B, R, S, S, 3] float32",
        "the visible part of each box in the augmented global view, flipped with it (S = data.region_view_crop_size)",
        "data.max_regions > 0 and data.region_view_crop_size > 0",
    ),
    "local_crops": BatchKey(
        "[B, C, S, S, 3] float32", "local views for patch-to-patch distillation (S = data.local_crop_size or H)",
        "data.num_local_crops > 0",
    ),
    "local_crop_boxes": BatchKey("[B, C, 4] float32", "each local view's box in [0, 1] of `image`", "data.num_local_crops > 0"),
    "decode_errors": BatchKey(
        "host scalar int64", "records skipped so far on this host: a metric, removed by "
        "data.pipeline.pop_host_metrics before the global arrays are built; no term reads it", "always",
    ),
}

# Batch keys each loss term reads whenever it is enabled (term names: losses.objective.TERM_NAMES).
TERM_BATCH_KEYS: Mapping[str, tuple[str, ...]] = {
    "scene": ("image", "text"),
    "hard_negative": ("image", "text", "hard_negatives", "hard_negative_mask"),
    "region_text": ("image", "region_boxes", "region_mask", "region_text"),
    "region_cls": ("region_crops", "region_text", "region_category", "region_mask"),
    "long_text": ("image", "long_text", "long_text_mask"),
    "patch_distill": ("image", "local_crops", "local_crop_boxes"),
    "global_region_consistency": ("image", "region_boxes", "region_mask", "region_view_crops"),
    "short_long_consistency": ("text", "long_text", "long_text_mask"),
}

# Keys a term reads only under one loss-config option: (term, loss field, value) -> extra keys.
OPTION_BATCH_KEYS: Mapping[tuple[str, str, Any], tuple[str, ...]] = {
    ("region_text", "region_text_positives", "category"): ("region_category",),
}


def term_batch_keys(term: str, loss_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The batch keys `term` reads under `loss_config` (a validated loss config mapping)."""
    keys = TERM_BATCH_KEYS[term]
    for (option_term, field, value), extra in OPTION_BATCH_KEYS.items():
        if option_term == term and loss_config[field] == value:
            keys = keys + tuple(key for key in extra if key not in keys)
    return keys


def check_known_keys(keys: Iterable[str], where: str) -> None:
    """Raises ValueError naming the first key of `keys` that the contract does not name."""
    unknown = sorted(set(keys) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(
            f"{where} holds batch key {unknown[0]!r}, which geoalign_jax/batch_contract.py does not name; "
            f"add it to BATCH_KEYS (known: {sorted(BATCH_KEYS)})"
        )


__all__ = [
    "BATCH_KEYS",
    "OPTION_BATCH_KEYS",
    "TERM_BATCH_KEYS",
    "BatchKey",
    "check_known_keys",
    "term_batch_keys",
]
