"""Scene/long-text/hard-negative contrastive losses: parity with open_clip, hand-computed cases, masking,
chunked == plain, and the chunked form's memory staying O(batch x chunk)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from array_fixtures import assert_close as _close, random_normal as _random
from geoalign_jax.losses.contrastive import (
    LOG_MAX_LOGIT_SCALE,
    chunked_clip_loss,
    clamp_logit_scale,
    clip_loss,
    hard_negative_loss,
    multi_positive_contrastive_loss,
    principal_component_reconstruction,
    siglip_loss,
)

LOG_TEMPERATURE = math.log(1 / 0.07)


def _torch_unit(x: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.tensor(x, dtype=torch.float64), dim=-1)


def _loss_fn(kind: str, chunk_size: int, mask=None):
    """(image, text, logit_scale, logit_bias) -> scalar loss of the chosen kind."""
    if kind == "infonce":
        return lambda i, t, s, b: clip_loss(i, t, s, mask=mask, chunk_size=chunk_size)[0]
    return lambda i, t, s, b: siglip_loss(i, t, s, b, mask=mask, chunk_size=chunk_size)[0]


# ---------------------------------------------------------------------------------------------------
# Parity with open_clip


OPENAI_LOGIT_SCALE = 4.6052  # what OpenAI CLIP (and RemoteCLIP, GeoRSCLIP, FarSLIP) store: exp = 100.003


def _open_clip_value_and_grads(kind, image, text, logit_scale, logit_bias):
    """open_clip's loss in float64 and its gradients w.r.t. (image, text, logit_scale, logit_bias)."""
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (image, text, logit_scale, logit_bias)]
    image_t, text_t, scale_t, bias_t = leaves
    unit_image, unit_text = F.normalize(image_t, dim=-1), F.normalize(text_t, dim=-1)
    if kind == "infonce":
        loss = ClipLoss()(unit_image, unit_text, scale_t.exp())
    else:
        loss = SigLipLoss()(unit_image, unit_text, scale_t.exp(), bias_t)
    loss.backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return loss.item(), [grad.numpy() for grad in grads]


# ln(1/0.07) (open_clip init), the OpenAI value just above ln 100, one below both, and one far above the
# clamp (the scale between an update and its clamp): the loss uses the unclipped exp(s) at all of them.
@pytest.mark.parametrize("logit_scale", [LOG_TEMPERATURE, OPENAI_LOGIT_SCALE, 1.0, 5.0])
@pytest.mark.parametrize("chunk_size", [0, 7])
@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_values_and_gradients_match_open_clip(kind, chunk_size, logit_scale):
    """Value and gradients w.r.t. the unnormalised embeddings, logit_scale and the SigLIP bias."""
    image = _random((24, 16), 0)
    text = 0.5 * image + _random((24, 16), 1)  # correlated pairs: a loss far from its chance value
    logit_bias = -10.0  # SigLIP's initial bias
    expected_value, expected_grads = _open_clip_value_and_grads(kind, image, text, logit_scale, logit_bias)
    value, grads = jax.value_and_grad(_loss_fn(kind, chunk_size), argnums=(0, 1, 2, 3))(
        image, text, np.float32(logit_scale), np.float32(logit_bias)
    )
    _close(value, expected_value)
    for ours, theirs in zip(grads, expected_grads):
        _close(ours, theirs)
    if kind == "infonce":  # ClipLoss has no bias: ours must not invent a gradient for it
        assert float(grads[3]) == 0.0
    assert abs(float(grads[2])) > 1e-3  # the temperature is learnable at every one of these scales


def test_clamp_logit_scale_bounds_only_the_temperature():
    params = {"logit_scale": jnp.float32(4.6052), "logit_bias": jnp.float32(-10.0), "tower": {"w": jnp.ones(3)}}
    clamped = clamp_logit_scale(params)
    assert float(clamped["logit_scale"]) == float(np.float32(LOG_MAX_LOGIT_SCALE))
    assert clamped["logit_scale"].dtype == jnp.float32
    assert clamped["logit_bias"] is params["logit_bias"] and clamped["tower"] is params["tower"]
    assert float(params["logit_scale"]) == np.float32(4.6052)  # pure: the input is untouched
    assert float(clamp_logit_scale({"logit_scale": jnp.float32(-0.5)})["logit_scale"]) == 0.0
    inside = jnp.float32(LOG_TEMPERATURE)
    assert float(clamp_logit_scale({"logit_scale": inside})["logit_scale"]) == float(inside)
    low_precision = clamp_logit_scale({"logit_scale": jnp.bfloat16(7.0)})["logit_scale"]
    assert low_precision.dtype == jnp.bfloat16 and float(low_precision) == float(jnp.bfloat16(LOG_MAX_LOGIT_SCALE))
    with pytest.raises(KeyError, match="logit_scale"):  # a nested or foreign tree is refused, never passed through
        clamp_logit_scale({"params": params})


# ---------------------------------------------------------------------------------------------------
# Hand-computed small cases

IMAGE_2 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
TEXT_2 = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)  # cosines: [[1, .6], [0, .8]]


