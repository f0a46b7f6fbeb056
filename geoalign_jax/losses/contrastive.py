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

Global negatives under sharding: inside `jax.jit` with GSPMD, embeddings are global arrays split over
the batch axes, so the plain form's `rows @ columns.T` over the GLOBAL batch is already cross-device
(XLA all-gathers one side); each device then holds a [B_global / n, B_global] block of logits. The
chunked form (`chunk_size > 0`) runs under `jax.shard_map` over the batch axes: each device all-gathers
the column embeddings ([B_global, E], linear in the batch), then scans over column chunks with an online
log-sum-exp, holding one [B_local, chunk] block of logits at a time. Its backward pass is a custom VJP
that recomputes each block from the final log-sum-exp, so it stays O(B_local x chunk) as well; the
column-embedding cotangents are reduce-scattered back by the transpose of the all-gather.

Masks: every `mask`/`valid` argument marks real entries. Masked entries are removed as rows AND columns
with `jnp.where` (never by multiplying), so they change neither the value nor any gradient, and rows
with no valid column give a finite 0 instead of NaN.

All loss functions return `(loss, metrics)`: a float32 scalar and a dict of float32 scalars (accuracies
carry no gradient).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]

MAX_LOGIT_SCALE = 100.0
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)
# torch.nn.functional.normalize's epsilon: x / max(||x||, eps).
NORM_EPS = 1e-12
# Start of the online running max: the lowest finite float32, so no finite logit lies below it whatever the
# scale, yet finite, so that `exp(old_max - new_max)` never evaluates inf - inf.
_RUNNING_MAX_START = float(jnp.finfo(jnp.float32).min)
# Similarities in full float32 on every backend (see the module docstring).
HIGHEST = jax.lax.Precision.HIGHEST


def similarity(rows: Array, columns: Array) -> Array:
    """`rows @ columns.T` [N, M] at HIGHEST precision (the one way this module forms similarities)."""
    return jnp.matmul(rows, columns.T, precision=HIGHEST)

KINDS = ("softmax", "sigmoid")


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


def masked_logsumexp(logits: Array, valid: Array, axis: int = -1) -> Array:
    """log-sum-exp over the valid entries only; 0 where no entry is valid.

    Masked entries get exactly zero gradient and never produce NaN (double `where`).
    """
    valid = jnp.broadcast_to(valid, logits.shape)
    any_valid = jnp.any(valid, axis=axis)
    safe_logits = jnp.where(valid, logits, 0.0)
    row_max = jnp.max(jnp.where(valid, logits, _RUNNING_MAX_START), axis=axis, keepdims=True)
    row_max = jax.lax.stop_gradient(row_max)
    summed = jnp.sum(jnp.where(valid, jnp.exp(safe_logits - row_max), 0.0), axis=axis)
    lse = jnp.squeeze(row_max, axis) + jnp.log(jnp.where(any_valid, summed, 1.0))
    return jnp.where(any_valid, lse, 0.0)


class RowStats(NamedTuple):
    """Per-row reductions of `logits[i, j] = scale * <rows_i, columns_j> + bias` over valid columns.

    reduction: log-sum-exp (kind "softmax") or sum of softplus (kind "sigmoid").
    positive_sum / positive_count: sum and number of valid columns whose label equals the row's.
    max_positive / max_negative: largest positive / negative logit (for accuracy; no gradient).
    """

    reduction: Array
    positive_sum: Array
    positive_count: Array
    max_positive: Array
    max_negative: Array


def _stats_from_logits(logits: Array, row_labels: Array, column_labels: Array, column_valid: Array, kind: str) -> RowStats:
    valid = jnp.broadcast_to(column_valid[None, :], logits.shape)
    positive = (row_labels[:, None] == column_labels[None, :]) & valid
    if kind == "softmax":
        reduction = masked_logsumexp(logits, valid)
    else:
        reduction = jnp.sum(jnp.where(valid, jax.nn.softplus(jnp.where(valid, logits, 0.0)), 0.0), axis=-1)
    frozen = jax.lax.stop_gradient(logits)
    return RowStats(
        reduction=reduction,
        positive_sum=jnp.sum(jnp.where(positive, logits, 0.0), axis=-1),
        positive_count=jnp.sum(positive, axis=-1).astype(jnp.float32),
        max_positive=jnp.max(jnp.where(positive, frozen, -jnp.inf), axis=-1),
        max_negative=jnp.max(jnp.where(valid & ~positive, frozen, -jnp.inf), axis=-1),
    )


# ----------------------------------------------------------------------------------------------------
# Chunked kernel: one device's rows against (gathered) columns, one [rows, chunk] block at a time.


