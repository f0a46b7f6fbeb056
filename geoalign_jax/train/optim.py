"""The optimizer from `config.optim` (see train/config.py): AdamW with warm-up + cosine decay, a weight-decay
mask, global-norm clipping, per-parameter learning-rate multipliers (per tower, layer-wise decay) and frozen
sub-trees. Parameters are addressed by their path string, e.g. "visual/transformer/resblocks_3/mlp/c_fc/kernel".
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from geoalign_jax.params_checkpoint import flatten_params

Params = Any
TRAIN, FROZEN = "train", "frozen"
_BLOCK = re.compile(r"/transformer/resblocks_(\d+)/")
# Parameters before the first block of each tower (layer 0 in layer-wise decay).
_TOWER_INPUTS = {
    "visual": ("visual/conv1/", "visual/class_embedding", "visual/positional_embedding", "visual/ln_pre/"),
    "text": ("text/token_embedding/", "text/positional_embedding"),
}


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """open_clip's `cosine_lr` (open_clip_train/scheduler.py; FarSLIP's and Long-CLIP's train/scheduler.py are
    the same code) as a function of the update count k (from 0): `peak * (k + 1) / warmup_steps` while
    k < warmup_steps, then `end + (peak - end) * (1 + cos(pi * (k - warmup_steps) / (num_steps -
    warmup_steps))) / 2` with end = `peak * end_learning_rate_factor` (open_clip: end 0). So the first update
    already moves (peak / warmup_steps) and the first one after the warm-up uses the peak."""
    peak = float(optim.learning_rate)
    end = peak * float(optim.end_learning_rate_factor)
    warmup = int(optim.warmup_steps)
    decay_steps = max(int(num_steps) - warmup, 1)

    def schedule(count: Any) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warming = peak * (count + 1.0) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warming, cosine)

    return schedule


def _path_tree(params: Params) -> Params:
    """The same tree with each leaf replaced by its path string."""
    paths = iter(flatten_params(params))
    return jax.tree.map(lambda _: next(paths), params)


def _matches(path: str, patterns: Any) -> bool:
    return any(re.search(pattern, path) for pattern in patterns)


def decay_mask(params: Params, no_decay: Any) -> Params:
    """True where weight decay applies (the path matches none of the `no_decay` patterns)."""
    return jax.tree.map(lambda path: not _matches(path, no_decay), _path_tree(params))


def frozen_labels(params: Params, frozen: Any) -> Params:
    """"frozen" / "train" per parameter (for `optax.multi_transform`)."""
    return jax.tree.map(lambda path: FROZEN if _matches(path, frozen) else TRAIN, _path_tree(params))


def _num_blocks(paths: list[str], tower: str) -> int:
    blocks = [int(m.group(1)) for p in paths if p.startswith(tower + "/") and (m := _BLOCK.search(p))]
    return max(blocks) + 1 if blocks else 0


def layer_decay_factor(path: str, num_blocks: Mapping[str, int], decay: float) -> float:
    """BEiT-style layer-wise decay: a tower's inputs (embeddings, ln_pre) are layer 0, block i is layer i + 1,
    the rest of the tower (final norm, projection) layer L + 1; the factor is decay ** (L + 1 - layer).
    Parameters outside the towers (logit_scale/bias) get 1."""
    tower = path.split("/", 1)[0]
    if decay == 1.0 or tower not in num_blocks:
        return 1.0
    top = num_blocks[tower] + 1
    match = _BLOCK.search(path)
    if match:
        layer = int(match.group(1)) + 1
    elif path.startswith(_TOWER_INPUTS.get(tower, ())):
        layer = 0
    else:
        layer = top
    return float(decay ** (top - layer))


def lr_multipliers(params: Params, optim: ml_collections.ConfigDict) -> Params:
    """The learning-rate factor of every parameter: the first matching `lr_multipliers` pattern's factor
    (1.0 when none matches) times the layer-wise decay factor."""
    paths = list(flatten_params(params))
    blocks = {tower: _num_blocks(paths, tower) for tower in ("visual", "text")}
    patterns = [(str(pattern), float(value)) for pattern, value in optim.lr_multipliers]

    def factor(path: str) -> float:
        tower_factor = next((float(value) for pattern, value in patterns if re.search(pattern, path)), 1.0)
        return tower_factor * layer_decay_factor(path, blocks, float(optim.layer_decay))

    return jax.tree.map(factor, _path_tree(params))


class ScaleByTreeState(NamedTuple):
    """No state: the factors are constants of the optimizer."""


def scale_by_tree(factors: Params) -> optax.GradientTransformation:
    """Multiplies each update by its (Python float) factor; since AdamW's update is linear in the learning
    rate, this is a per-parameter learning-rate multiplier (weight decay included, as in open_clip's groups)."""

    def init(params: Params) -> ScaleByTreeState:
        del params
        return ScaleByTreeState()

    def scale(update: Any, factor: float) -> Any:
        if isinstance(update, optax.MaskedNode) or factor == 1.0:  # MaskedNode: a frozen leaf (multi_transform)
            return update
        return update * jnp.asarray(factor, update.dtype)

    def update(updates: Params, state: ScaleByTreeState, params: Params | None = None):
        del params
        return jax.tree.map(scale, updates, factors, is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state

    return optax.GradientTransformation(init, update)


def fixed_row_counts(params: Params, fixed_rows: Any) -> Params:
    """Per parameter, how many leading rows `optim.fixed_rows` holds (the first matching pattern; 0 = none).
    A pattern that matches no parameter, or more rows than a parameter has, is a ValueError."""
    pairs = [(str(pattern), int(rows)) for pattern, rows in fixed_rows]
    flat = flatten_params(params)
    for pattern, rows in pairs:
        matched = {path: leaf for path, leaf in flat.items() if re.search(pattern, path)}
        if not matched:
            raise ValueError(f"optim.fixed_rows: {pattern!r} matches no parameter")
        for path, leaf in matched.items():
            if len(leaf.shape) < 1 or leaf.shape[0] < rows:
                raise ValueError(f"optim.fixed_rows: {path} of shape {tuple(leaf.shape)} has fewer than {rows} rows")

    def count(path: str) -> int:
        return next((rows for pattern, rows in pairs if re.search(pattern, path)), 0)

    return jax.tree.map(count, _path_tree(params))


class HoldRowsState(NamedTuple):
    """No state: the row counts are constants of the optimizer."""


def hold_rows(counts: Params) -> optax.GradientTransformation:
    """Zeroes the first `count` rows (axis 0) of each update (`count` a Python int per parameter, 0 = all
    rows pass). Placed before clipping it removes the held rows' gradients (so the global norm and Adam's
    moments see only the trainable rows, as for Long-CLIP's frozen table); placed after AdamW it removes
    their decoupled decay, so the held rows stay bitwise equal to their initial values."""

    def init(params: Params) -> HoldRowsState:
        del params
        return HoldRowsState()

    def hold(update: Any, count: int) -> Any:
        if isinstance(update, optax.MaskedNode) or count == 0:
            return update
        rows = jax.lax.broadcasted_iota(jnp.int32, update.shape, 0)
        return jnp.where(rows < count, jnp.zeros_like(update), update)

    def update(updates: Params, state: HoldRowsState, params: Params | None = None):
        del params
        return jax.tree.map(hold, updates, counts, is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: ml_collections.ConfigDict, params: Params, num_steps: int) -> optax.GradientTransformation:
    """The optimizer for parameters shaped like `params` (arrays or ShapeDtypeStructs: only paths are read).

    Order: hold fixed rows -> clip the global norm of the trainable gradients -> AdamW (decay masked) ->
    per-parameter multipliers -> hold fixed rows again (their decay); frozen parameters get `set_to_zero`
    (no moments, no decay).
    """
    schedule = learning_rate_schedule(optim, num_steps)
    parts = []
    held = fixed_row_counts(params, optim.get("fixed_rows", ()))
    holds_rows = any(count > 0 for count in jax.tree.leaves(held))
    if holds_rows:
        parts.append(hold_rows(held))
    if float(optim.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(
        optax.adamw(
            schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
            weight_decay=float(optim.weight_decay), mask=decay_mask(params, optim.no_decay),
        )
    )
    factors = lr_multipliers(params, optim)
    if any(f != 1.0 for f in jax.tree.leaves(factors)):
        parts.append(scale_by_tree(factors))
    if holds_rows:
        parts.append(hold_rows(held))
    trainable = optax.chain(*parts)
    labels = frozen_labels(params, optim.frozen)
    if all(label == TRAIN for label in jax.tree.leaves(labels)):
        return trainable
    if all(label == FROZEN for label in jax.tree.leaves(labels)):
        raise ValueError(f"optim.frozen = {tuple(optim.frozen)!r} freezes every parameter; nothing would train")
    return optax.multi_transform({TRAIN: trainable, FROZEN: optax.set_to_zero()}, labels)


def schedule_count(opt_state: Any) -> jax.Array:
    """The optimizer's own update count, the one its learning-rate schedule reads (it does not advance on a
    skipped non-finite step, unlike the training step)."""
    count = optax.tree_utils.tree_get(
        opt_state, "count",
        filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == optax.ScaleByScheduleState.__name__,
    )
    if count is None:
        raise ValueError("the optimizer state holds no learning-rate schedule count (optax.ScaleByScheduleState)")
    return count


def frozen_mask(params: Params, optim: ml_collections.ConfigDict) -> Params:
    """True for frozen parameters (their gradients are excluded from the reported gradient norm)."""
    return jax.tree.map(lambda label: label == FROZEN, frozen_labels(params, optim.frozen))


__all__ = [
    "decay_mask",
    "fixed_row_counts",
    "frozen_labels",
    "frozen_mask",
    "hold_rows",
    "layer_decay_factor",
    "learning_rate_schedule",
    "lr_multipliers",
    "make_optimizer",
    "scale_by_tree",
    "schedule_count",
]