def _log_sum_exp(*values):
    return math.log(sum(math.exp(v) for v in values))


def test_clip_loss_hand_computed():
    s = 2.0  # logits = 2 * cosines
    image_to_text = [_log_sum_exp(2.0, 1.2) - 2.0, _log_sum_exp(0.0, 1.6) - 1.6]
    text_to_image = [_log_sum_exp(2.0, 0.0) - 2.0, _log_sum_exp(1.2, 1.6) - 1.6]
    expected = 0.5 * (sum(image_to_text) / 2 + sum(text_to_image) / 2)
    # Unnormalised inputs: the loss normalises.
    loss, metrics = clip_loss(3.0 * IMAGE_2, 0.5 * TEXT_2, math.log(s))
    _close(loss, expected)
    _close(metrics["i2t_accuracy"], 1.0)  # row 0: 2 > 1.2, row 1: 1.6 > 0
    _close(metrics["t2i_accuracy"], 1.0)


def test_siglip_loss_hand_computed():
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    # logits = 2 * cos - 1 = [[1, .2], [-1, .6]]; diagonal: -log sigmoid(l) = softplus(-l); off: softplus(l)
    expected = (softplus(-1.0) + softplus(0.2) + softplus(-1.0) + softplus(-0.6)) / 2
    loss, _ = siglip_loss(IMAGE_2, TEXT_2, math.log(2.0), -1.0)
    _close(loss, expected)


def test_hard_negative_loss_hand_computed():
    # Row 0: batch texts (cos 1, .6) + own negative (cos .8): CE over [2, 1.2, 1.6], target 2.
    # Row 1: batch texts (cos 0, .8) + its negative is padded: CE over [0, 1.6], target 1.6.
    negatives = np.array([[[0.8, 0.6], [5.0, 5.0]], [[1.0, 1.0], [0.0, 1.0]]], np.float32)
    negative_mask = np.array([[True, False], [False, False]])
    expected = 0.5 * ((_log_sum_exp(2.0, 1.2, 1.6) - 2.0) + (_log_sum_exp(0.0, 1.6) - 1.6))
    loss, metrics = hard_negative_loss(IMAGE_2, TEXT_2, negatives, negative_mask, math.log(2.0))
    _close(loss, expected)
    _close(metrics["hard_negative_accuracy"], 1.0)  # 2 > 1.6


def test_hard_negative_loss_matches_explicit_rows():
    """Against an explicit per-row softmax over [all valid batch texts, own valid hard negatives]."""
    count, negatives_per_row, dim = 6, 3, 5
    image, text = _random((count, dim), 6), _random((count, dim), 7)
    negatives = _random((count, negatives_per_row, dim), 8)
    negative_mask = np.random.default_rng(9).random((count, negatives_per_row)) > 0.4
    mask = np.array([True, True, False, True, True, True])
    scale = 7.0
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    i, t, n = unit(image.astype(np.float64)), unit(text.astype(np.float64)), unit(negatives.astype(np.float64))
    losses = []
    for row in np.flatnonzero(mask):
        candidates = [scale * i[row] @ t[col] for col in np.flatnonzero(mask)]
        candidates += [scale * i[row] @ n[row, k] for k in np.flatnonzero(negative_mask[row])]
        losses.append(np.log(np.sum(np.exp(candidates))) - scale * i[row] @ t[row])
    for chunk_size in (0, 4):
        loss, _ = hard_negative_loss(image, text, negatives, negative_mask, math.log(scale), mask=mask, chunk_size=chunk_size)
        _close(loss, np.mean(losses))


def test_accuracy_counts_misranked_rows():
    text = np.eye(4, dtype=np.float32)
    image = text[[1, 0, 2, 3]]  # images 0 and 1 swapped
    _, metrics = clip_loss(image, text, 2.0)
    _close(metrics["i2t_accuracy"], 0.5)
    _close(metrics["t2i_accuracy"], 0.5)


# ---------------------------------------------------------------------------------------------------
# Masking: padded pairs are neither rows nor negatives, and get exactly zero gradient.

MASK_10 = np.array([True, True, False, True, False, True, True, True, False, True])


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_masked_pairs_are_inert(kind, chunk_size):
    image, text = _random((10, 6), 12), _random((10, 6), 13)
    scale, bias = 1.5, -1.0
    loss_fn = _loss_fn(kind, chunk_size, MASK_10)
    value_and_grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))
    value, grads = value_and_grads(image, text, scale, bias)
    # Perturbing masked entries (even to huge values) changes nothing.
    noise = 100.0 * _random((10, 6), 14) * ~MASK_10[:, None]
    value_p, grads_p = value_and_grads(image + noise, text - noise, scale, bias)
    _close(value_p, value, 1e-6)
    for g, g_p in zip(grads, grads_p):
        _close(g_p, g, 1e-6)
    assert np.all(np.asarray(grads[0])[~MASK_10] == 0.0)
    assert np.all(np.asarray(grads[1])[~MASK_10] == 0.0)
    # Masking is the same as dropping the entries.
    dropped = _loss_fn(kind, chunk_size)(image[MASK_10], text[MASK_10], scale, bias)
    _close(value, dropped)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_fully_masked_batch_gives_zero_and_no_nan(kind):
    image, text = _random((4, 3), 15), _random((4, 3), 16)
    for chunk_size in (0, 2):
        loss_fn = _loss_fn(kind, chunk_size, np.zeros(4, bool))
        value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(image, text, 1.0, 0.0)
        assert float(value) == 0.0
        for grad in grads:
            assert np.all(np.asarray(grad) == 0.0)