def _chunk_inputs(columns: Array, column_labels: Array, column_valid: Array, chunk_size: int):
    count = columns.shape[0] // chunk_size
    return (
        columns.reshape(count, chunk_size, columns.shape[-1]),
        column_labels.reshape(count, chunk_size),
        column_valid.reshape(count, chunk_size),
    )


def _varying(value: Array, axes: tuple[str, ...]) -> Array:
    """Marks a freshly created (replicated) value as device-varying over `axes` inside shard_map, so it
    can be a scan carry next to per-device values (shard_map's varying-axes check); no-op without axes."""
    return jax.lax.pcast(value, axes, to="varying") if axes else value


def _chunked_forward(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes):
    row_count = rows.shape[0]

    def body(carry, chunk):
        running_max, accumulated, positive_sum, positive_count, max_positive, max_negative = carry
        chunk_columns, chunk_labels, chunk_valid = chunk
        logits = scale * similarity(rows, chunk_columns) + bias
        valid = jnp.broadcast_to(chunk_valid[None, :], logits.shape)
        positive = (row_labels[:, None] == chunk_labels[None, :]) & valid
        safe_logits = jnp.where(valid, logits, 0.0)
        if kind == "softmax":
            new_max = jnp.maximum(running_max, jnp.max(jnp.where(valid, logits, _RUNNING_MAX_START), axis=-1))
            accumulated = accumulated * jnp.exp(running_max - new_max) + jnp.sum(
                jnp.where(valid, jnp.exp(safe_logits - new_max[:, None]), 0.0), axis=-1
            )
            running_max = new_max
        else:
            accumulated = accumulated + jnp.sum(jnp.where(valid, jax.nn.softplus(safe_logits), 0.0), axis=-1)
        positive_sum = positive_sum + jnp.sum(jnp.where(positive, logits, 0.0), axis=-1)
        positive_count = positive_count + jnp.sum(positive, axis=-1).astype(jnp.float32)
        max_positive = jnp.maximum(max_positive, jnp.max(jnp.where(positive, logits, -jnp.inf), axis=-1))
        max_negative = jnp.maximum(max_negative, jnp.max(jnp.where(valid & ~positive, logits, -jnp.inf), axis=-1))
        return (running_max, accumulated, positive_sum, positive_count, max_positive, max_negative), None

    zeros = jnp.zeros((row_count,), jnp.float32)
    init = tuple(
        _varying(value, axes)
        for value in (
            jnp.full((row_count,), _RUNNING_MAX_START, jnp.float32),
            zeros,
            zeros,
            zeros,
            jnp.full((row_count,), -jnp.inf, jnp.float32),
            jnp.full((row_count,), -jnp.inf, jnp.float32),
        )
    )
    carry, _ = jax.lax.scan(body, init, _chunk_inputs(columns, column_labels, column_valid, chunk_size))
    running_max, accumulated, positive_sum, positive_count, max_positive, max_negative = carry
    if kind == "softmax":
        nonempty = accumulated > 0
        reduction = jnp.where(nonempty, running_max + jnp.log(jnp.where(nonempty, accumulated, 1.0)), 0.0)
    else:
        reduction = accumulated
    return RowStats(reduction, positive_sum, positive_count, max_positive, max_negative)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _chunked_row_stats(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes):
    return _chunked_forward(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes)


def _chunked_row_stats_fwd(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes):
    stats = _chunked_forward(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes)
    residuals = (rows, row_labels, columns, column_labels, column_valid, scale, bias, stats.reduction)
    return stats, residuals


