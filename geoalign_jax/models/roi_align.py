"""RoI-Align over a feature map: an op shared by the region losses and region evaluation (no I/O, no losses).

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

Region features (``region_features``) are RoI-Align of the image tower's patch tokens, mean-pooled over
the output bins. The patch tokens from `encode_image` have already gone through ln_post and the visual
projection, so the pooled feature is "pooled and projected" and lives in the joint embedding space
without extra parameters.

The weighting runs at `precision=HIGHEST` (float32 on GPU/TPU too), whatever the towers' compute dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
# The interpolation matmuls run in full float32 on every backend: at the accelerators' default (TF32/bf16)
# the pooled region features would lose ~3 significant digits before they meet a scale-100 similarity.
_HIGHEST = jax.lax.Precision.HIGHEST


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
    rows = jnp.einsum("broy,byxc->broxc", row_weights, feature_map.astype(jnp.float32), precision=_HIGHEST)
    return jnp.einsum("brpx,broxc->bropc", column_weights, rows, precision=_HIGHEST)


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
        "bry,brx,byxc->brc", row_weights.mean(axis=-2), column_weights.mean(axis=-2), feature_map.astype(jnp.float32),
        precision=_HIGHEST,
    )


def region_features(
    patch_tokens: Array, region_boxes: Array, output_size: int | Sequence[int] = 7, sampling_ratio: int = -1
) -> Array:
    """Region embeddings [B, R, E]: RoI-Align of the projected patch tokens [B, gh, gw, E], mean-pooled."""
    return roi_align_mean(patch_tokens, region_boxes, output_size, sampling_ratio, aligned=True)


__all__ = ["roi_align", "roi_align_mean", "region_features"]