def test_hard_negative_masks_are_inert():
    count, negatives_per_row, dim = 5, 4, 6
    image, text = _random((count, dim), 17), _random((count, dim), 18)
    negatives = _random((count, negatives_per_row, dim), 19)
    negative_mask = np.random.default_rng(20).random((count, negatives_per_row)) > 0.5
    mask = np.array([True, False, True, True, True])

    def loss_fn(i, t, n):
        return hard_negative_loss(i, t, n, negative_mask, 2.0, mask=mask, chunk_size=2)[0]

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(image, text, negatives)
    inert = ~negative_mask | ~mask[:, None]  # padded negatives, and all negatives of a padded row
    perturbed = negatives + 50.0 * _random(negatives.shape, 21) * inert[..., None]
    value_p, grads_p = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(image, text, perturbed)
    _close(value_p, value, 1e-6)
    for g, g_p in zip(grads, grads_p):
        _close(g_p, g, 1e-6)
    assert np.all(np.asarray(grads[2])[inert] == 0.0)


# ---------------------------------------------------------------------------------------------------
# Chunked == plain


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_plain(kind, chunk_size):
    image, text = _random((10, 6), 22), _random((10, 6), 23)
    args = (image, text, 2.3, -0.7)
    plain = jax.value_and_grad(_loss_fn(kind, 0, MASK_10), argnums=(0, 1, 2, 3))(*args)
    chunked = jax.value_and_grad(_loss_fn(kind, chunk_size, MASK_10), argnums=(0, 1, 2, 3))(*args)
    _close(chunked[0], plain[0])
    for g_chunked, g_plain in zip(chunked[1], plain[1]):
        _close(g_chunked, g_plain)


def test_chunked_metrics_equal_plain():
    image, text = _random((9, 4), 24), _random((9, 4), 25)
    _, plain = clip_loss(image, text, 3.0)
    _, chunked = chunked_clip_loss(image, text, 3.0, chunk_size=4)
    for key in plain:
        _close(chunked[key], plain[key])


def test_multi_positive_with_distinct_labels_is_clip_loss():
    image, text = _random((7, 5), 26), _random((7, 5), 27)
    labels = np.arange(7) * 3 + 1
    expected, _ = clip_loss(image, text, 1.0)
    for chunk_size in (0, 3):
        loss, _ = multi_positive_contrastive_loss(image, text, labels, None, 1.0, chunk_size=chunk_size)
        _close(loss, expected)


def test_chunked_memory_stays_linear_in_batch():
    """The compiled fwd+bwd of the chunked loss needs far less scratch memory than one [N, N] logits block."""
    count, dim, chunk_size = 4096, 16, 128
    image = jax.ShapeDtypeStruct((count, dim), jnp.float32)
    scale = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_bytes(chunk):
        grad_fn = jax.jit(jax.grad(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk)[0], argnums=(0, 1, 2)))
        analysis = grad_fn.lower(image, image, scale).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory_analysis()")
        return analysis.temp_size_in_bytes

    logits_bytes = count * count * 4
    block_bytes = count * chunk_size * 4
    embedding_bytes = count * dim * 4
    plain, chunked = temp_bytes(0), temp_bytes(chunk_size)
    assert plain >= logits_bytes  # the plain form really holds [N, N] logits
    # A few [N, chunk] blocks (logits, their exp, the cotangent) plus embedding-sized buffers.
    assert chunked <= 4 * block_bytes + 16 * embedding_bytes, (chunked, block_bytes)


# ---------------------------------------------------------------------------------------------------
# Long-CLIP primary-component matching


def test_principal_component_reconstruction_matches_numpy():
    features = _random((12, 6), 28)
    mask = np.array([True] * 10 + [False] * 2)
    valid = features[mask].astype(np.float64)
    mean = valid.mean(axis=0)
    centred = valid - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    basis = eigenvectors[:, np.argsort(eigenvalues)[::-1][:3]]
    expected = (features - mean) @ basis @ basis.T + mean
    rebuilt = principal_component_reconstruction(features, 3, mask=mask)
    _close(rebuilt, expected, 1e-4)
    # All components: the identity; gradients stay finite with a rank-deficient covariance (N < E).
    _close(principal_component_reconstruction(features, 6), features, 1e-4)
    small = _random((3, 6), 29)
    grad = jax.grad(lambda x: jnp.sum(principal_component_reconstruction(x, 2) ** 2))(small)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_principal_component_reconstruction_rejects_bad_count():
    with pytest.raises(ValueError, match="num_components"):
        principal_component_reconstruction(np.ones((4, 3), np.float32), 4)
