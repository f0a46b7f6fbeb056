"""The training step: one pure function `(state, global batch) -> (state, metrics)`, and its ahead-of-time
compilation as a single `jax.jit` with explicit shardings and the state donated.

Per step: forward + backward of the configured objective on the global batch (with `micro_batches` > 1
encoded a micro-batch at a time, train/grad_cache.py), global gradient norm, AdamW update, the temperature clamped to [0, ln 100] (open_clip's rule),
the EMA teacher moved. A step whose loss or gradient norm is not finite leaves parameters, optimizer state
and teacher as they were and is counted (the step number still advances, so the data stream stays aligned
on every host; the optimizer's own count, hence its schedule, does not).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geoalign_jax.losses.consistency import ema_update
from geoalign_jax.losses.contrastive import clamp_logit_scale
from geoalign_jax.models import clip
from geoalign_jax.parallel import mesh as mesh_lib
from geoalign_jax.train import ema as ema_lib
from geoalign_jax.train import grad_cache
from geoalign_jax.train import optim as optim_lib
from geoalign_jax.train.grad_cache import split_micro_batches
from geoalign_jax.train.state import TrainState, with_shardings

logger = logging.getLogger(__name__)
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs besides arrays (static)."""

    model_config: clip.CLIPConfig
    loss_config: dict[str, Any]
    micro_batches: int = 1
    ema_momentum: float | None = None  # set when the teacher is an EMA of the parameters
    ema_decay: float = 0.0  # train.ema_decay: the evaluation/export EMA (train/ema.py); 0 = none


def trainable_norm(grads: Any, frozen: Any) -> jax.Array:
    """Global L2 norm of the gradients of the trainable parameters."""
    kept = [g for g, is_frozen in zip(jax.tree.leaves(grads), jax.tree.leaves(frozen)) if not is_frozen]
    return optax.tree.norm(kept)


