"""Device mesh from a dict of axis sizes, the batch/replicated shardings, and the losses' axis context.

Minimal version (issue 4): enough for the sharded loss tests and the chunked contrastive loss. Axis
types are given explicitly as `Auto` because GSPMD propagation (not explicit sharding-in-types) is what
the training step relies on; `jax.make_mesh` defaults to `Explicit` in newer JAX.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DEFAULT_AXES: dict[str, int] = {"data": -1, "fsdp": 1, "tensor": 1}
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


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
