"""Region-level alignment: RoI-Align over patch tokens, region-text contrast, FarSLIP's CLS-crop MPCL.

RoI-Align follows `torchvision.ops.roi_align` exactly (bilinear sampling, `aligned=True` half-pixel
shift, adaptive `sampling_ratio <= 0` = ceil(roi_size / output_size) samples per bin, samples outside
[-1, size] contribute zero, the average is over all samples of a bin). Because the sample grid of a bin
is a tensor product of row and column positions and torchvision's bilinear weights and out-of-range test
factorise too, RoI-Align is computed as two small weight matrices per box, `out = Wy @ F @ Wx^T`: no
gathers, dense matmuls that XLA tiles well and that differentiate cleanly. The adaptive sample count is
data-dependent, so a static upper bound ceil(grid / output) (boxes inside the image) is laid out and the
samples beyond each box's own count are masked; boxes reaching outside [0, 1] are clipped to that bound.

Boxes are (x1, y1, x2, y2) normalised to [0, 1] of the image the feature map covers; they map to the
feature grid by x * grid_w, y * grid_h (torchvision's `spatial_scale` per axis).

Region features for the RoI region-text term are RoI-Align of the image tower's patch tokens,
mean-pooled over the output bins. The patch tokens from `encode_image` have already gone through
ln_post and the visual projection, so the pooled feature is "pooled and projected" and lives in the
joint embedding space without extra parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from geoalign_jax.losses.contrastive import clip_loss, multi_positive_contrastive_loss
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]

REGION_TEXT_POSITIVES = ("diagonal", "category")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"output_size must be positive, got {size}")
    return height, width


def _axis_weights(
    start: Array, end: Array, grid: int, output: int, sampling_ratio: int, aligned: bool
) -> Array:
    """Bin-averaged bilinear weights along one axis: [..., output, grid].

    start/end [...]: box edges in feature-grid units (already multiplied by the grid size).
    """
    offset = 0.5 if aligned else 0.0
    roi_start = start - offset
    roi_length = (end - offset) - roi_start
    if not aligned:
        roi_length = jnp.maximum(roi_length, 1.0)
    bin_size = roi_length / output
    if sampling_ratio > 0:
        max_samples = sampling_ratio
        samples = jnp.full(jnp.shape(start), float(sampling_ratio), jnp.float32)
    else:
        max_samples = max(1, math.ceil(grid / output))
        samples = jnp.minimum(jnp.ceil(roi_length / output), float(max_samples))
    bin_index = jnp.arange(output, dtype=jnp.float32)[:, None]  # [output, 1]
    sample_index = jnp.arange(max_samples, dtype=jnp.float32)[None, :]  # [1, S]
    expand = lambda x: x[..., None, None]  # noqa: E731
    position = (
        expand(roi_start)
        + bin_index * expand(bin_size)
        + (sample_index + 0.5) * expand(bin_size) / expand(jnp.maximum(samples, 1.0))
    )  # [..., output, S]
    active = (sample_index < expand(samples)) & (position >= -1.0) & (position <= grid)
    position = jnp.maximum(position, 0.0)
    low = jnp.floor(position)
    at_edge = low >= grid - 1
    low = jnp.where(at_edge, grid - 1, low)
    high = jnp.where(at_edge, grid - 1, low + 1)
    fraction = jnp.where(at_edge, 0.0, position - low)
    cells = jnp.arange(grid, dtype=jnp.float32)
    weights = (1.0 - fraction)[..., None] * (low[..., None] == cells) + fraction[..., None] * (high[..., None] == cells)
    weights = jnp.where(active[..., None], weights, 0.0)  # [..., output, S, grid]
    return jnp.sum(weights, axis=-2) / expand(jnp.maximum(samples, 1.0))


def _box_weights(
    feature_map: Array, boxes: Array, output_size: int | Sequence[int], sampling_ratio: int, aligned: bool, caller: str
) -> tuple[Array, Array]:
    """Checks the inputs of `caller`, then the separable bilinear weights [B, R, out, grid] per axis."""
    if feature_map.ndim != 4 or jnp.ndim(boxes) != 3 or jnp.shape(boxes)[0] != feature_map.shape[0]:
        raise ValueError(
            f"{caller} expects feature_map [B, h, w, C] and boxes [B, R, 4]; got {feature_map.shape} and {jnp.shape(boxes)}"
        )
    grid_h, grid_w = feature_map.shape[1:3]
    out_h, out_w = _pair(output_size)
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in 4 coordinates (x1, y1, x2, y2), got shape {boxes.shape}")
    x1, y1, x2, y2 = (boxes[..., k] for k in range(4))
    row_weights = _axis_weights(y1 * grid_h, y2 * grid_h, grid_h, out_h, sampling_ratio, aligned)
    column_weights = _axis_weights(x1 * grid_w, x2 * grid_w, grid_w, out_w, sampling_ratio, aligned)
    return row_weights, column_weights


def roi_align(
    feature_map: Array,
    boxes: Array,
    output_size: int | Sequence[int],
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Array:
    """RoI-Align: feature_map [B, h, w, C], boxes [B, R, 4] normalised -> [B, R, out_h, out_w, C].

    Same numbers as `torchvision.ops.roi_align(feature_map_nchw, [boxes * (w, h, w, h)], output_size,
    spatial_scale=1, sampling_ratio, aligned)`.
    """
    feature_map = jnp.asarray(feature_map)
    row_weights, column_weights = _box_weights(feature_map, boxes, output_size, sampling_ratio, aligned, "roi_align")
    rows = jnp.einsum("broy,byxc->broxc", row_weights, feature_map.astype(jnp.float32))
    return jnp.einsum("brpx,broxc->bropc", column_weights, rows)


def roi_align_mean(
    feature_map: Array,
    boxes: Array,
    output_size: int | Sequence[int],
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Array:
    """`roi_align(...).mean(axis=(2, 3))` -> [B, R, C], without materialising the output bins.

    The mean over bins of a separable weighting is the outer product of the bin-averaged weights, so
    this costs one [h] x [w] weighting per box.
    """
    feature_map = jnp.asarray(feature_map)
    row_weights, column_weights = _box_weights(feature_map, boxes, output_size, sampling_ratio, aligned, "roi_align_mean")
    return jnp.einsum(
        "bry,brx,byxc->brc", row_weights.mean(axis=-2), column_weights.mean(axis=-2), feature_map.astype(jnp.float32)
    )


def region_features(
    patch_tokens: Array, region_boxes: Array, output_size: int | Sequence[int] = 7, sampling_ratio: int = -1
) -> Array:
    """Region embeddings [B, R, E]: RoI-Align of the projected patch tokens [B, gh, gw, E], mean-pooled."""
    return roi_align_mean(patch_tokens, region_boxes, output_size, sampling_ratio, aligned=True)


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
    rows are dropped; with s = min(exp(logit_scale), 100) and P_ij = 1[c_i = c_j] / sum_j 1[c_i = c_j]:
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
    "region_features",
    "region_text_loss",
    "roi_align",
    "roi_align_mean",
]
