"""Gradient accumulation that computes the whole global batch's objective (GradCache, Gao et al. 2021;
open_clip's `--accum-freq`), for every term of `losses/objective.py`.

With `micro_batches = K > 1` the step's gradient is the gradient of the objective on the global batch, not
an average over K smaller batches, so every contrastive term keeps the negatives of the whole batch:
  1. forward: `lax.scan` over the K micro-batches encodes each one (`objective.compute_outputs`) without
     keeping activations (no differentiation yet) -> the towers' outputs of the global batch (the cache);
  2. objective: the terms on the cached outputs of the global batch, differentiated with respect to those
     outputs and to the parameters the terms read directly (logit_scale, logit_bias);
  3. backward: `lax.scan` over the micro-batches again: re-encode micro-batch k under `jax.vjp` and pull
     its slice of the output gradient back to the parameters; the K pulls and step 2's parameter gradient
     are summed.
Peak memory is one micro-batch's activations plus the cached outputs and their gradient; the cost is one
more forward pass of the towers. Both passes see the same inputs: augmentation happens in the data pipeline,
the towers have no dropout or other randomness, and the text tower's length bucket depends only on the
micro-batch's tokens. The result equals K = 1 up to float32 reassociation (tests/test_train_grad_cache.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geoalign_jax.losses import objective as objective_lib
from geoalign_jax.parallel import mesh as mesh_lib

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, batch, step, teacher) -> ((loss, metrics), gradients with respect to params)
GradientFn = Callable[[Any, Batch, Any, Any], tuple[tuple[jax.Array, Metrics], Any]]


def _batch_constraint(x: jax.Array, mesh: Mesh | None, leading: tuple[None, ...]) -> jax.Array:
    if mesh is None:
        return x
    spec = PartitionSpec(*leading, mesh_lib.present_batch_axes(mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split_micro_batches(batch: Batch, count: int, mesh: Mesh | None) -> Batch:
    """[B, ...] -> [count, B / count, ...] with micro-batch k = rows k, k + count, k + 2 count, ...

    Why strided rows: the batch is split over the devices along B in contiguous blocks, so taking every
    count-th row keeps each micro-batch spread over all devices (a contiguous cut would leave most idle).
    """

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        x = jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)
        return _batch_constraint(x, mesh, (None,))

    return {key: split(value) for key, value in batch.items()}


def merge_micro_batches(stacked: Batch, mesh: Mesh | None) -> Batch:
    """The inverse of split_micro_batches: [count, B / count, ...] -> [B, ...] in the global batch's row order."""

    def merge(x: jax.Array) -> jax.Array:
        count, rows = x.shape[:2]
        return _batch_constraint(jnp.swapaxes(x, 0, 1).reshape((count * rows,) + x.shape[2:]), mesh, ())

    return {key: merge(value) for key, value in stacked.items()}


def make_gradient_fn(
    loss_config: Any,
    model_config: Any,
    micro_batches: int,
    *,
    mesh: Mesh | None = None,
    gathered: Callable[[Any], Any] = lambda tree: tree,
    encode_image: objective_lib.EncodeImage | None = None,
    encode_text: objective_lib.EncodeText | None = None,
) -> GradientFn:
    """`gradients(params, batch, step, teacher) -> ((loss, metrics), grads)` of the objective on the global
    batch; K = `micro_batches` > 1 encodes it K micro-batches at a time (module docstring). `gathered` puts
    the parameters in their compute layout (train/step.py); `teacher`: the distillation teacher or None.
    Metrics are those of the global batch for any K."""
    config = objective_lib.validate_loss_config(loss_config)
    context = mesh_lib.axis_context(mesh)
    terms_objective = objective_lib.make_terms_objective(config)

    def encode(params: Any, batch: Batch, teacher: Any) -> dict[str, jax.Array]:
        return objective_lib.compute_outputs(
            model_config, gathered(params), batch, config, encode_image=encode_image, encode_text=encode_text,
            teacher_params=gathered(teacher),
        )

    def objective(outputs: Any, params: Any, batch: Batch, step: Any) -> tuple[jax.Array, Metrics]:
        return terms_objective(outputs, batch, params, step, axis_context=context)

    if micro_batches == 1:
        def whole(params, batch, step, teacher):
            return jax.value_and_grad(lambda p: objective(encode(p, batch, teacher), p, batch, step), has_aux=True)(params)

        return whole

    def accumulated(params, batch, step, teacher):
        micro = split_micro_batches(batch, micro_batches, mesh)
        # 1. The cache: every micro-batch's outputs, activations dropped (nothing here is differentiated).
        _, stacked = jax.lax.scan(lambda carry, part: (carry, encode(params, part, teacher)), None, micro)
        outputs = merge_micro_batches(stacked, mesh)
        # 2. The objective of the global batch; its gradient with respect to the cached outputs and the
        # parameters the terms read directly (the other parameters' entries are zero).
        (loss, metrics), (output_grads, direct_grads) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            outputs, params, batch, step
        )

        # 3. Re-encode each micro-batch and pull its slice of the output gradient back to the parameters.
        def pull_back(grads, part_and_cotangent):
            part, cotangent = part_and_cotangent
            _, vjp = jax.vjp(lambda p: encode(p, part, teacher), params)
            (part_grads,) = vjp(cotangent)
            return jax.tree.map(jnp.add, grads, part_grads), None

        grads, _ = jax.lax.scan(pull_back, direct_grads, (micro, split_micro_batches(output_grads, micro_batches, mesh)))
        return (loss, metrics), grads

    return accumulated


def micro_batch_cost_fn(loss_config: Any, model_config: Any, gathered: Callable[[Any], Any] = lambda tree: tree) -> Callable:
    """`cost(params, micro_batch, teacher)`: what the accumulated step does per micro-batch (one forward, then a
    forward + backward under vjp), for counting FLOPs (XLA's cost analysis counts a scan body once)."""
    config = objective_lib.validate_loss_config(loss_config)

    def encode(params, batch, teacher):
        return objective_lib.compute_outputs(model_config, gathered(params), batch, config, teacher_params=gathered(teacher))

    def cost(params, batch, teacher):
        outputs = encode(params, batch, teacher)
        _, vjp = jax.vjp(lambda p: encode(p, batch, teacher), params)
        return vjp(outputs)

    return cost


__all__ = ["GradientFn", "make_gradient_fn", "merge_micro_batches", "micro_batch_cost_fn", "split_micro_batches"]
