"""RoI-Align against torchvision.ops.roi_align (values and gradients), region-text contrast and FarSLIP's
multi-positive region-category loss against the formula, masking."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
import torchvision

from array_fixtures import assert_close as _close, dot_general_precisions, random_normal as _random
from geoalign_jax.losses.contrastive import clip_loss
from geoalign_jax.losses.region import multi_positive_loss, region_text_loss
from geoalign_jax.models.roi_align import region_features, roi_align, roi_align_mean


def _boxes(batch, regions, seed):
    """Random normalised boxes plus edge cases: the whole image, a degenerate point, a sliver at a border."""
    corners = np.random.default_rng(seed).uniform(0, 1, size=(batch, regions, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)
    boxes[0, 0] = [0.0, 0.0, 1.0, 1.0]
    boxes[0, 1] = [0.5, 0.5, 0.5, 0.5]
    boxes[-1, 0] = [0.9, 0.0, 1.0, 0.05]
    return boxes


def _torchvision_roi_align(feature_map, boxes, output_size, sampling_ratio, aligned, requires_grad=False):
    """torchvision on NCHW with the normalised boxes mapped to the grid (x * w, y * h), spatial_scale 1."""
    batch, height, width, channels = feature_map.shape
    features = torch.tensor(feature_map).permute(0, 3, 1, 2).contiguous().requires_grad_(requires_grad)
    scaled = boxes * np.array([width, height, width, height], np.float32)
    output = torchvision.ops.roi_align(
        features, [torch.tensor(scaled[b]) for b in range(batch)], output_size, 1.0, sampling_ratio, aligned
    )
    return features, output.reshape(batch, boxes.shape[1], channels, *output_size)


@pytest.mark.parametrize(
    "output_size, sampling_ratio, aligned",
    [((7, 7), -1, True), ((3, 2), -1, True), ((5, 7), 2, True), ((1, 1), -1, True), ((4, 4), 1, False), ((7, 7), -1, False)],
)
def test_roi_align_matches_torchvision(output_size, sampling_ratio, aligned):
    feature_map = _random((2, 5, 7, 3), 0)  # non-square grid
    boxes = _boxes(2, 6, 1)
    _, expected = _torchvision_roi_align(feature_map, boxes, output_size, sampling_ratio, aligned)
    ours = roi_align(feature_map, boxes, output_size, sampling_ratio, aligned)
    _close(ours, expected.detach().numpy().transpose(0, 1, 3, 4, 2))
    _close(roi_align_mean(feature_map, boxes, output_size, sampling_ratio, aligned), np.asarray(ours).mean(axis=(2, 3)))


def test_roi_align_gradient_matches_torchvision():
    feature_map = _random((2, 6, 6, 4), 2)
    boxes = _boxes(2, 3, 3)
    output_size = (3, 3)
    weights = _random((2, 3, 3, 3, 4), 4)  # [B, R, oh, ow, C]
    features, expected = _torchvision_roi_align(feature_map, boxes, output_size, -1, True, requires_grad=True)
    (expected * torch.tensor(weights).permute(0, 1, 4, 2, 3)).sum().backward()
    grad = jax.grad(lambda f: (roi_align(f, boxes, output_size) * weights).sum())(feature_map)
    _close(grad, features.grad.permute(0, 2, 3, 1).numpy())


def test_roi_align_full_box_at_grid_resolution_reproduces_the_map():
    """The whole-image box with one sample per bin at the grid's own resolution samples cell centres."""
    feature_map = _random((1, 4, 6, 2), 5)
    out = roi_align(feature_map, np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32), (4, 6), sampling_ratio=1)
    _close(out[0, 0], feature_map[0])
    # Adaptive sampling at the grid's resolution is one sample per bin too (FarSLIP's distillation setting).
    pooled = region_features(feature_map, np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32), (4, 6))
    _close(pooled[0, 0], feature_map[0].mean(axis=(0, 1)))


def test_roi_align_interpolates_at_highest_precision():
    """The bilinear weighting stays float32 on GPU/TPU (their default matmul precision is TF32/bf16)."""
    feature_map, boxes = _random((2, 6, 6, 4), 6), _boxes(2, 3, 7)
    for pool in (lambda f: roi_align(f, boxes, 3), lambda f: roi_align_mean(f, boxes, 3)):
        precisions = dot_general_precisions(jax.value_and_grad(lambda f: pool(f).sum()), feature_map)
        assert len(precisions) >= 2 and set(precisions) == {"HIGHEST, HIGHEST"}, precisions


def test_roi_align_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        roi_align(np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="feature_map"):
        roi_align(np.zeros((4, 4, 3), np.float32), np.zeros((2, 3, 4), np.float32), 2)


