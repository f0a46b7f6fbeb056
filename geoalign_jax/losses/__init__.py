"""Training objectives: scene/long-text/hard-negative contrast, region alignment, intra-modal consistency.

Pure functions of arrays (no I/O). `objective.make_objective(config.loss)` builds the training loss.
"""
from __future__ import annotations

from geoalign_jax.losses.consistency import (
    cosine_similarity,
    ema_update,
    global_region_consistency_loss,
    patch_distillation_loss,
    short_long_consistency_loss,
)
from geoalign_jax.losses.contrastive import (
    chunked_clip_loss,
    clip_loss,
    hard_negative_loss,
    l2_normalize,
    clamp_logit_scale,
    logit_scale_value,
    multi_positive_contrastive_loss,
    principal_component_reconstruction,
    siglip_loss,
)
from geoalign_jax.losses.row_stats import row_statistics
from geoalign_jax.losses.objective import (
    TERM_NAMES,
    compute_outputs,
    default_loss_config,
    make_objective,
    schedule_value,
    term_weights,
    validate_loss_config,
)
from geoalign_jax.losses.region import multi_positive_loss, region_text_loss
from geoalign_jax.losses.smoothed import label_smoothed_clip_loss

__all__ = [
    "TERM_NAMES",
    "chunked_clip_loss",
    "clip_loss",
    "compute_outputs",
    "cosine_similarity",
    "default_loss_config",
    "ema_update",
    "global_region_consistency_loss",
    "hard_negative_loss",
    "l2_normalize",
    "clamp_logit_scale",
    "logit_scale_value",
    "make_objective",
    "multi_positive_contrastive_loss",
    "multi_positive_loss",
    "patch_distillation_loss",
    "principal_component_reconstruction",
    "label_smoothed_clip_loss",
    "region_text_loss",
    "row_statistics",
    "schedule_value",
    "short_long_consistency_loss",
    "siglip_loss",
    "term_weights",
    "validate_loss_config",
]
