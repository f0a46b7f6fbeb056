"""Region-level alignment: region-text contrast over RoI features and FarSLIP's CLS-crop MPCL.

RoI-Align itself (torchvision-exact, separable weights) lives in ``geoalign_jax.models.roi_align``: it is an
op shared with region evaluation, not a loss.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from geoalign_jax.models.roi_align import region_features
from geoalign_jax.losses.contrastive import clip_loss, multi_positive_contrastive_loss
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]

REGION_TEXT_POSITIVES = ("diagonal", "category")


def _flat(x: Array, trailing: int) -> Array:
    x = jnp.asarray(x)
    return x.reshape((-1,) + x.shape[x.ndim - trailing:]) if trailing else x.reshape(-1)


def region_text_loss(
    region_emb: Array,
    region_text_emb: Array,
    region_mask: Array,
    logit_scale: Array,
    *,
    region_category: Array | None = None,
    positives: str = "diagonal",
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """Region features vs their captions / category prompts over all valid regions of the global batch.

    region_emb, region_text_emb [B, R, E]; region_mask [B, R]. positives="diagonal": symmetric InfoNCE,
    each region's own text is its only positive. positives="category": regions of the same category id
    (>= 0) are all positives of one another (a category prompt repeated in the batch is then not a false
    negative); free-text regions (id -1) remain positive only with their own text.
    """
    if positives not in REGION_TEXT_POSITIVES:
        raise ValueError(f"positives must be one of {REGION_TEXT_POSITIVES}, got {positives!r}")
    regions = _flat(region_emb, 1)
    texts = _flat(region_text_emb, 1)
    valid = _flat(region_mask, 0).astype(bool)
    if positives == "diagonal":
        loss, metrics = clip_loss(regions, texts, logit_scale, mask=valid, chunk_size=chunk_size, axis_context=axis_context)
        return loss, {"loss": loss, "r2t_accuracy": metrics["i2t_accuracy"], "t2r_accuracy": metrics["t2i_accuracy"]}
    if region_category is None:
        raise ValueError("region_text_loss(positives='category') needs region_category [B, R]")
    category = _flat(region_category, 0).astype(jnp.int32)
    own_label = -1 - jnp.arange(category.shape[0], dtype=jnp.int32)  # distinct, never a category id
    labels = jnp.where(category >= 0, category, own_label)
    loss, metrics = multi_positive_contrastive_loss(
        regions, texts, labels, valid, logit_scale, chunk_size=chunk_size, axis_context=axis_context
    )
    return loss, {"loss": loss, "r2t_accuracy": metrics["a2b_accuracy"], "t2r_accuracy": metrics["b2a_accuracy"]}


def multi_positive_loss(
    region_emb: Array,
    text_emb: Array,
    category_ids: Array,
    valid_mask: Array,
    logit_scale: Array,
    *,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """FarSLIP's MultiPosConLossMM (stage-2 region-category alignment, `--mpcl-loss`).

    region_emb [..., E] (CLS embeddings of the region crops), text_emb [..., E] (their category
    prompts), category_ids [...] int, valid_mask [...]. Rows with id -1 (free-text captions) and padded
    rows are dropped; with s = exp(logit_scale) and P_ij = 1[c_i = c_j] / sum_j 1[c_i = c_j]:
    L = 1/2 [-mean_i sum_j P_ij log softmax_j(s v_i.t_j) - mean_i sum_j P_ij log softmax_j(s t_i.v_j)],
    over all valid regions of the global batch (FarSLIP gathers with gradient).
    """
    regions = _flat(region_emb, 1)
    texts = _flat(text_emb, 1)
    category = _flat(category_ids, 0).astype(jnp.int32)
    valid = _flat(valid_mask, 0).astype(bool) & (category >= 0)
    loss, metrics = multi_positive_contrastive_loss(
        regions, texts, category, valid, logit_scale, chunk_size=chunk_size, axis_context=axis_context
    )
    return loss, {"loss": loss, "r2t_accuracy": metrics["a2b_accuracy"], "t2r_accuracy": metrics["b2a_accuracy"]}


__all__ = [
    "REGION_TEXT_POSITIVES",
    "multi_positive_loss",
    "region_text_loss",
]
