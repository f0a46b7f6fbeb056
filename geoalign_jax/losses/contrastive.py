"""Image-text contrastive objectives over the whole global batch: InfoNCE, SigLIP, multi-positive,
hard-negative InfoNCE, and Long-CLIP's primary-component matching; plain and chunked forms.

Every loss here normalises its embeddings (the towers return them unnormalised), turns the log-space
`logit_scale` parameter into the multiplicative scale `exp(logit_scale)` (unclipped, as open_clip's and
FarSLIP's losses do) and computes in float32.

The temperature's bound is open_clip's: the parameter, not the loss, is clamped to [0, ln 100] after every
optimizer update (`clamp_logit_scale`, called by the train step). Clipping inside the loss instead
(`min(exp(s), 100)`) would give the parameter a zero gradient above ln 100, and OpenAI CLIP and the RS-CLIPs
initialised from it (RemoteCLIP, GeoRSCLIP, FarSLIP) store s = 4.6052 > ln 100, so the temperature could never
be learned from them. Between an update and its clamp the scale may exceed 100 for one step; nothing here
assumes a bound on the logits.

Precision: every matmul that forms or differentiates a similarity (logits, their backward, the hard-negative
logits, the principal-component projection) runs at `jax.lax.Precision.HIGHEST`. On GPU/TPU the default
matmul precision is TF32/bf16, which at scale 100 moves logits by 0.1-0.4; the towers keep their configured
compute dtype, only these small [rows x columns] products pay for full float32.

Global negatives under sharding: see `row_stats.py` (plain and chunked forms of the row statistics).

Masks: every `mask`/`valid` argument marks real entries. Masked entries are removed as rows AND columns
with `jnp.where` (never by multiplying), so they change neither the value nor any gradient, and rows
with no valid column give a finite 0 instead of NaN.

All loss functions return `(loss, metrics)`: a float32 scalar and a dict of float32 scalars (accuracies
carry no gradient).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from geoalign_jax.losses.row_stats import HIGHEST, RowStats, masked_logsumexp, row_statistics, similarity, stats_from_logits
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]

MAX_LOGIT_SCALE = 100.0
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)
# torch.nn.functional.normalize's epsilon: x / max(||x||, eps).
NORM_EPS = 1e-12


def l2_normalize(x: Array, axis: int = -1, eps: float = NORM_EPS) -> Array:
    """`x / max(||x||, eps)` in float32, like `F.normalize`; finite gradient at x = 0 (padded entries)."""
    x = jnp.asarray(x, jnp.float32)
    squared_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def clamp_logit_scale(params: dict) -> dict:
    """open_clip's rule, applied after every optimizer update: `logit_scale` clamped to [0, ln 100].

    The losses use the unclipped `exp(logit_scale)`; this clamp is what bounds the scale at 100.

    Pure: returns a new top-level params dict (only `logit_scale` changes). A tree without a top-level
    `logit_scale` is an error: a clamp that silently does nothing would let the temperature run away.
    """
    if "logit_scale" not in params:
        raise KeyError(f"clamp_logit_scale needs the model's top-level params dict with 'logit_scale'; got keys {sorted(params)}")
    clamped = jnp.clip(params["logit_scale"], 0.0, LOG_MAX_LOGIT_SCALE).astype(jnp.asarray(params["logit_scale"]).dtype)
    return {**params, "logit_scale": clamped}


def logit_scale_value(logit_scale: Array | float) -> Array:
    """The multiplicative scale `exp(logit_scale)` (float32, unclipped) from the log-space parameter."""
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32))


# ----------------------------------------------------------------------------------------------------
# Losses built on the row statistics.


def _valid_or_all(mask: Array | None, count: int) -> Array:
    return jnp.ones((count,), bool) if mask is None else jnp.asarray(mask, bool).reshape(count)


def _softmax_row_losses(stats: RowStats) -> Array:
    """Per-row multi-positive cross-entropy: lse_i - mean of the positive logits (one positive = InfoNCE)."""
    return stats.reduction - stats.positive_sum / jnp.maximum(stats.positive_count, 1.0)


def _masked_mean(values: Array, valid: Array) -> tuple[Array, Array]:
    count = jnp.sum(valid).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1.0), count


def _accuracy(stats: RowStats, valid: Array) -> Array:
    correct = stats.max_positive >= stats.max_negative
    return jax.lax.stop_gradient(_masked_mean(correct.astype(jnp.float32), valid)[0])


def _symmetric_stats(a, b, labels, valid, scale, bias, kind, chunk_size, axis_context) -> tuple[RowStats, RowStats]:
    """a->b and b->a statistics; the plain form computes the [N, N] logits once and transposes them."""
    if chunk_size == 0:
        logits = scale * similarity(a, b) + bias
        return (
            stats_from_logits(logits, labels, labels, valid, kind),
            stats_from_logits(logits.T, labels, labels, valid, kind),
        )
    common = dict(kind=kind, chunk_size=chunk_size, axis_context=axis_context)
    return (
        row_statistics(a, labels, b, labels, valid, scale, bias, **common),
        row_statistics(b, labels, a, labels, valid, scale, bias, **common),
    )


def multi_positive_contrastive_loss(
    a_emb: Array,
    b_emb: Array,
    labels: Array,
    valid: Array | None,
    logit_scale: Array,
    *,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """Symmetric cross-entropy where every valid pair (i, j) with `labels[i] == labels[j]` is a positive.

    Target distribution per row: uniform over its positives (P_ij = 1[c_i = c_j] / n_i), so
    L = 1/2 [mean_i (lse_j(s a_i.b_j) - mean_{j pos} s a_i.b_j) + the same with a and b swapped],
    means over valid rows of the global batch. With all labels distinct it is CLIP's InfoNCE.
    """
    a = l2_normalize(a_emb)
    b = l2_normalize(b_emb)
    count = a.shape[0]
    if b.shape[0] != count:
        raise ValueError(f"a_emb has {count} rows but b_emb has {b.shape[0]}; pairs must align")
    valid = _valid_or_all(valid, count)
    labels = jnp.asarray(labels, jnp.int32).reshape(count)
    scale = logit_scale_value(logit_scale)
    a_to_b, b_to_a = _symmetric_stats(a, b, labels, valid, scale, jnp.zeros((), jnp.float32), "softmax", chunk_size, axis_context)
    rows_valid_ab = valid & (a_to_b.positive_count > 0)
    rows_valid_ba = valid & (b_to_a.positive_count > 0)
    loss_ab, _ = _masked_mean(_softmax_row_losses(a_to_b), rows_valid_ab)
    loss_ba, _ = _masked_mean(_softmax_row_losses(b_to_a), rows_valid_ba)
    loss = 0.5 * (loss_ab + loss_ba)
    return loss, {
        "loss": loss,
        "a2b_accuracy": _accuracy(a_to_b, rows_valid_ab),
        "b2a_accuracy": _accuracy(b_to_a, rows_valid_ba),
        "count": jnp.sum(rows_valid_ab).astype(jnp.float32),
    }


def clip_loss(
    image_emb: Array,
    text_emb: Array,
    logit_scale: Array,
    *,
    mask: Array | None = None,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """CLIP's symmetric InfoNCE over the global batch (= `open_clip.loss.ClipLoss` when unmasked).

    image_emb, text_emb [N, E] unnormalised; mask [N] marks real pairs (masked pairs are neither rows
    nor negatives). chunk_size > 0: the chunked form (same value and gradients, O(local x chunk) memory).
    """
    labels = jnp.arange(jnp.shape(image_emb)[0], dtype=jnp.int32)
    loss, metrics = multi_positive_contrastive_loss(
        image_emb, text_emb, labels, mask, logit_scale, chunk_size=chunk_size, axis_context=axis_context
    )
    return loss, {
        "loss": loss,
        "i2t_accuracy": metrics["a2b_accuracy"],
        "t2i_accuracy": metrics["b2a_accuracy"],
    }


def chunked_clip_loss(
    image_emb: Array,
    text_emb: Array,
    logit_scale: Array,
    *,
    chunk_size: int,
    mask: Array | None = None,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """`clip_loss` holding at most a [local batch x chunk_size] block of logits per device."""
    if chunk_size < 1:
        raise ValueError(f"chunked_clip_loss needs chunk_size >= 1, got {chunk_size}")
    return clip_loss(image_emb, text_emb, logit_scale, mask=mask, chunk_size=chunk_size, axis_context=axis_context)


def siglip_loss(
    image_emb: Array,
    text_emb: Array,
    logit_scale: Array,
    logit_bias: Array,
    *,
    mask: Array | None = None,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """SigLIP's pairwise sigmoid loss with learnable bias (= `open_clip.loss.SigLipLoss`, world size 1).

    L = -1/N sum_{i,j valid} log sigmoid(z_ij (s <I_i, T_j> + b)), z = +1 on the diagonal, -1 elsewhere;
    N = number of valid pairs. Computed as sum softplus(l_ij) - sum l_ii (the same thing, and it reuses
    the chunked kernel). On several devices DDP's averaged per-rank SigLipLoss is this global value.
    """
    image = l2_normalize(image_emb)
    text = l2_normalize(text_emb)
    count = image.shape[0]
    valid = _valid_or_all(mask, count)
    labels = jnp.arange(count, dtype=jnp.int32)
    stats = row_statistics(
        image, labels, text, labels, valid, logit_scale_value(logit_scale), logit_bias,
        kind="sigmoid", chunk_size=chunk_size, axis_context=axis_context,
    )
    loss, _ = _masked_mean(stats.reduction - stats.positive_sum, valid)
    return loss, {"loss": loss, "i2t_accuracy": _accuracy(stats, valid)}


def hard_negative_loss(
    image_emb: Array,
    text_emb: Array,
    negative_emb: Array,
    negative_mask: Array,
    logit_scale: Array,
    *,
    mask: Array | None = None,
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> tuple[Array, Metrics]:
    """Image-to-text InfoNCE whose row i also contains image i's own hard-negative captions.

    image_emb, text_emb [N, E]; negative_emb [N, K, E]; negative_mask [N, K] (padded negatives False).
    Row i's candidates: every valid text of the global batch plus its own valid hard negatives; target
    its own text. Loss = mean over valid rows. Metrics: accuracy over all candidates, and
    `hard_negative_accuracy` = fraction of valid (image, hard negative) pairs where the true caption wins.
    """
    image = l2_normalize(image_emb)
    text = l2_normalize(text_emb)
    negatives = l2_normalize(negative_emb)
    count = image.shape[0]
    if negatives.shape[:1] != (count,) or jnp.shape(negative_mask) != negatives.shape[:2]:
        raise ValueError(
            f"negative_emb {negatives.shape} / negative_mask {jnp.shape(negative_mask)} must be [N, K, E] / [N, K] "
            f"with N = {count}"
        )
    valid = _valid_or_all(mask, count)
    negative_valid = jnp.asarray(negative_mask, bool)
    labels = jnp.arange(count, dtype=jnp.int32)
    scale = logit_scale_value(logit_scale)
    stats = row_statistics(image, labels, text, labels, valid, scale, kind="softmax", chunk_size=chunk_size, axis_context=axis_context)
    negative_logits = scale * jnp.einsum("ne,nke->nk", image, negatives, precision=HIGHEST)
    batch_has_columns = (stats.positive_count > 0)[:, None]
    candidates = jnp.concatenate([stats.reduction[:, None], negative_logits], axis=1)
    candidates_valid = jnp.concatenate([batch_has_columns, negative_valid], axis=1)
    row_lse = masked_logsumexp(candidates, candidates_valid)
    rows_valid = valid & (stats.positive_count > 0)
    loss, _ = _masked_mean(row_lse - stats.positive_sum, rows_valid)
    frozen_negative = jax.lax.stop_gradient(jnp.where(negative_valid, negative_logits, -jnp.inf))
    positive = jax.lax.stop_gradient(stats.positive_sum)
    best_negative = jnp.maximum(stats.max_negative, jnp.max(frozen_negative, axis=1))
    accuracy = _masked_mean((positive >= best_negative).astype(jnp.float32), rows_valid)[0]
    pair_valid = negative_valid & rows_valid[:, None]
    pair_wins = (positive[:, None] > frozen_negative).astype(jnp.float32)
    hard_accuracy = _masked_mean(pair_wins, pair_valid)[0]
    return loss, {"loss": loss, "i2t_accuracy": accuracy, "hard_negative_accuracy": hard_accuracy}


def principal_component_reconstruction(
    features: Array, num_components: int, *, mask: Array | None = None, groups: int = 1
) -> Array:
    """Long-CLIP's primary-component matching: features rebuilt from their top principal components.

    As Long-CLIP's `CLIP.PCA` computes it (model/model_longclip.py:389-403 of beichenzbc/Long-CLIP): per
    group, mean over the (valid) rows, `U, S, Vt = svd(X - mean)`, basis B = the first `num_components` rows
    of Vt, and each row becomes (x - mean) B B^T + mean. The gradient flows through the SVD (as torch's does
    there), and the result is NOT re-normalised (Long-CLIP contrasts it as it is).

    features [N, E] (Long-CLIP passes the normalised image embeddings). `groups` splits the rows into that
    many consecutive equal blocks, each with its own PCA: Long-CLIP runs it on each GPU's batch before the
    all-gather, which is `groups` = the number of batch shards. Masked rows neither enter a group's mean nor
    its SVD (they are rebuilt with the group's basis but read by no loss).
    """
    x = jnp.asarray(features, jnp.float32)
    count, dim = x.shape
    if not 0 < num_components <= dim:
        raise ValueError(f"num_components must be in [1, {dim}], got {num_components}")
    if groups < 1 or count % groups:
        raise ValueError(f"the {count} rows cannot be split into {groups} equal PCA groups")
    valid = _valid_or_all(mask, count)

    def one_group(rows: Array, rows_valid: Array) -> Array:
        rows_valid = rows_valid[:, None]
        mean = jnp.sum(jnp.where(rows_valid, rows, 0.0), axis=0) / jnp.maximum(jnp.sum(rows_valid), 1)
        centred = rows - mean
        # The SVD's derivative is formed by matmuls of its own: HIGHEST, like every similarity here.
        with jax.default_matmul_precision("highest"):
            _, _, vt = jnp.linalg.svd(jnp.where(rows_valid, centred, 0.0), full_matrices=False)
        basis = vt[:num_components].T
        coordinates = jnp.matmul(centred, basis, precision=HIGHEST)
        return jnp.matmul(coordinates, basis.T, precision=HIGHEST) + mean

    size = count // groups
    rebuilt = jax.vmap(one_group)(x.reshape(groups, size, dim), valid.reshape(groups, size))
    return rebuilt.reshape(count, dim)


__all__ = [
    "LOG_MAX_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "RowStats",
    "chunked_clip_loss",
    "clip_loss",
    "hard_negative_loss",
    "l2_normalize",
    "clamp_logit_scale",
    "logit_scale_value",
    "masked_logsumexp",
    "multi_positive_contrastive_loss",
    "principal_component_reconstruction",
    "row_statistics",
    "siglip_loss",
    "similarity",
]
