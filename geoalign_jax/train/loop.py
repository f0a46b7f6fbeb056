"""The training run: build the mesh, state and compiled step, restore or initialise, loop, log, evaluate,
checkpoint, and stop cleanly on preemption. `run(config, workdir)` is what the CLI (`__main__.py`) calls.

WORKDIR holds `config.json` (the resolved config), `metrics.jsonl`, `tb/`, `checkpoints/` and, with
`eval.tasks`, `eval/step_<N>/results.json`. Running again in a WORKDIR with checkpoints resumes from the latest
one: parameters, optimizer state, teacher, counters and each process's data-iterator position, so the
continued run is the one that was interrupted.

Before the first compile a fresh run reads its initial weights (`config.init`), every process opens its
training shards, and process 0 checks the evaluation tasks' images against the training shards (overlap,
logged) and logs the fraction of training texts longer than their context (`data/truncated/<kind>`, from
`data.text_stats.pipeline_truncation_metrics`) as the step-0 record of metrics.jsonl / TensorBoard. Any
of these inputs that cannot be used is an `InputError` on every process (the CLI: one line, exit status 2).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from geoalign_jax import params_checkpoint
from geoalign_jax.data import pipeline
from geoalign_jax.losses import objective as objective_lib
from geoalign_jax.models import clip
from geoalign_jax.parallel import mesh as mesh_lib
from geoalign_jax.parallel import multihost
from geoalign_jax.train import checkpoint as checkpoint_lib
from geoalign_jax.train import config as config_lib
from geoalign_jax.train import metrics as metrics_lib
from geoalign_jax.train import optim as optim_lib
from geoalign_jax.train import state as state_lib
from geoalign_jax.train import step as step_lib
from geoalign_jax.train import workdir_lock

if TYPE_CHECKING:
    from geoalign_jax.eval import TrainImages

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
EVAL_DIR, RESULTS_FILE = "eval", "results.json"  # WORKDIR/eval/step_<N>/results.json


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class InputError(ValueError):
    """A file the run starts from cannot be used: the initial weights (`config.init`), the training shards,
    or the evaluation tasks' data. Raised on every process, before the first compile; the message names the
    file (the CLI prints it as one line, exit status 2)."""


@dataclasses.dataclass
class RunResult:
    """How a run ended: "finished" (reached train.num_steps) or "preempted" (saved on SIGTERM)."""

    status: str
    step: int
    resumed_from: int | None
    state: state_lib.TrainState
    last_metrics: dict[str, float]


@dataclasses.dataclass
class Setup:
    """Everything built before the first step (also what tools and tests inspect)."""

    config: ml_collections.ConfigDict
    loss_config: dict[str, Any]
    model_config: clip.CLIPConfig
    mesh: jax.sharding.Mesh
    abstract_state: state_lib.TrainState
    shardings: state_lib.TrainState
    batch_spec: dict[str, jax.ShapeDtypeStruct]
    train_step: Callable
    tx: Any
    schedule: Any


def _check_batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    shards = mesh_lib.AxisContext(mesh).batch_shards
    micro = int(config.data.batch_size) // int(config.train.micro_batches)
    if micro % shards:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} / train.micro_batches {config.train.micro_batches} = {micro} "
            f"examples per micro-batch do not split over the {shards} batch shards of mesh {dict(mesh.shape)} "
            "(data x fsdp); use a multiple"
        )


def build(config: ml_collections.ConfigDict, *, devices: list[jax.Device] | None = None) -> Setup:
    """Validates the config (errors name the field) and builds the mesh, optimizer, abstract state and its
    shardings, and the step function; allocates nothing."""
    from configs import common  # the experiment-config schema (repository root, like the config files)

    loss_config = common.check_config(config)
    model_config = common.model_config(config)
    mesh = mesh_lib.make_mesh(
        {axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")}, devices=devices
    )
    _check_batch_layout(config, mesh)
    host_spec = pipeline.batch_spec(config.data, jax.process_count())
    host_spec.pop(pipeline.DECODE_ERRORS_KEY, None)
    objective_lib.check_batch(loss_config, host_spec)  # names the term and the missing key
    abstract_params = params_checkpoint.abstract_params(model_config)
    num_steps = int(config.train.num_steps)
    tx = optim_lib.make_optimizer(config.optim, abstract_params, num_steps)
    schedule = optim_lib.learning_rate_schedule(config.optim, num_steps)
    with_teacher = state_lib.needs_teacher(loss_config)
    abstract_state = jax.eval_shape(functools.partial(state_lib.create_state, tx=tx, with_teacher=with_teacher), abstract_params)
    shardings = state_lib.state_shardings(abstract_state, model_config, mesh)
    ema = loss_config["distill_ema_momentum"] if with_teacher and loss_config["distill_teacher"] == "ema" else None
    step_config = step_lib.StepConfig(model_config, loss_config, int(config.train.micro_batches), ema)
    frozen = optim_lib.frozen_mask(abstract_params, config.optim)
    compute_shardings = mesh_lib.drop_mesh_axis(shardings.params, "fsdp")
    train_step = step_lib.make_train_step(step_config, tx, schedule, frozen, mesh, compute_shardings)
    batch_spec = step_lib.global_batch_spec(host_spec, int(config.data.batch_size))
    return Setup(config, loss_config, model_config, mesh, abstract_state, shardings, batch_spec, train_step, tx, schedule)


def initial_state(setup: Setup) -> state_lib.TrainState:
    """A step-0 state on the mesh: parameters from `config.init` (or random), optimizer state, teacher."""
    return state_from_params(setup, state_lib.load_initial_params(setup.config.init, setup.model_config))


def state_from_params(setup: Setup, host_params: state_lib.Params | None) -> state_lib.TrainState:
    """A step-0 state on the mesh around host parameters (None: random, from train.seed)."""
    params_shardings = setup.shardings.params
    if host_params is None:
        init = jax.jit(
            lambda key: clip.init_params(setup.model_config, key), out_shardings=params_shardings
        )
        params = init(jax.random.key(int(setup.config.train.seed)))
    else:
        params = state_lib.put_params(host_params, params_shardings)
    create = functools.partial(
        state_lib.create_state, tx=setup.tx, with_teacher=setup.abstract_state.teacher is not None
    )
    return jax.jit(create, out_shardings=setup.shardings)(params)


#: data fields that decide which examples the restored iterator position points at (worker_count: the
#: position is saved per worker): a resumed run may not change them.
DATA_ORDER_FIELDS = ("train_shards", "train_split", "batch_size", "seed", "shuffle", "num_epochs", "worker_count")


def _flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {key: value for name, item in tree.items() for key, value in _flat_fields(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def _compare_resumed_config(path: pathlib.Path, config: dict[str, Any]) -> None:
    """A resumed run logs how its config differs from the one in `path`, and refuses changes to the data
    order (DATA_ORDER_FIELDS): the restored iterator position would point into another stream. Every
    process reads and raises alike."""
    if not path.is_file():
        return
    before, after = _flat_fields(json.loads(path.read_text())), _flat_fields(json.loads(json.dumps(config)))
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    if not changed:
        return
    shown = "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed)
    order = [key for key in changed if key in {f"data.{field}" for field in DATA_ORDER_FIELDS}]
    if order:
        raise ValueError(
            f"{', '.join(order)} changed since the checkpoints in {path.parent} were written ({shown}); the "
            f"restored data position would point into another stream: keep them, or use another --workdir"
        )
    logger.warning("resuming with a changed config (%s will hold the new one): %s", path, shown)


def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, resuming: bool) -> None:
    plain = config_lib.as_plain_dict(config)
    if resuming:
        _compare_resumed_config(workdir / CONFIG_FILE, plain)
        multihost.sync_barrier("config:compared")  # every process has read the old file before it is replaced
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(json.dumps(plain, indent=2, sort_keys=True))


def _broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable `value` on every process (a collective)."""
    if jax.process_count() == 1:
        return value
    first = jax.process_index() == 0
    data = json.dumps(value).encode() if first else b""
    length = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buffer = np.frombuffer(data, np.uint8) if first else np.zeros(length, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def _raise_unless_all_started(message: str) -> None:
    """Every process learns whether any process failed to start (a collective): then each raises InputError,
    a failed one with its own message, the others with process 0's (or naming the processes that failed)."""
    if jax.process_count() > 1:
        failed = np.asarray(multihost.gather_host_values(np.int32(bool(message)))).ravel()
        first = _broadcast_json(message)
        if not message and failed.any():
            message = first or f"process(es) {np.flatnonzero(failed).tolist()} could not start (see their logs)"
    if message:
        raise InputError(message)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _train_images(config: ml_collections.ConfigDict) -> TrainImages:
    """The training shards' image fingerprints (read once; every evaluation checks its tasks against them),
    after logging how many and which evaluation images also occur in them."""
    from geoalign_jax.data import sources
    from geoalign_jax.eval import TrainImages, check_overlap

    data = config.data
    paths = sources.shard_paths(data.train_shards, data.train_split)
    train_images = TrainImages.from_shards(paths, locations=[os.path.abspath(data.train_shards)],
                                           split=data.train_split)
    exclude = bool(config.eval.exclude_overlap)
    for prefix, result in check_overlap(list(config.eval.tasks), train_images).items():
        if not result.matches:
            logger.info("eval overlap: %s: none of its %d images occurs in the training shards", prefix, result.checked)
            continue
        if exclude and len(result.matches) == result.checked:
            raise InputError(f"eval.exclude_overlap: every one of the {result.checked} images of eval task {prefix} "
                             f"is also in the training shards {data.train_shards}; nothing would be left to evaluate")
        shown = "; ".join(f"{m['eval']} = {m['train']} ({m['match']})" for m in result.matches[:5])
        more = f"; and {len(result.matches) - 5} more" if len(result.matches) > 5 else ""
        logger.warning(
            "eval overlap: %s: %d of its %d images also occur in the training shards (%d exact, %d re-encoded), "
            "%s every evaluation (eval.exclude_overlap = %s; each results.json lists them): %s%s", prefix,
            len(result.matches), result.checked, result.exact, result.near_duplicates,
            "left out of" if exclude else "INCLUDED in", exclude, shown, more,
        )
    return train_images


def _truncation(config: ml_collections.ConfigDict) -> dict[str, float]:
    """`data/truncated/<kind>` fractions of the training texts; a statistic, so a failure is logged, not fatal."""
    from geoalign_jax.data import text_stats

    try:
        return text_stats.pipeline_truncation_metrics(config.data)
    except (ValueError, OSError, RuntimeError) as error:
        logger.warning("truncation statistics of %s not computed: %s", config.data.train_shards, _one_line(error))
        return {}


@dataclasses.dataclass
class _Inputs:
    """What a run reads before its first compile (train_images and truncation: process 0 only)."""

    iterator: Any
    host_params: state_lib.Params | None
    train_images: TrainImages | None
    truncation: dict[str, float]


def _open_inputs(setup: Setup, *, fresh: bool) -> _Inputs:
    """Reads the initial weights (fresh runs), opens the training iterator and, on process 0, prepares the
    evaluation (overlap with the training shards) and the truncation statistics (fresh runs). A failure on
    any process is an InputError on every process (see `_raise_unless_all_started`)."""
    config = setup.config
    inputs = _Inputs(None, None, None, {})
    message = ""
    try:
        if fresh:
            inputs.host_params = state_lib.load_initial_params(config.init, setup.model_config)
        inputs.iterator = pipeline.make_train_iterator(config.data)
        if jax.process_index() == 0:
            if config.eval.tasks:
                inputs.train_images = _train_images(config)
            if fresh:
                inputs.truncation = _truncation(config)
    except (ValueError, OSError) as error:  # InitError, SourceError, TaskError, OverlapError, InputError
        logger.debug("input error", exc_info=True)
        message = _one_line(error)
    try:
        _raise_unless_all_started(message)
    except InputError:
        if inputs.iterator is not None:
            inputs.iterator.close()
        raise
    return inputs


def _evaluate(setup: Setup, state: state_lib.TrainState, step: int, workdir: pathlib.Path,
              train_images: TrainImages | None) -> dict[str, float]:
    """Runs config.eval.tasks with the current parameters; process 0 writes WORKDIR/eval/step_<step>/results.json
    and every process gets the metrics.

    Every process takes part in gathering the parameters into one host copy; process 0 alone then evaluates
    that copy on its local devices. The parameter hash in results.json is computed from the host copy, so it
    needs no other process (`eval.provenance.parameter_hash` gathers only arrays that are not fully
    addressable, which a host copy never is) and equals the hash of the sharded parameters."""
    config = setup.config
    host_params = multihost.gather_to_host(state.params)  # a collective: every process takes part
    results: dict[str, float] = {}
    if jax.process_index() == 0:
        from geoalign_jax.eval import evaluate

        run_info = {
            "weights": f"{workdir} step {step}", "trainer": {"workdir": str(workdir), "step": step,
                                                            "config": str(workdir / CONFIG_FILE)},
            "tasks": list(config.eval.tasks), "batch_size": int(config.eval.batch_size),
            "model_config": setup.model_config.to_dict(), "allow_train_split": bool(config.eval.allow_train_split),
            "train_data": [os.path.abspath(config.data.train_shards)], "train_split": str(config.data.train_split),
            "exclude_overlap": bool(config.eval.exclude_overlap),
        }
        results = evaluate(
            setup.model_config, host_params, list(config.eval.tasks), batch_size=int(config.eval.batch_size),
            progress=False, allow_train_split=bool(config.eval.allow_train_split), train_data=train_images,
            exclude_overlap=bool(config.eval.exclude_overlap), run_info=run_info,
            results_path=workdir / EVAL_DIR / f"step_{step}" / RESULTS_FILE,
        )
    return _broadcast_json(results)


def _after_queued_steps(state: state_lib.TrainState) -> float:
    """Waits for the steps already dispatched (training time), then returns the time: what follows (an
    evaluation, a checkpoint save) is timed apart from the steps."""
    jax.block_until_ready(state)
    return time.perf_counter()


def _check_best_metric(best_metric: str, results: dict[str, float]) -> None:
    """The metric that ranks checkpoints must be one the evaluation produced (orbax would fail later with a
    bare KeyError). Results are the same on every process, so every process raises."""
    if best_metric and best_metric not in results:
        raise ValueError(f"checkpoint.best_metric = {best_metric!r} is not among the evaluation's metrics: "
                         f"{', '.join(sorted(results))}")


def _log_compile(writer: metrics_lib.MetricsWriter, setup: Setup, compiled: step_lib.CompiledStep) -> dict[str, Any]:
    abstract = state_lib.with_shardings(setup.abstract_state, setup.shardings)
    params_bytes = state_lib.per_device_bytes(abstract.params)
    opt_bytes = state_lib.per_device_bytes(abstract.opt_state)
    teacher_bytes = state_lib.per_device_bytes(abstract.teacher) if abstract.teacher is not None else 0
    info = {
        "compile_seconds": round(compiled.compile_seconds, 2),
        "flops_per_device": compiled.flops,
        "memory": compiled.memory,
        "per_device_bytes": {"params": params_bytes, "opt_state": opt_bytes, "teacher": teacher_bytes},
        "parameters": state_lib.count_params(setup.abstract_state.params),
        "mesh": dict(setup.mesh.shape),
    }
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    memory = ", ".join(f"{key.replace('_size_in_bytes', '')} {mib(value)}" for key, value in compiled.memory.items())
    writer.console(
        f"compiled the train step in {compiled.compile_seconds:.1f}s on mesh {dict(setup.mesh.shape)} "
        f"({jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} processes); "
        f"{info['parameters']:,} parameters; per device: params {mib(params_bytes)}, optimizer state "
        f"{mib(opt_bytes)}, teacher {mib(teacher_bytes)}; XLA memory analysis: {memory or 'n/a'}; "
        f"cost analysis: {compiled.flops / 1e9 if compiled.flops else float('nan'):.3f} GFLOP per device and step"
    )
    writer.console(metrics_lib.mfu_note(jax.devices()[0], compiled.flops))
    for line in state_lib.describe_shardings(setup.shardings.params, setup.abstract_state.params):
        logger.info("sharding %s", line)
    return info


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    setup: Setup | None = None,
) -> RunResult:
    """Trains `config` in `workdir` until `train.num_steps` (resuming from its latest checkpoint), or until a
    preemption notice, after which every process has saved the same step. `on_step(step)` is called after
    each step is dispatched (tests use it to deliver a signal at a known step). `setup`: `build(config)`
    when the caller has it already (the CLI validates the config with it first)."""
    workdir = pathlib.Path(workdir).absolute()
    setup = setup if setup is not None else build(config)
    num_steps = int(config.train.num_steps)
    log_every = int(config.train.log_every)
    ckpt_config = config.checkpoint
    # Every resource is released however the run ends (a failed compile, an input error, an interrupt):
    # the SIGTERM handler uninstalled, files closed, pending checkpoint writes finished (LIFO).
    with contextlib.ExitStack() as resources:
        lock = workdir_lock.acquire_for_run(workdir)  # before orbax touches checkpoints/ (it removes tmp folders)
        resources.callback(lambda: lock and lock.release())
        checkpointer = checkpoint_lib.Checkpointer(
            workdir, keep=int(ckpt_config.keep), async_save=bool(ckpt_config.async_save),
            best_metric=str(ckpt_config.best_metric), best_mode=str(ckpt_config.best_mode),
            keep_best=int(ckpt_config.keep_best),
        )
        resources.callback(checkpointer.close)
        resources.callback(checkpointer.wait)
        checkpointer.write_model_config(setup.model_config)
        resumed_from = checkpointer.latest_step()
        _write_config(workdir, config, resuming=resumed_from is not None)
        inputs = _open_inputs(setup, fresh=resumed_from is None)
        iterator = inputs.iterator
        resources.callback(iterator.close)
        if resumed_from is not None:
            target = state_lib.with_shardings(setup.abstract_state, setup.shardings)
            resumed_from, state = checkpointer.restore_newest_intact(target, iterator)  # damaged steps set aside
            logger.info("resumed from step %d of %s", resumed_from, checkpointer.directory)
        else:
            state = state_from_params(setup, inputs.host_params)
        step = int(jax.device_get(state.step))
        if step >= num_steps:
            logger.info("%s already reached step %d (train.num_steps %d): nothing to do", workdir, step, num_steps)
            return RunResult("finished", step, resumed_from, state, {})
        writer = metrics_lib.MetricsWriter(workdir, total_steps=num_steps, initial_step=step, progress=progress)
        resources.callback(writer.close)
        if inputs.truncation:  # once per run: a resumed run finds it in the log already
            writer.write(0, inputs.truncation)
        preemption = checkpoint_lib.Preemption()
        resources.callback(preemption.close)
        batch_sharding = mesh_lib.batch_sharding(setup.mesh)
        compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
        _log_compile(writer, setup, compiled)
        if resumed_from is not None:
            writer.console(f"resumed from step {resumed_from}")
        eval_every = int(config.eval.every_steps)
        max_nonfinite = int(config.train.max_consecutive_nonfinite)
        saved_step = resumed_from
        status = "finished"
        last_logged: dict[str, float] = {}
        timer = metrics_lib.StepTimer()
        steps_since_log = 0
        # The longest run of non-finite steps since the last check, kept on the device: the host reads it only
        # at log and save steps, so it never waits for the step just queued (a streak that reaches the limit
        # and then recovers still stops the run; the state is not changed by non-finite steps meanwhile).
        no_streak = jax.device_put(np.int32(0), mesh_lib.replicated(setup.mesh))
        longest_streak = no_streak
        track_streak = jax.jit(jax.numpy.maximum)

        def check_streak(at_step: int) -> None:
            nonlocal longest_streak
            if int(jax.device_get(longest_streak)) >= max_nonfinite:
                raise NonFiniteError(
                    f"{max_nonfinite} non-finite steps in a row (train.max_consecutive_nonfinite) by step "
                    f"{at_step}: the loss or the gradient norm is not finite; the last good checkpoint (step "
                    f"{saved_step}) is kept unchanged in {checkpointer.directory}"
                )
            longest_streak = no_streak

        while step < num_steps:
            batch = next(iterator)
            host_metrics = pipeline.pop_host_metrics(batch)
            state, step_metrics = compiled.run(state, multihost.host_batch_to_global(batch, batch_sharding))
            longest_streak = track_streak(longest_streak, step_metrics["nonfinite_streak"])
            step += 1
            steps_since_log += 1
            writer.advance()
            if on_step is not None:
                on_step(step)
            metrics_for_save = None
            if eval_every and (step % eval_every == 0 or step == num_steps):
                started = _after_queued_steps(state)
                results = _evaluate(setup, state, step, workdir, inputs.train_images)
                _check_best_metric(str(ckpt_config.best_metric), results)
                eval_seconds = time.perf_counter() - started
                timer.exclude(eval_seconds)
                writer.write(step, {**{f"eval/{key}": value for key, value in results.items()},
                                    "eval_seconds": eval_seconds})
                metrics_for_save = results
            if step % log_every == 0 or step == num_steps:
                values = {key: value for key, value in jax.device_get(step_metrics).items()}
                errors = multihost.gather_host_values(np.int64(host_metrics.get(pipeline.DECODE_ERRORS_KEY, 0)))
                values["decode_errors"] = int(np.sum(errors))
                values.update(metrics_lib.throughput(
                    seconds=timer.lap(), steps=steps_since_log, global_batch=int(config.data.batch_size),
                    flops_per_device=compiled.flops, device=jax.devices()[0],
                ))
                steps_since_log = 0
                writer.write(step, values)
                last_logged = {key: float(value) for key, value in values.items()}
                check_streak(step)
            preempted = preemption.reached(step)
            if preempted or step % int(ckpt_config.every_steps) == 0 or step == num_steps or metrics_for_save:
                check_streak(step)  # never save a state past the limit
                started = _after_queued_steps(state)
                saved_step = checkpointer.save(state, iterator, step=step, metrics=metrics_for_save)
                timer.exclude(time.perf_counter() - started)
            if preempted:
                writer.console(f"preemption notice: saved step {step} on every process; exiting")
                status = "preempted"
                break
    return RunResult(status, step, resumed_from, state, last_logged)


__all__ = ["InputError", "NonFiniteError", "RunResult", "Setup", "build", "initial_state", "run", "state_from_params"]
