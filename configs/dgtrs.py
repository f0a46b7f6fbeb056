"""DGTRS-CLIP / LRSCLIP (arXiv 2503.19311): short and long text with a short-to-long curriculum.

Needs a 248-position text tower: import a CLIP with `--stretch-text` (Long-CLIP stretching) or a
Long-CLIP/DGTRS checkpoint. The long-text share a(t) rises linearly from 0.2 to 0.8 over the first 5000
steps (the paper's exact schedule is not public); the scene (short) term gets 1 - a(t).
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.model.overrides.text_context_length = 248
    config.data.long_context_length = 248
    config.loss.weights.long_text = 1.0
    config.loss.long_text_schedule = ml_collections.ConfigDict(
        {"kind": "linear", "start_step": 0, "end_step": 5000, "start_weight": 0.2, "end_weight": 0.8}
    )
    return config