def make_train_step(
    step_config: StepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    frozen: Any,
    mesh: Mesh | None,
    compute_shardings: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step function (not yet jitted). `frozen`: a bool tree like the parameters (optim.frozen_mask).

    `compute_shardings` (a NamedSharding per parameter, or None): the layout the forward and backward passes
    use, e.g. the stored sharding gathered over "fsdp". Without it GSPMD may follow the stored FSDP split into
    the activations (embed-sharded activations, recomputed work) instead of gathering the weights.
    """
    count = step_config.micro_batches

    def gathered(tree: Any) -> Any:
        if compute_shardings is None or tree is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, compute_shardings)

    grad_fn = grad_cache.make_gradient_fn(
        step_config.loss_config, step_config.model_config, count, mesh=mesh, gathered=gathered
    )

    def gradients(state: TrainState, batch: Batch) -> tuple[jax.Array, Metrics, Any]:
        (loss, metrics), grads = grad_fn(state.params, batch, state.step, state.teacher)
        return loss, metrics, grads

    def update(operands: tuple[Any, ...]) -> tuple[Any, ...]:
        grads, params, opt_state, teacher, ema = operands
        applied = optim_lib.schedule_count(opt_state)  # updates applied before this one
        updates, opt_state = tx.update(grads, opt_state, params)
        params = clamp_logit_scale(optax.apply_updates(params, updates))
        if teacher is not None and step_config.ema_momentum is not None:
            teacher = ema_update(teacher, params, step_config.ema_momentum)
        if ema is not None:
            ema = ema_lib.update_ema(ema, params, step_config.ema_decay, applied)
        return params, opt_state, teacher, ema

    def keep(operands: tuple[Any, ...]) -> tuple[Any, ...]:
        _, params, opt_state, teacher, ema = operands
        return params, opt_state, teacher, ema

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, metrics, grads = gradients(state, batch)
        grad_norm = trainable_norm(grads, frozen)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A branch rather than a select between old and new after the update: the select is one more pass
        # over parameters and both Adam moments, and makes XLA copy the moments (ViT-B/32: optimizer 0.37 ->
        # 0.26 s, whole step -3%; tools/bench_step.py).
        params, opt_state, teacher, ema = jax.lax.cond(
            finite, update, keep, (grads, state.params, state.opt_state, state.teacher, state.ema)
        )
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            teacher=teacher,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            ema=ema,
        )
        metrics = dict(metrics)
        metrics.update(
            grad_norm=grad_norm,
            # The rate this update used: the schedule at the optimizer's count (behind state.step by the
            # skipped steps).
            learning_rate=jnp.asarray(schedule(optim_lib.schedule_count(state.opt_state)), jnp.float32),
            nonfinite=(~finite).astype(jnp.int32),
            nonfinite_streak=streak,
            nonfinite_total=new_state.nonfinite_total,
        )
        return new_state, metrics

    # What compile_step needs to count the FLOPs of all micro-batches (XLA counts a scan body once).
    train_step.micro_batches = count
    micro_cost = grad_cache.micro_batch_cost_fn(step_config.loss_config, step_config.model_config, gathered)
    train_step.micro_gradients = lambda state, micro_batch: micro_cost(state.params, micro_batch, state.teacher)
    return train_step


def global_batch_spec(host_spec: Mapping[str, tuple[tuple[int, ...], np.dtype]], global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Per-host batch spec (pipeline.batch_spec, host metrics removed) -> global ShapeDtypeStructs."""
    return {
        key: jax.ShapeDtypeStruct((global_batch, *shape[1:]), dtype)
        for key, (shape, dtype) in host_spec.items()
        if len(shape) > 0
    }


@dataclasses.dataclass
class CompiledStep:
    """The compiled step plus what was learnt compiling it."""

    run: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    # Per device and step, from XLA's cost analysis (None when unavailable), every micro-batch counted; with
    # remat the backward pass's recomputation is included (hardware FLOPs, not model FLOPs).
    flops: float | None
    memory: dict[str, int]  # XLA's memory analysis, bytes per device
    compile_seconds: float


def _cost_flops(stage: Any) -> float | None:
    """FLOPs from a Compiled (per device, optimised) or Lowered (whole program, unoptimised) stage."""
    try:
        cost = stage.cost_analysis()
    except Exception as error:  # noqa: BLE001 - not every backend implements it
        logger.info("cost analysis unavailable: %s", error)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _memory(compiled: Any) -> dict[str, int]:
    try:
        analysis = compiled.memory_analysis()
    except Exception as error:  # noqa: BLE001
        logger.info("memory analysis unavailable: %s", error)
        return {}
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {field: int(getattr(analysis, field)) for field in fields if hasattr(analysis, field)}


def compile_step(
    train_step: Callable,
    abstract_state: TrainState,
    state_shardings: TrainState,
    batch_spec: Mapping[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
) -> CompiledStep:
    """`jax.jit` with explicit in/out shardings (state donated; batch split over (data, fsdp); metrics
    replicated), lowered and compiled ahead of time for exactly these shapes."""
    batch_sharding = mesh_lib.batch_sharding(mesh)
    batch_shardings = {key: batch_sharding for key in batch_spec}
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    lowered = jitted.lower(with_shardings(abstract_state, state_shardings), with_shardings(dict(batch_spec), batch_shardings))
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    flops = _cost_flops(compiled)
    count = getattr(train_step, "micro_batches", 1)
    if flops is not None and count > 1:
        flops = _count_every_micro_batch(flops, lowered, train_step, abstract_state, state_shardings, batch_spec, mesh)
    return CompiledStep(run=compiled, flops=flops, memory=_memory(compiled), compile_seconds=seconds)


def _count_every_micro_batch(
    flops: float, lowered: Any, train_step: Callable, abstract_state: TrainState, state_shardings: TrainState,
    batch_spec: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh,
) -> float | None:
    """XLA's cost analysis counts the bodies of the micro-batch scans once. The unoptimised cost of one
    micro-batch's forward and its forward + backward (lowered, not compiled) says how much the other count - 1
    add; the
    compiled per-device count is scaled by that ratio."""
    count = train_step.micro_batches
    batch_sharding = mesh_lib.batch_sharding(mesh)
    micro_spec = {key: jax.ShapeDtypeStruct((spec.shape[0] // count, *spec.shape[1:]), spec.dtype, sharding=batch_sharding)
                  for key, spec in batch_spec.items()}
    micro = jax.jit(train_step.micro_gradients).lower(with_shardings(abstract_state, state_shardings), micro_spec)
    whole, one = _cost_flops(lowered), _cost_flops(micro)
    if not whole or one is None:
        return None
    return flops * (whole + (count - 1) * one) / whole


__all__ = ["CompiledStep", "StepConfig", "compile_step", "global_batch_spec", "make_train_step", "split_micro_batches"]
