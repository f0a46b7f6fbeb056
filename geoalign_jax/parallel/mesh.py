"""Device mesh from a dict of axis sizes, the logical-axis rules that place parameters on it, the
batch/replicated shardings, and the losses' axis context.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallelism with parameters
and optimizer state sharded, ZeRO-3 / FSDP style) and `tensor` (Megatron-style tensor parallelism over
attention heads and MLP hidden units). The batch is split over (data, fsdp). Axis types are given
explicitly as `Auto` because GSPMD propagation (not explicit sharding-in-types) is what the training step
relies on; `jax.make_mesh` defaults to `Explicit` in newer JAX.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DEFAULT_AXES: dict[str, int] = {"data": -1, "fsdp": 1, "tensor": 1}
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

#: The one table mapping the models' logical parameter axes (see models/layers.py) to mesh axes.
#: A logical axis absent here, or mapped to None, is replicated. `embed` (the residual width, present in
#: nearly every matrix) carries the FSDP split; heads and MLP hidden units carry the tensor split, so that
#: q/k/v and c_fc are column-parallel and out/c_proj row-parallel (one all-reduce per block half).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("joint_embed", None),
    ("position", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
)


def resolve_axis_sizes(axis_sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Replaces the one allowed -1 by whatever makes the product equal `device_count`.

    Why: configs say "data: -1" so the same config runs on 1 CPU, 8 GPUs or a pod.
    """
    sizes = dict(axis_sizes)
    if not sizes:
        raise ValueError("mesh axis sizes are empty; give at least one axis, e.g. {'data': -1}")
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are positive ints or -1")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh axes {free} are all -1; at most one axis may be inferred")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"mesh axes {sizes} cannot use {device_count} devices: the fixed axes multiply to {fixed}"
            )
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(f"mesh axes {sizes} multiply to {fixed}, but there are {device_count} devices")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with `Auto` axis types, e.g. `make_mesh({"data": -1, "fsdp": 1, "tensor": 1})`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(DEFAULT_AXES if axis_sizes is None else axis_sizes, len(devices))
    # jax.make_mesh orders devices by the physical topology (TPU torus, GPU NVLink islands, hosts),
    # so the inner axes stay on fast links.
    return jax.make_mesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes), devices=devices
    )


def present_batch_axes(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The batch axes that exist in `mesh` (a mesh without "fsdp" still shards the batch over "data")."""
    return tuple(name for name in batch_axes if name in mesh.axis_names)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(present_batch_axes(mesh, batch_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device."""
    return NamedSharding(mesh, PartitionSpec())


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec of one parameter with logical axis names `logical` and shape `shape` on `mesh`.

    A dimension stays replicated when its rule names no mesh axis, that axis is absent from the mesh or
    has size 1, the axis is already used by another dimension of this parameter, or the dimension does not
    divide evenly by the axis size (jit refuses uneven shardings of arguments; a tiny model's 2 heads on a
    tensor axis of 4, say, are then replicated rather than refused).
    """
    table = dict(rules)
    logical = tuple(logical or ())
    if len(logical) not in (0, len(shape)):
        raise ValueError(f"logical axes {logical} do not match a parameter of shape {tuple(shape)}")
    spec: list[str | None] = []
    used: set[str] = set()
    for name, size in zip(logical, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or mesh.shape[axis] == 1 or axis in used or size % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(
    logical_axes: Any, shapes: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> Any:
    """A tree of `NamedSharding`s for a parameter tree, from its logical axes (`clip.param_logical_axes`)
    and its shapes (arrays or `jax.ShapeDtypeStruct`s with the same structure)."""
    return jax.tree.map(
        lambda names, leaf: NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, mesh, rules)),
        logical_axes,
        shapes,
        is_leaf=lambda node: isinstance(node, PartitionSpec) or node is None,
    )


def drop_mesh_axis(shardings: Any, axis: str) -> Any:
    """The same shardings with mesh axis `axis` removed from every PartitionSpec (that dimension replicated).

    FSDP: parameters live split over "fsdp" but each step computes with them gathered over it (the
    transpose of that all-gather makes the gradients reduce-scattered back), while "tensor" stays split.
    """

    def drop(sharding: NamedSharding) -> NamedSharding:
        def keep(entry: Any) -> Any:
            if entry == axis:
                return None
            if isinstance(entry, tuple):
                rest = tuple(name for name in entry if name != axis)
                return rest if len(rest) > 1 else (rest[0] if rest else None)
            return entry

        return NamedSharding(sharding.mesh, PartitionSpec(*(keep(entry) for entry in sharding.spec)))

    return jax.tree.map(drop, shardings)


@dataclasses.dataclass(frozen=True)
class AxisContext:
    """What a loss needs to know about the mesh: which axes split the batch.

    `None` in place of an AxisContext means a single device (no collectives). The plain losses never
    need it (GSPMD partitions a global `a @ b.T`); the chunked ones use it for `jax.shard_map`.
    """

    mesh: Mesh
    batch_axes: tuple[str, ...] = BATCH_AXES

    @property
    def axes(self) -> tuple[str, ...]:
        """The batch axes present in the mesh."""
        return present_batch_axes(self.mesh, self.batch_axes)

    @property
    def batch_shards(self) -> int:
        """How many pieces the batch is split into (product of the batch axes' sizes)."""
        return math.prod(self.mesh.shape[name] for name in self.axes)


def axis_context(mesh: Mesh | None, batch_axes: Sequence[str] = BATCH_AXES) -> AxisContext | None:
    """An AxisContext for `mesh`, or None when there is no mesh."""
    return None if mesh is None else AxisContext(mesh, tuple(batch_axes))
