"""The training state (one pytree), its shardings on the mesh, and where a fresh run's parameters come from.

`TrainState` holds everything a step reads and writes: the step number, the parameters, the optimizer
state, the teacher parameters of patch distillation ("frozen" or "ema" teacher; None otherwise, and never
any optimizer state for them), the non-finite-step counters and the evaluation/export EMA of the parameters
(`train.ema_decay` > 0; None otherwise). The data iterator's position is host state
and is checkpointed beside it (train/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geoalign_jax import params_checkpoint
from geoalign_jax.error_text import one_line
from geoalign_jax.models import clip
from geoalign_jax.parallel import mesh as mesh_lib

logger = logging.getLogger(__name__)
Params = Any


@flax.struct.dataclass
class TrainState:
    """step: optimizer steps taken (int32); nonfinite_streak / nonfinite_total: skipped non-finite steps in a
    row / in all (int32); teacher: the distillation teacher's parameters or None; ema: the exponential moving
    average of the parameters for evaluation and export (train.ema_decay, train/ema.py) or None."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    teacher: Params | None
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    ema: Params | None = None


def needs_teacher(loss_config: dict[str, Any]) -> bool:
    """Patch distillation with a "frozen" or "ema" teacher keeps a second copy of the parameters."""
    return loss_config["weights"]["patch_distill"] > 0 and loss_config["distill_teacher"] in ("frozen", "ema")


def create_state(params: Params, tx: optax.GradientTransformation, *, with_teacher: bool, with_ema: bool = False) -> TrainState:
    """A step-0 state around `params` (jit this with the state shardings as out_shardings)."""
    zero = jnp.zeros((), jnp.int32)
    teacher = jax.tree.map(jnp.copy, params) if with_teacher else None
    ema = jax.tree.map(jnp.copy, params) if with_ema else None
    return TrainState(
        step=zero, params=params, opt_state=tx.init(params), teacher=teacher, nonfinite_streak=zero,
        nonfinite_total=zero, ema=ema,
    )


def _trailing_dict_path(path: tuple[Any, ...]) -> str:
    keys = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(str(key.key))
    return "/".join(reversed(keys))


def shardings_like_params(tree: Any, params_shardings: Params, params_shapes: Params, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds parameter-shaped copies (optimizer moments, the teacher): a leaf whose
    trailing dict keys name a parameter of the same shape gets that parameter's sharding; anything else
    (step counts, scalars) is replicated. Works for any optax state, whose containers are tuples/namedtuples
    around dicts of the parameters' structure."""
    by_path = dict(zip(params_checkpoint.flatten_params(params_shapes), jax.tree.leaves(params_shardings)))
    shapes = {path: leaf.shape for path, leaf in params_checkpoint.flatten_params(params_shapes).items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        name = _trailing_dict_path(path)
        if name in by_path and tuple(shapes[name]) == tuple(leaf.shape):
            return by_path[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(abstract_state: TrainState, model_config: clip.CLIPConfig, mesh: Mesh) -> TrainState:
    """The sharding of every leaf of the state: parameters (and their optimizer moments and teacher copy) by
    the logical-axis rules of parallel/mesh.py, counters replicated."""
    params_shardings = mesh_lib.param_shardings(clip.param_logical_axes(model_config), abstract_state.params, mesh)
    return shardings_like_params(abstract_state, params_shardings, abstract_state.params, mesh)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (restore targets, ahead-of-time lowering)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings)


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` held by one device (the largest shard per leaf; leaves are ShapeDtypeStructs with
    shardings or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# ----------------------------------------------------------------------------------------------------------
# Initial parameters


class InitError(ValueError):
    """`config.init` names weights that cannot be used (missing, truncated or damaged file, another
    architecture); the one-line message names init.path and the file."""


def same_architecture(expected: clip.CLIPConfig, found: clip.CLIPConfig) -> bool:
    """Equal but for numerics (dtype, param_dtype, remat): the same parameters, computed another way."""
    numerics = dict(dtype=expected.dtype, param_dtype=expected.param_dtype, remat=expected.remat)
    return dataclasses.replace(found, **numerics) == expected


def _check_architecture(expected: clip.CLIPConfig, found: clip.CLIPConfig, source: str) -> None:
    if not same_architecture(expected, found):
        try:
            params_checkpoint.check_param_shapes(
                params_checkpoint.abstract_params(expected), params_checkpoint.abstract_params(found), source=source
            )
        except ValueError as error:
            raise InitError(str(error)) from None
        raise InitError(f"{source}: its model {found} differs from the config's model {expected}")


def load_initial_params(init: ml_collections.ConfigDict, model_config: clip.CLIPConfig) -> Params | None:
    """Host (numpy) parameters from `config.init`, or None for "scratch" (initialised on the devices).

    open_clip / HF weights are read by `convert.load_pretrained`, the loader every entry point shares. The
    checkpoint's architecture must be the config's (shapes and activation); a 77-position checkpoint is
    Long-CLIP-stretched first when the config's text context is 248. Any failure is an InitError.
    """
    kind, path = init.kind, str(init.path)
    if kind == "scratch":
        return None
    source = f"init.path {path!r} (init.kind {kind!r})"
    try:
        if kind == "params":
            found, params = params_checkpoint.load_params(path)  # a parameters checkpoint, trainer workdir or step
        else:
            from geoalign_jax.convert import load_pretrained

            found, params = load_pretrained(path, kind, quick_gelu=init.quick_gelu)
        if found.text.context_length != model_config.text.context_length and model_config.text.context_length == 248:
            from geoalign_jax.convert import stretch_text_context

            logger.info("Long-CLIP stretch of %s: text context %d -> 248", path, found.text.context_length)
            found, params = stretch_text_context(found, params)
        _check_architecture(model_config, found, source)
    except InitError:
        raise
    except (ValueError, OSError) as error:
        from geoalign_jax.convert import WeightsFileError

        if isinstance(error, WeightsFileError):  # its one line names the file and what is wrong
            source = f"init.path (init.kind {kind!r})"
        raise InitError(f"{source}: {one_line(error, limit=None)}") from error
    dtype = np.dtype(model_config.param_dtype)
    return jax.tree.map(lambda leaf: np.asarray(leaf, dtype), params)


def put_params(params: Params, shardings: Params) -> Params:
    """Host parameters (identical on every process) -> global arrays with `shardings`; each device reads only
    its own slice, so no device ever holds the whole model."""
    return jax.tree.map(
        lambda leaf, sharding: jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index]),
        params, shardings,
    )


def count_params(params: Params) -> int:
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


def describe_shardings(shardings: Params, params: Params, limit: int = 8) -> list[str]:
    """A few "path: spec" lines for the log (the first `limit` distinct specs)."""
    lines, seen = [], set()
    for (path, sharding) in zip(params_checkpoint.flatten_params(params), jax.tree.leaves(shardings)):
        spec = str(sharding.spec)
        key = (re.sub(r"resblocks_\d+", "resblocks_*", path), spec)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{key[0]}: {spec}")
    return lines[:limit]