# ---------------------------------------------------------------------------------------------------
# Region-text contrast


def test_region_text_diagonal_equals_clip_loss_on_valid_regions():
    regions, texts = _random((3, 4, 8), 6), _random((3, 4, 8), 7)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], bool)
    expected, _ = clip_loss(regions[mask], texts[mask], 2.0)
    for chunk_size in (0, 3):
        loss, _ = region_text_loss(regions, texts, mask, 2.0, chunk_size=chunk_size)
        _close(loss, expected)


def _multi_positive_reference(regions, texts, labels, valid, scale):
    """The P_ij formula of `multi_positive_loss`'s docstring (FarSLIP's MPCL) over the valid rows, in float64 numpy."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    v, t = unit(regions[valid].astype(np.float64)), unit(texts[valid].astype(np.float64))
    c = labels[valid]
    target = (c[:, None] == c[None, :]).astype(np.float64)
    target /= target.sum(axis=1, keepdims=True)

    def cross_entropy(logits):
        log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -(target * log_softmax).sum(axis=1).mean()

    return 0.5 * (cross_entropy(scale * v @ t.T) + cross_entropy(scale * t @ v.T))


def test_multi_positive_loss_matches_farslip_formula():
    regions, texts = _random((4, 3, 6), 8), _random((4, 3, 6), 9)
    category = np.array([[0, 2, -1], [2, 2, 1], [0, -1, 3], [1, 0, 2]], np.int32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 1]], bool)
    scale = 5.0
    expected = _multi_positive_reference(
        regions.reshape(-1, 6), texts.reshape(-1, 6), category.reshape(-1), (mask & (category >= 0)).reshape(-1), scale
    )
    for chunk_size in (0, 4):
        loss, _ = multi_positive_loss(regions, texts, category, mask, math.log(scale), chunk_size=chunk_size)
        _close(loss, expected)


def test_region_text_category_positives_matches_formula():
    """Same-category regions are positives; free-text regions (-1) only match their own text."""
    regions, texts = _random((2, 4, 5), 10), _random((2, 4, 5), 11)
    category = np.array([[3, 3, -1, 1], [-1, 3, 1, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    flat_labels = category.reshape(-1).copy()
    flat_labels[flat_labels < 0] = 1000 + np.flatnonzero(flat_labels < 0)
    expected = _multi_positive_reference(regions.reshape(-1, 5), texts.reshape(-1, 5), flat_labels, mask.reshape(-1), 4.0)
    loss, _ = region_text_loss(regions, texts, mask, math.log(4.0), region_category=category, positives="category")
    _close(loss, expected)


def test_multi_positive_padded_and_free_text_rows_are_inert():
    regions, texts = _random((3, 4, 6), 12), _random((3, 4, 6), 13)
    category = np.array([[0, 1, -1, 2], [1, 1, 0, -1], [2, 0, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]], bool)
    inert = ~mask | (category < 0)

    def loss_fn(r, t):
        return multi_positive_loss(r, t, category, mask, 1.0, chunk_size=5)[0]

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(regions, texts)
    noise = 30.0 * _random(regions.shape, 14) * inert[..., None]
    value_p, grads_p = jax.value_and_grad(loss_fn, argnums=(0, 1))(regions + noise, texts - noise)
    _close(value_p, value, 1e-6)
    for g, g_p in zip(grads, grads_p):
        _close(g_p, g, 1e-6)
        assert np.all(np.asarray(g)[inert] == 0.0)


def test_region_text_masked_boxes_are_inert_through_roi_align():
    """Padded regions' boxes and texts change neither the loss nor the patch-token gradient."""
    patch_tokens = _random((2, 4, 4, 6), 15)
    boxes = _boxes(2, 3, 16)
    texts = _random((2, 3, 6), 17)
    mask = np.array([[1, 0, 1], [1, 1, 0]], bool)

    def loss_fn(tokens, b, t):
        return region_text_loss(region_features(tokens, b, 2), t, mask, 1.0)[0]

    value, grad = jax.value_and_grad(loss_fn)(patch_tokens, boxes, texts)
    other_boxes = np.where(mask[..., None], boxes, np.array([0.0, 0.0, 1.0, 1.0], np.float32))
    other_texts = texts + 10.0 * ~mask[..., None]
    value_p, grad_p = jax.value_and_grad(loss_fn)(patch_tokens, other_boxes, other_texts)
    _close(value_p, value, 1e-6)
    _close(grad_p, grad, 1e-6)


def test_region_text_category_needs_categories():
    with pytest.raises(ValueError, match="region_category"):
        region_text_loss(np.ones((1, 2, 3)), np.ones((1, 2, 3)), np.ones((1, 2), bool), 1.0, positives="category")
