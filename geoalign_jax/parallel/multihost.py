"""Multi-process plumbing: starting jax.distributed, per-host batches -> global arrays, barriers, gathers.

One training program runs per host (TPU VM, GPU node) or per GPU. Each process reads its own slice of the data
(``data/pipeline.py`` slices by ``jax.process_index()`` / ``jax.process_count()``) and this module turns those
per-host numpy batches into global ``jax.Array``s on the mesh, whose leading axis is the GLOBAL batch.

Starting the distributed runtime (``initialize_distributed``), in order of precedence:

1. explicit arguments (``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids``);
2. environment variables, for GPU hosts and any launcher that can export them:

   * ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordinator service (jax reads it too);
   * ``JAX_NUM_PROCESSES``: number of processes in the job (int >= 1);
   * ``JAX_PROCESS_ID``: this process's id, 0 .. JAX_NUM_PROCESSES - 1;
   * ``JAX_LOCAL_DEVICE_IDS``: optional, comma-separated local device ids this process may use (e.g. one GPU per
     process; jax reads it too);
   * ``GEOALIGN_DISTRIBUTED``: ``auto`` (default), ``require`` or ``off`` (see below);

3. cluster auto-detection by ``jax.distributed.initialize()`` with no arguments (Cloud TPU VMs / pods, GKE,
   Slurm, Open MPI), used when jax recognises the environment.

With nothing configured and no cluster recognised, the call is a no-op: a single-process run (a laptop CPU, one
GPU, a single-host TPU VM) needs no distributed runtime. ``GEOALIGN_DISTRIBUTED=require`` (recommended in pod
launch scripts) turns "nothing found" into an error instead, so a misconfigured pod cannot silently train as N
independent single-host jobs; ``GEOALIGN_DISTRIBUTED=off`` skips initialisation entirely.

Why the call must happen in ``main()`` and never at import time (grain#802): grain's ``mp_prefetch`` workers are
*spawned* processes that re-import the main module; an import-time ``jax.distributed.initialize`` would run again
in every worker and either register a duplicate process id with the coordinator or hang waiting for it.
``initialize_distributed`` therefore refuses to run in any ``multiprocessing`` child process.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS_ENV = "JAX_LOCAL_DEVICE_IDS"
MODE_ENV = "GEOALIGN_DISTRIBUTED"
MODES = ("auto", "require", "off")

_barrier_counter = itertools.count()


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """What ``jax.distributed.initialize`` is called with; ``None`` fields are left to jax's cluster detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_complete(self) -> bool:
        """All three required values are known (no cluster detection needed)."""
        return None not in (self.coordinator_address, self.num_processes, self.process_id)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _parse_device_ids(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts:
            return None
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(f"{where}={value!r} is not a comma-separated list of integers") from None
    if isinstance(value, int):
        return (value,)
    return tuple(int(device_id) for device_id in value)


def resolve_distributed_config(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> DistributedConfig:
    """Merge explicit arguments (first) with the ``JAX_*`` environment variables; validate what is given.

    Pure apart from reading ``environ`` (default ``os.environ``), so the precedence rules are testable without
    starting anything. Fields that neither source gives stay ``None``.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator_address or environ.get(COORDINATOR_ENV, "").strip() or None
    count = num_processes if num_processes is not None else _env_int(environ, NUM_PROCESSES_ENV)
    index = process_id if process_id is not None else _env_int(environ, PROCESS_ID_ENV)
    if local_device_ids is not None:
        device_ids = _parse_device_ids(local_device_ids, "local_device_ids")
    else:
        device_ids = _parse_device_ids(environ.get(LOCAL_DEVICE_IDS_ENV), LOCAL_DEVICE_IDS_ENV)
    if count is not None and count < 1:
        raise ValueError(f"num_processes ({NUM_PROCESSES_ENV}) must be >= 1, got {count}")
    if index is not None and index < 0:
        raise ValueError(f"process_id ({PROCESS_ID_ENV}) must be >= 0, got {index}")
    if count is not None and index is not None and index >= count:
        raise ValueError(
            f"process_id ({PROCESS_ID_ENV}) {index} is out of range for num_processes ({NUM_PROCESSES_ENV}) {count}"
        )
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"coordinator_address ({COORDINATOR_ENV}) must be 'host:port', got {coordinator!r}")
    return DistributedConfig(coordinator, count, index, device_ids)


def detected_cluster() -> str | None:
    """The name of the cluster environment jax's auto-detection recognises (TPU pod, Slurm, ...), or None.

    Uses jax's own detectors (private ``jax._src.clusters``, the same code ``jax.distributed.initialize()``
    runs), so "detected here" means "initialize() with no arguments would work". If that private API moves, this
    returns None with a warning: set the JAX_* variables or GEOALIGN_DISTRIBUTED=require on pods.
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - depends on the jax version
        logger.warning("jax._src.clusters is unavailable; cluster auto-detection is off")
        return None
    for cluster in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present():
                return cluster.__name__
        except Exception as error:  # noqa: BLE001 - a broken detector must not hide the others
            logger.warning("cluster detector %s failed: %s", cluster.__name__, error)
    return None


def in_child_process() -> bool:
    """True in a process started by ``multiprocessing`` (grain's ``mp_prefetch`` workers are spawned).

    Two phases: while a spawned child re-imports the parent's main module (where an import-time init would run)
    ``parent_process()`` is still None, but ``current_process()._inheriting`` is set (the flag spawn itself
    checks); once the child runs its target, ``parent_process()`` is set.
    """
    return multiprocessing.parent_process() is not None or bool(
        getattr(multiprocessing.current_process(), "_inheriting", False)
    )


def _check_matches_running(config: DistributedConfig) -> None:
    """An already-initialised runtime must be the one being asked for (idempotence without hiding a mix-up)."""
    if config.num_processes is not None and config.num_processes != jax.process_count():
        raise RuntimeError(
            f"jax.distributed is already initialised with {jax.process_count()} processes, "
            f"but num_processes={config.num_processes} was asked for"
        )
    if config.process_id is not None and config.process_id != jax.process_index():
        raise RuntimeError(
            f"jax.distributed is already initialised as process {jax.process_index()}, "
            f"but process_id={config.process_id} was asked for"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    mode: str | None = None,
    initialization_timeout_s: int = 300,
) -> None:
    """Start the jax distributed runtime once per process (call it first thing in ``main()``).

    See the module docstring for where the configuration comes from. Effects:

    * explicit/env configuration complete -> ``jax.distributed.initialize(...)`` with it;
    * partly configured, or nothing configured but a cluster recognised -> ``jax.distributed.initialize`` with
      what is known, the rest auto-detected; partly configured and nothing recognised -> ``ValueError`` naming
      the missing values;
    * nothing configured, no cluster -> no-op (single process), unless ``mode`` (default: env
      ``GEOALIGN_DISTRIBUTED``, else "auto") is "require"; "off" never initialises;
    * already initialised -> no-op (idempotent), after checking the requested process id / count agree;
    * inside a ``multiprocessing`` child (a grain worker) -> ``RuntimeError``.

    Must run before anything touches a jax backend (``jax.devices()``, any computation): jax refuses later.
    """
    if in_child_process():
        raise RuntimeError(
            "initialize_distributed() was called in a multiprocessing child process (e.g. a grain mp_prefetch "
            "worker, which re-imports the main module). Call it inside main() / under "
            "`if __name__ == '__main__':`, never at import time: a worker must not join the distributed job "
            "(grain#802)."
        )
    mode = (mode or os.environ.get(MODE_ENV, "").strip() or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} / mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        logger.info("jax.distributed not initialised (%s=off)", MODE_ENV)
        return
    config = resolve_distributed_config(coordinator_address, num_processes, process_id, local_device_ids)
    if jax.distributed.is_initialized():
        _check_matches_running(config)
        return
    cluster = None if config.is_complete else detected_cluster()
    nothing_given = (config.coordinator_address, config.num_processes, config.process_id) == (None, None, None)
    if nothing_given and cluster is None:
        if mode == "require":
            raise RuntimeError(
                f"{MODE_ENV}=require, but no distributed configuration was found: set {COORDINATOR_ENV}, "
                f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} (or pass them), or run where jax recognises the "
                "cluster (Cloud TPU, Slurm, Open MPI, GKE)"
            )
        if config.local_device_ids is not None:
            logger.warning("local_device_ids %s ignored: they apply only to a distributed run", config.local_device_ids)
        logger.info("single-process run: no distributed configuration and no cluster detected")
        return
    if not config.is_complete and cluster is None:
        missing = [
            f"{argument} ({env})"
            for argument, env, value in (
                ("coordinator_address", COORDINATOR_ENV, config.coordinator_address),
                ("num_processes", NUM_PROCESSES_ENV, config.num_processes),
                ("process_id", PROCESS_ID_ENV, config.process_id),
            )
            if value is None
        ]
        raise ValueError(
            f"incomplete distributed configuration: missing {', '.join(missing)}, and no cluster environment "
            "was detected to fill them in"
        )
    logger.info(
        "initialising jax.distributed: coordinator=%s num_processes=%s process_id=%s local_device_ids=%s cluster=%s",
        config.coordinator_address, config.num_processes, config.process_id, config.local_device_ids, cluster,
    )
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids is not None else None,
        initialization_timeout=int(initialization_timeout_s),
    )
    logger.info(
        "jax.distributed ready: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


# ----------------------------------------------------------------------------------------------------------
# Host batches -> global arrays


def _leading_axis_names(spec: PartitionSpec) -> tuple[str, ...]:
    if len(spec) == 0 or spec[0] is None:
        return ()
    return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def batch_shards_by_process(sharding: NamedSharding) -> dict[int, tuple[int, ...]]:
    """For a batch sharding, the leading-axis shard numbers each process holds (sorted), by process index.

    Shard ``k`` of ``n`` is rows ``[k * B / n, (k + 1) * B / n)`` of the global batch. Pure function of the
    mesh: every process computes the same answer, so the layout checks below agree everywhere.
    """
    mesh: Mesh = sharding.mesh
    axes = _leading_axis_names(sharding.spec)
    sizes = [mesh.shape[name] for name in axes]
    positions = [mesh.axis_names.index(name) for name in axes]
    shards: dict[int, set[int]] = {}
    for coordinate, device in np.ndenumerate(mesh.devices):
        shard = 0
        for position, size in zip(positions, sizes):
            shard = shard * size + coordinate[position]
        shards.setdefault(device.process_index, set()).add(shard)
    return {process: tuple(sorted(held)) for process, held in sorted(shards.items())}


def check_batch_sharding(sharding: NamedSharding) -> tuple[int, int]:
    """(shards held by this process, shards in all) for a batch sharding; refuses layouts that need replicas.

    Why: ``host_batch_to_global`` assumes every process contributes its own, disjoint rows (the pipeline slices
    the data by process). If two processes held the same rows (the batch axes do not span processes), their
    different data would silently make an inconsistent array.
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"expected a jax.sharding.NamedSharding for the batch, got {type(sharding).__name__}")
    if any(entry is not None for entry in tuple(sharding.spec)[1:]):
        raise ValueError(
            f"batch sharding {sharding.spec} splits a non-leading axis; only the batch (leading) axis may be split"
        )
    by_process = batch_shards_by_process(sharding)
    total = math.prod(sharding.mesh.shape[name] for name in _leading_axis_names(sharding.spec))
    held = [shard for shards in by_process.values() for shard in shards]
    if len(held) != len(set(held)) or len(held) != total or len({len(s) for s in by_process.values()}) != 1:
        raise ValueError(
            f"batch sharding {sharding.spec} over mesh {dict(sharding.mesh.shape)} does not give each of the "
            f"{len(by_process)} processes its own equal set of batch rows (shards by process: {by_process}); "
            "the batch axes must span all processes"
        )
    return len(by_process.get(jax.process_index(), ())), total


def host_batch_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's batch (dict of numpy arrays, leading axis = local batch) -> global ``jax.Array``s.

    The global leading axis is ``local batch x process_count`` (every process must call this with the same keys
    and shapes, in the same step). With a mesh built from ``jax.devices()`` (processes in order) the global
    batch is the processes' batches concatenated in process order. Host-side scalars such as the pipeline's
    ``decode_errors`` are refused: remove them first with ``pipeline.pop_host_metrics``.
    """
    local_shards, total_shards = check_batch_sharding(sharding)
    global_batch: dict[str, jax.Array] = {}
    for key, value in batch.items():
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(
                f"batch[{key!r}] is a host-side scalar, not a per-example array; remove host metrics "
                "(pipeline.pop_host_metrics) before host_batch_to_global"
            )
        if array.dtype.kind not in "biuf":
            raise ValueError(f"batch[{key!r}] has dtype {array.dtype}; only bool/int/float arrays go on devices")
        rows = array.shape[0]
        if rows == 0 or rows % local_shards:
            raise ValueError(
                f"batch[{key!r}] has {rows} rows on process {jax.process_index()}, which does not divide over "
                f"its {local_shards} local devices of the batch axes {_leading_axis_names(sharding.spec)}; use a "
                f"per-host batch that is a multiple of {local_shards}"
            )
        global_shape = (rows // local_shards * total_shards, *array.shape[1:])
        global_batch[key] = jax.make_array_from_process_local_data(sharding, array, global_shape)
    return global_batch


def host_tree_to_replicated(tree: Any, mesh: Mesh) -> Any:
    """A pytree of host values that is IDENTICAL on every process -> arrays replicated on every mesh device.

    For small state built on the host (e.g. parameters loaded from a file on every host); large state should be
    created sharded inside ``jax.jit(..., out_shardings=...)`` instead.
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def to_global(value: Any) -> jax.Array:
        array = np.asarray(value)
        return jax.make_array_from_process_local_data(sharding, array, array.shape)

    return jax.tree.map(to_global, tree)


# ----------------------------------------------------------------------------------------------------------
# Cross-process helpers


def gather_to_host(tree: Any) -> Any:
    """Global arrays (possibly spread over processes) -> full numpy values on every process.

    ``process_allgather(tiled=True)``: a collective, so every process must call it with the same tree.
    """
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_host_values(tree: Any) -> Any:
    """Per-host numpy values of equal shapes -> stacked ``[process_count, ...]`` on every process (a collective)."""
    return multihost_utils.process_allgather(tree, tiled=False)


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable `value` on every process (a collective)."""
    if jax.process_count() == 1:
        return value
    first = jax.process_index() == 0
    data = json.dumps(value).encode() if first else b""
    length = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buffer = np.frombuffer(data, np.uint8) if first else np.zeros(length, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def agree_on_failure(message: str, *, failed_to: str = "could not start") -> str:
    """Every process learns whether any process failed (a collective; `message` is "" where none did) and
    gets the message to raise with: a failed process its own, the others process 0's, or one naming the
    processes that failed ("process(es) [1] {failed_to} (see their logs)"); "" on every process when none
    failed."""
    if jax.process_count() > 1:
        failed = np.asarray(gather_host_values(np.int32(bool(message)))).ravel()
        first = broadcast_json(message)
        if not message and failed.any():
            message = first or f"process(es) {np.flatnonzero(failed).tolist()} {failed_to} (see their logs)"
    return message


def _coordination_client() -> Any:
    """jax's coordination-service client (private ``jax._src.distributed``, also used by jax's own
    serialization and orbax for barriers with deadlines), or None when unavailable."""
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:  # pragma: no cover - depends on the jax version
        return None
    return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def sync_barrier(name: str, timeout_s: float = 300.0) -> None:
    """Wait until every process reaches the barrier ``name``; raise after ``timeout_s`` instead of hanging.

    Uses the coordination service's barrier, which has a deadline (``sync_global_devices`` has none, a known
    source of silent hangs). Barrier ids get a per-process call counter so the same name can be reused; all
    processes must therefore pass the same sequence of barriers. A no-op in a single-process run.
    """
    if jax.process_count() == 1:
        return
    barrier_id = f"geoalign:{name}:{next(_barrier_counter)}"
    client = _coordination_client()
    if client is None or not hasattr(client, "wait_at_barrier"):
        logger.warning("no coordination-service client; barrier %r falls back to sync_global_devices (no timeout)", name)
        multihost_utils.sync_global_devices(barrier_id)
        return
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as error:  # jaxlib raises JaxRuntimeError (DEADLINE_EXCEEDED) when a process is missing
        raise TimeoutError(
            f"barrier {name!r} (process {jax.process_index()} of {jax.process_count()}) not reached by every "
            f"process within {timeout_s:g} s: {error}"
        ) from error


__all__: Sequence[str] = (
    "COORDINATOR_ENV",
    "LOCAL_DEVICE_IDS_ENV",
    "MODE_ENV",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
    "DistributedConfig",
    "batch_shards_by_process",
    "check_batch_sharding",
    "detected_cluster",
    "gather_host_values",
    "gather_to_host",
    "host_batch_to_global",
    "host_tree_to_replicated",
    "in_child_process",
    "initialize_distributed",
    "resolve_distributed_config",
    "sync_barrier",
)
