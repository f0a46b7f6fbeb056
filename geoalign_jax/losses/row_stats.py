"""Row statistics of a contrastive loss: for each row (an image or a text), the log-sum-exp of its logits against
every valid column, its positive logits and its best match, in a plain form or a chunked one.

Global negatives under sharding: inside `jax.jit` with GSPMD, embeddings are global arrays split over
the batch axes, so the plain form's `rows @ columns.T` over the GLOBAL batch is already cross-device
(XLA all-gathers one side); each device then holds a [B_global / n, B_global] block of logits. The
chunked form (`chunk_size > 0`) runs under `jax.shard_map` over the batch axes: each device all-gathers
the column embeddings ([B_global, E], linear in the batch), then scans over column chunks with an online
log-sum-exp, holding one [B_local, chunk] block of logits at a time. Its backward pass is a custom VJP
that recomputes each block from the final log-sum-exp, so it stays O(B_local x chunk) as well; the
column-embedding cotangents are reduce-scattered back by the transpose of the all-gather.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array

# Start of the online running max: the lowest finite float32, so no finite logit lies below it whatever the
# scale, yet finite, so that `exp(old_max - new_max)` never evaluates inf - inf.
_RUNNING_MAX_START = float(jnp.finfo(jnp.float32).min)
# Similarities in full float32 on every backend (see the module docstring).
HIGHEST = jax.lax.Precision.HIGHEST


def similarity(rows: Array, columns: Array) -> Array:
    """`rows @ columns.T` [N, M] at HIGHEST precision (the one way this module forms similarities)."""
    return jnp.matmul(rows, columns.T, precision=HIGHEST)

KINDS = ("softmax", "sigmoid")


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


def stats_from_logits(logits: Array, row_labels: Array, column_labels: Array, column_valid: Array, kind: str) -> RowStats:
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
        return stats_from_logits(logits, row_labels, column_labels, column_valid, kind)
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
