"""GeoAlignCLIP-style multi-granular alignment (arXiv 2603.09566; no public code, see losses docstrings).

Scene ITC with hard negatives, RoI region <-> region-text alignment, and intra-modal consistency between
each image's global and regional views and between its short and long texts.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.model.overrides.text_context_length = 248
    config.data.long_context_length = 248
    config.data.num_hard_negatives = 3
    config.data.max_regions = 8
    config.data.region_view_crop_size = 112  # the consistency term's crops: each box as the global view shows it
    # hard_negative is an image->text term over the same batch plus each image's negatives; at 0.5 the
    # image->text direction does not outweigh text->image twice over.
    config.loss.weights.hard_negative = 0.5
    config.loss.weights.region_text = 1.0
    config.loss.weights.global_region_consistency = 0.5
    config.loss.weights.short_long_consistency = 0.5
    return config
