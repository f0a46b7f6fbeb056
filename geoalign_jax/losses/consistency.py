"""Intra-modal consistency: FarSLIP's patch-to-patch distillation and GeoAlignCLIP-style consistency
between an image's global and region views and between its short and long texts.

FarSLIP (stage 1, `--distill-align roi2pooled`, code read at d32ef2c): the global view's patch map G is
RoI-aligned over each local crop's box (output = the patch grid, sampling_ratio -1, aligned=True) and
mean-pooled -> r_k; the crop itself goes through the crop branch and its patch tokens are mean-pooled ->
t_k; L = 1 - mean_k cos(r_k, t_k) over all crops. The crop branch ("teacher") is chosen in the
objective: the same parameters with gradients ("active", FarSLIP's default: no separate teacher), a
frozen copy of the initial weights, or an EMA of the weights (`ema_update`, momentum 0.99 in FarSLIP).

GeoAlignCLIP (arXiv 2603.09566) has no public code; only its abstract ("multi-granular semantic
alignment + intra-modal consistency") and a later paper's description ("explicitly enforces
global-local multi-view consistency") are known. The forms chosen here, and why:

* global <-> region (image-image): for every valid region, the region as seen INSIDE the global view
  (RoI-Align of the global view's patch tokens over its box, mean-pooled) must agree with the region
  seen ON ITS OWN (the CLS embedding of its crop): L = 1 - mean_valid cos(roi(G, box_r), cls(crop_r)).
  The crop (`region_view_crops`) is the part of the box visible in the global view, flipped with it, so
  both sides see the same pixels (FarSLIP's `region_crops`, whole and unflipped, serve `region_cls` only).
  Why: it is the image-image counterpart of region-text alignment, ties the dense features that
  region/OVSS evaluation reads to the crop-level semantics that CLS region alignment trains, needs no
  extra parameters, and is FarSLIP's `roi2cls` distillation variant applied to object boxes; cosine (not
  InfoNCE) because two views of the same region are a feature-agreement target, as in FarSLIP's
  distillation, and the contrastive terms beside it prevent collapse. Both branches get gradients.
* short <-> long (text-text): symmetric InfoNCE between each image's short caption and its long
  description over the global batch, with the shared temperature. Why: a short caption summarises its
  long description, so it should retrieve it among the batch's other descriptions; a contrastive
  (relative) form is used instead of 1 - cos because the two texts legitimately differ in detail, so
  forcing identical embeddings would fight the long-text alignment, while ranking only asks that the
  pair be closer than other images' texts; it also cannot collapse, and it reuses the chunked kernel.

Precision: the cosines are float32 elementwise products and sums (no matmul, so the accelerators' TF32/bf16
matmul default never touches them); the RoI pooling they compare runs at `precision=HIGHEST`
(`models.roi_align`), and the short<->long logits are the contrastive kernel's (HIGHEST as well).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from geoalign_jax.losses.contrastive import clip_loss, l2_normalize
from geoalign_jax.models.roi_align import roi_align_mean
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]


def cosine_similarity(a: Array, b: Array) -> Array:
    """Cosine along the last axis (float32; finite at zero vectors)."""
    return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def _one_minus_mean_cosine(a: Array, b: Array, mask: Array | None) -> tuple[Array, Metrics]:
    cosine = cosine_similarity(a, b)
    valid = jnp.ones(cosine.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), cosine.shape)
    count = jnp.sum(valid).astype(jnp.float32)
    mean_cosine = jnp.sum(jnp.where(valid, cosine, 0.0)) / jnp.maximum(count, 1.0)
    # No valid pair: loss 0 (not 1), so an all-padded batch adds nothing.
    loss = jnp.where(count > 0, 1.0 - mean_cosine, 0.0)
    return loss, {"loss": loss, "cosine": jax.lax.stop_gradient(mean_cosine), "count": count}


def patch_distillation_loss(
    global_patch_tokens: Array,
    crop_patch_tokens: Array,
    crop_boxes: Array,
    crop_mask: Array | None = None,
    *,
    output_size: int | Sequence[int] | None = None,
    sampling_ratio: int = -1,
) -> tuple[Array, Metrics]:
    """FarSLIP's patch-to-patch distillation (roi2pooled).

    global_patch_tokens [B, gh, gw, E] of the global view; crop_patch_tokens [B, C, ch, cw, E] of each
    local crop from the crop branch; crop_boxes [B, C, 4] normalised to the global view; crop_mask [B, C]
    (None = all crops real). output_size None = the patch grid (gh, gw), as FarSLIP.
    L = 1 - mean over valid crops of cos(mean RoIAlign(G, box), mean crop tokens).
    """
    global_patch_tokens = jnp.asarray(global_patch_tokens)
    crop_patch_tokens = jnp.asarray(crop_patch_tokens)
    if crop_patch_tokens.ndim != 5 or crop_patch_tokens.shape[:2] != jnp.shape(crop_boxes)[:2]:
        raise ValueError(
            f"crop_patch_tokens must be [B, C, h, w, E] matching crop_boxes [B, C, 4]; got "
            f"{crop_patch_tokens.shape} and {jnp.shape(crop_boxes)}"
        )
    if output_size is None:
        output_size = tuple(global_patch_tokens.shape[1:3])
    region = roi_align_mean(global_patch_tokens, crop_boxes, output_size, sampling_ratio, aligned=True)
    target = jnp.mean(crop_patch_tokens.astype(jnp.float32), axis=(2, 3))
    return _one_minus_mean_cosine(region, target, crop_mask)


def global_region_consistency_loss(
    patch_tokens: Array,
    region_boxes: Array,
    region_view_emb: Array,
    region_mask: Array,
    *,
    output_size: int | Sequence[int] = 7,
    sampling_ratio: int = -1,
) -> tuple[Array, Metrics]:
    """GeoAlignCLIP-style global<->region view consistency (form chosen here; see module docstring).

    patch_tokens [B, gh, gw, E] of the global view; region_boxes [B, R, 4]; region_view_emb [B, R, E]
    (CLS embeddings of `region_view_crops`: the same boxes' pixels as the global view shows them);
    region_mask [B, R].
    L = 1 - mean over valid regions of cos(mean RoIAlign(patch_tokens, box), region_view_emb).
    """
    region = roi_align_mean(patch_tokens, region_boxes, output_size, sampling_ratio, aligned=True)
    return _one_minus_mean_cosine(region, region_view_emb, region_mask)


def short_long_consistency_loss(
    short_emb: Array,
    long_emb: Array,
    logit_scale: Array,
    *,
    mask: Array | None = None,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """GeoAlignCLIP-style short<->long text consistency: symmetric InfoNCE between each image's short
    caption and long description over the global batch (form chosen here; see module docstring)."""
    loss, metrics = clip_loss(short_emb, long_emb, logit_scale, mask=mask, chunk_size=chunk_size, axis_context=axis_context)
    return loss, {"loss": loss, "s2l_accuracy": metrics["i2t_accuracy"], "l2s_accuracy": metrics["t2i_accuracy"]}


def ema_update(ema_params: Any, params: Any, momentum: float | jax.Array) -> Any:
    """EMA update after a step: ema <- momentum * ema + (1 - momentum) * params (FarSLIP's teacher: 0.99). A traced
    momentum (train/ema.py's warm-up) is not range-checked."""
    if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    return jax.tree.map(lambda ema, new: momentum * ema + (1.0 - momentum) * new, ema_params, params)


__all__ = [
    "cosine_similarity",
    "ema_update",
    "global_region_consistency_loss",
    "patch_distillation_loss",
    "short_long_consistency_loss",
]