def _chunked_row_stats_bwd(kind, chunk_size, axes, residuals, cotangent):
    """Recomputes each [rows, chunk] block of logits; only `reduction` and `positive_sum` carry gradient."""
    rows, row_labels, columns, column_labels, column_valid, scale, bias, reduction = residuals
    reduction_cotangent = cotangent.reduction
    positive_cotangent = cotangent.positive_sum

    def body(carry, chunk):
        rows_grad, scale_grad, bias_grad = carry
        chunk_columns, chunk_labels, chunk_valid = chunk
        cosine = similarity(rows, chunk_columns)
        logits = scale * cosine + bias
        valid = jnp.broadcast_to(chunk_valid[None, :], logits.shape)
        positive = (row_labels[:, None] == chunk_labels[None, :]) & valid
        safe_logits = jnp.where(valid, logits, 0.0)
        if kind == "softmax":
            weight = jnp.exp(safe_logits - reduction[:, None])
        else:
            weight = jax.nn.sigmoid(safe_logits)
        logits_grad = jnp.where(valid, reduction_cotangent[:, None] * weight, 0.0) + jnp.where(
            positive, positive_cotangent[:, None], 0.0
        )
        rows_grad = rows_grad + scale * jnp.matmul(logits_grad, chunk_columns, precision=HIGHEST)
        columns_grad = scale * jnp.matmul(logits_grad.T, rows, precision=HIGHEST)
        scale_grad = scale_grad + jnp.sum(logits_grad * cosine)
        bias_grad = bias_grad + jnp.sum(logits_grad)
        return (rows_grad, scale_grad, bias_grad), columns_grad

    init = tuple(_varying(jnp.zeros(x.shape, jnp.float32), axes) for x in (rows, scale, bias))
    (rows_grad, scale_grad, bias_grad), columns_grad = jax.lax.scan(
        body, init, _chunk_inputs(columns, column_labels, column_valid, chunk_size)
    )
    columns_grad = columns_grad.reshape(columns.shape)
    return rows_grad, None, columns_grad, None, None, scale_grad, bias_grad


_chunked_row_stats.defvjp(_chunked_row_stats_fwd, _chunked_row_stats_bwd)


def _local_chunked_row_stats(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes=()):
    """Pads the columns to a multiple of the chunk (padding is invalid) and runs the chunked kernel."""
    column_count = columns.shape[0]
    chunk_size = min(chunk_size, column_count)
    padding = (-column_count) % chunk_size
    if padding:
        columns = jnp.pad(columns, ((0, padding), (0, 0)))
        column_labels = jnp.pad(column_labels, (0, padding))
        column_valid = jnp.pad(column_valid, (0, padding))
    return _chunked_row_stats(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size, axes)


def row_statistics(
    rows: Array,
    row_labels: Array,
    columns: Array,
    column_labels: Array,
    column_valid: Array,
    scale: Array,
    bias: Array | float | None = None,
    *,
    kind: str = "softmax",
    chunk_size: int = 0,
    axis_context: AxisContext | None = None,
) -> RowStats:
    """Per-row statistics of `scale * rows @ columns.T + bias` over the valid columns of the global batch.

    rows [N, E], columns [M, E] (already normalised), labels int [N] / [M] (equal label = positive),
    column_valid bool [M]. chunk_size 0 gives the plain form (full [N, M] logits, partitioned by GSPMD);
    > 0 the chunked form, run per device under `jax.shard_map` when `axis_context` splits the batch.
    Both give the same values and gradients.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = plain), got {chunk_size}")
    rows = jnp.asarray(rows, jnp.float32)
    columns = jnp.asarray(columns, jnp.float32)
    row_labels = jnp.asarray(row_labels, jnp.int32)
    column_labels = jnp.asarray(column_labels, jnp.int32)
    column_valid = jnp.asarray(column_valid, bool)
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if chunk_size == 0:
        logits = scale * similarity(rows, columns) + bias
        return _stats_from_logits(logits, row_labels, column_labels, column_valid, kind)
    shards = 1 if axis_context is None else axis_context.batch_shards
    if shards == 1:
        return _local_chunked_row_stats(rows, row_labels, columns, column_labels, column_valid, scale, bias, kind, chunk_size)
    for name, size in (("rows", rows.shape[0]), ("columns", columns.shape[0])):
        if size % shards:
            raise ValueError(
                f"chunked contrastive loss: {name} count {size} is not divisible by the {shards} batch shards "
                f"of mesh axes {axis_context.axes}"
            )
    axes = axis_context.axes
    batch_spec = PartitionSpec(axes)

    def per_device(rows, row_labels, columns, column_labels, column_valid, scale, bias):
        gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
        # The scalars are replicated; marking them device-varying lets the custom VJP return per-device
        # partial gradients, which the transpose of `pcast` then sums over the batch axes.
        scale = jax.lax.pcast(scale, axes, to="varying")
        bias = jax.lax.pcast(bias, axes, to="varying")
        return _local_chunked_row_stats(
            rows, row_labels, gather(columns), gather(column_labels), gather(column_valid), scale, bias, kind, chunk_size,
            tuple(axes),
        )

    sharded = jax.shard_map(
        per_device,
        mesh=axis_context.mesh,
        in_specs=(batch_spec,) * 5 + (PartitionSpec(), PartitionSpec()),
        out_specs=RowStats(*(batch_spec,) * 5),
    )
    return sharded(rows, row_labels, columns, column_labels, column_valid, scale, bias)


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
            _stats_from_logits(logits, labels, labels, valid, kind),
            _stats_from_logits(logits.T, labels, labels, valid, kind),
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
