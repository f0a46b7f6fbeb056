"""Patch-to-patch distillation against FarSLIP's recipe built on torchvision, the GeoAlignCLIP-style
consistency terms on hand-computed cases, masking, and the EMA update."""
from __future__ import annotations

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from array_fixtures import assert_close as _close, random_normal as _random
from geoalign_jax.losses.consistency import (
    ema_update,
    global_region_consistency_loss,
    patch_distillation_loss,
    short_long_consistency_loss,
)


def _crop_boxes(batch, crops, seed):
    rng = np.random.default_rng(seed)
    low = rng.uniform(0.0, 0.5, size=(batch, crops, 2))
    size = rng.uniform(0.3, 0.5, size=(batch, crops, 2))
    return np.concatenate([low, low + size], axis=-1).astype(np.float32)


def test_patch_distillation_matches_farslip_recipe():
    """FarSLIP roi2pooled: roi_align(G, box * (w, h), output (h, w), scale 1, ratio -1, aligned) -> mean."""
    batch, crops, grid, dim = 2, 3, 4, 5
    global_tokens = _random((batch, grid, grid, dim), 0)
    crop_tokens = _random((batch, crops, grid, grid, dim), 1)
    boxes = _crop_boxes(batch, crops, 2)
    features = torch.tensor(global_tokens).permute(0, 3, 1, 2)
    scaled = boxes * grid
    pooled = torchvision.ops.roi_align(
        features, [torch.tensor(scaled[b]) for b in range(batch)], (grid, grid), 1.0, -1, True
    ).mean(dim=(-2, -1))
    target = torch.tensor(crop_tokens).reshape(batch * crops, grid * grid, dim).mean(dim=1)
    expected = 1.0 - F.cosine_similarity(pooled.double(), target.double(), dim=-1).mean()
    loss, metrics = patch_distillation_loss(global_tokens, crop_tokens, boxes)
    _close(loss, expected.item())
    _close(metrics["cosine"], 1.0 - expected.item())


def test_patch_distillation_is_zero_for_a_whole_image_crop_of_the_same_map():
    tokens = _random((1, 4, 4, 3), 3)
    loss, _ = patch_distillation_loss(tokens, tokens[:, None], np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32))
    _close(loss, 0.0)


def test_patch_distillation_masked_crops_are_inert():
    global_tokens = _random((2, 4, 4, 3), 4)
    crop_tokens = _random((2, 3, 4, 4, 3), 5)
    boxes = _crop_boxes(2, 3, 6)
    crop_mask = np.array([[1, 0, 1], [0, 1, 1]], bool)

    def loss_fn(g, c):
        return patch_distillation_loss(g, c, boxes, crop_mask)[0]

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(global_tokens, crop_tokens)
    perturbed = crop_tokens + 20.0 * _random(crop_tokens.shape, 7) * ~crop_mask[..., None, None, None]
    value_p, grads_p = jax.value_and_grad(loss_fn, argnums=(0, 1))(global_tokens, perturbed)
    _close(value_p, value, 1e-6)
    for g, g_p in zip(grads, grads_p):
        _close(g_p, g, 1e-6)
    assert np.all(np.asarray(grads[1])[~crop_mask] == 0.0)
    # Same as keeping only the valid crops.
    only_valid, _ = patch_distillation_loss(global_tokens[:1], crop_tokens[:1, [0, 2]], boxes[:1, [0, 2]])
    both, _ = patch_distillation_loss(global_tokens, crop_tokens, boxes, np.array([[1, 0, 1], [0, 0, 0]], bool))
    _close(both, only_valid)


def test_global_region_consistency_hand_computed():
    """Constant patch map v: every RoI feature is v; views v, -v, and a padded one give 1 - mean(1, -1) = 1."""
    v = np.array([1.0, 2.0, 2.0], np.float32)
    patch_tokens = np.broadcast_to(v, (1, 3, 3, 3)).copy()
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 0.9, 1.0], [0.1, 0.1, 0.4, 0.4]]], np.float32)
    views = np.stack([v, -v, np.array([9.0, -3.0, 0.0], np.float32)])[None]
    mask = np.array([[True, True, False]])
    loss, metrics = global_region_consistency_loss(patch_tokens, boxes, views, mask, output_size=2)
    _close(loss, 1.0)
    _close(metrics["cosine"], 0.0)
    all_padded, _ = global_region_consistency_loss(patch_tokens, boxes, views, np.zeros_like(mask), output_size=2)
    _close(all_padded, 0.0)


def test_short_long_consistency_hand_computed():
    short = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    long = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)  # cosines [[1, .6], [0, .8]], scale 2
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    short_to_long = [lse(2.0, 1.2) - 2.0, lse(0.0, 1.6) - 1.6]
    long_to_short = [lse(2.0, 0.0) - 2.0, lse(1.2, 1.6) - 1.6]
    expected = 0.5 * (sum(short_to_long) / 2 + sum(long_to_short) / 2)
    loss, metrics = short_long_consistency_loss(short, long, math.log(2.0))
    _close(loss, expected)
    _close(metrics["s2l_accuracy"], 1.0)


def test_ema_update():
    ema = {"w": np.array([1.0, 2.0], np.float32), "b": np.float32(0.0)}
    new = {"w": np.array([3.0, 0.0], np.float32), "b": np.float32(1.0)}
    updated = ema_update(ema, new, 0.75)
    _close(updated["w"], [1.5, 1.5])
    _close(updated["b"], 0.25)
