"""CLIP's symmetric InfoNCE with label smoothing, and with image rows taken as given (Long-CLIP).

Long-CLIP's forward (model/model_longclip.py:442-485 of beichenzbc/Long-CLIP) differs from open_clip's
ClipLoss in two ways this module covers:
- `F.cross_entropy(..., label_smoothing=0.1)`: per row, (1 - eps) * CE(target) + eps * mean over the C
  columns of -log softmax, i.e. `lse - (1 - eps) * l_target - eps * mean_j l_j`;
- its short-text term contrasts the primary-component rebuild of the image embeddings as it is, not
  re-normalised (`normalize_images=False`).
The row mean of the logits is linear in the columns (`scale * <row, mean of the columns>`), so the smoothing
costs one [E] vector per side and works with the chunked form too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from geoalign_jax.losses.contrastive import (
    HIGHEST,
    RowStats,
    l2_normalize,
    logit_scale_value,
    row_statistics,
)
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]


def _masked_mean(values: Array, valid: Array) -> Array:
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)


def _smoothed_rows(stats: RowStats, rows: Array, columns: Array, valid: Array, scale: Array, smoothing: float) -> Array:
    """Per-row label-smoothed cross-entropy from the row statistics (one positive per row)."""
    column_count = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
    column_mean = jnp.sum(jnp.where(valid[:, None], columns, 0.0), axis=0) / column_count
    mean_logit = scale * jnp.matmul(rows, column_mean, precision=HIGHEST)
    return stats.reduction - (1.0 - smoothing) * stats.positive_sum - smoothing * mean_logit


def label_smoothed_clip_loss(
    image_emb: Array,
    text_emb: Array,
    logit_scale: Array,
    *,
    label_smoothing: float,
    normalize_images: bool = True,
    mask: Array | None = None,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """1/2 [CE_eps(s I T^T, diag) + CE_eps(s T I^T, diag)] over the valid pairs of the global batch.

    image_emb, text_emb [N, E]; texts are L2-normalised, images too unless `normalize_images` is False;
    `label_smoothing` eps in [0, 1) spreads eps uniformly over the valid columns (torch's definition);
    eps = 0 is `clip_loss`. mask [N]: masked pairs are neither rows nor columns.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    image = l2_normalize(image_emb) if normalize_images else jnp.asarray(image_emb, jnp.float32)
    text = l2_normalize(text_emb)
    count = image.shape[0]
    if text.shape[0] != count:
        raise ValueError(f"image_emb has {count} rows but text_emb has {text.shape[0]}; pairs must align")
    valid = jnp.ones((count,), bool) if mask is None else jnp.asarray(mask, bool).reshape(count)
    labels = jnp.arange(count, dtype=jnp.int32)
    scale = logit_scale_value(logit_scale)
    common = dict(kind="softmax", chunk_size=chunk_size, axis_context=axis_context)
    image_to_text = row_statistics(image, labels, text, labels, valid, scale, **common)
    text_to_image = row_statistics(text, labels, image, labels, valid, scale, **common)
    loss_i2t = _masked_mean(_smoothed_rows(image_to_text, image, text, valid, scale, label_smoothing), valid)
    loss_t2i = _masked_mean(_smoothed_rows(text_to_image, text, image, valid, scale, label_smoothing), valid)
    loss = 0.5 * (loss_i2t + loss_t2i)

    def accuracy(stats: RowStats) -> Array:
        return jax.lax.stop_gradient(_masked_mean((stats.max_positive >= stats.max_negative).astype(jnp.float32), valid))

    return loss, {"loss": loss, "i2t_accuracy": accuracy(image_to_text), "t2i_accuracy": accuracy(text_to_image)}


__all__ = ["label_smoothed_clip_loss"]
