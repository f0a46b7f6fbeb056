"""The training run: build the mesh, state and compiled step, restore or initialise, loop, log, evaluate,
checkpoint, and stop cleanly on preemption. `run(config, workdir)` is what the CLI (`__main__.py`) calls.
The file reads top to bottom as the run's phases (build, inputs, state, compile, loop), and `run`, at the end,
puts them in order. Helpers of other rooms: the schema and the resume comparison are `train/experiment.py`,
collectives `parallel/multihost.py`, the overlap check and the results' provenance `eval/`.

WORKDIR holds `config.json` (the resolved config), `metrics.jsonl`, `tb/`, `checkpoints/` and, with
`eval.tasks`, `eval/step_<N>/results.json`. One trainer at a time holds a WORKDIR (`workdir_lock.py`). Running
again in a WORKDIR with checkpoints resumes from the newest step that reads back whole (damaged steps are set
aside, `checkpoint_steps.py`): parameters, optimizer state, teacher, counters and each process's data-iterator
position, so the continued run is the one that was interrupted.

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
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections
import numpy as np

from geoalign_jax import params_checkpoint
from geoalign_jax.error_text import one_line
from geoalign_jax.data import filesystem, pipeline
from geoalign_jax.losses import objective as objective_lib
from geoalign_jax.models import clip
from geoalign_jax.parallel import mesh as mesh_lib
from geoalign_jax.parallel import multihost
from geoalign_jax.train import checkpoint as checkpoint_lib
from geoalign_jax.train import config as config_lib
from geoalign_jax.train import experiment
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


# ---------------------------------------------------------------------------------------------------------
# How a run ends

class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class InputError(ValueError):
    """A file the run starts from cannot be used: the initial weights (`config.init`), the training shards,
    or the evaluation tasks' data. Raised on every process, before the first compile; the message names the
    file (the CLI prints it as one line, exit status 2)."""


@dataclasses.dataclass
class RunResult:
    """How a run ended: "finished" (reached train.num_steps), "preempted" (saved on SIGTERM) or "lease_lost"
    (another trainer took over the gs:// workdir: stopped at `step` without saving or logging it)."""

    status: str
    step: int
    resumed_from: int | None
    state: state_lib.TrainState
    last_metrics: dict[str, float]


# ---------------------------------------------------------------------------------------------------------
# Phase 1, build: validate the config, then the mesh, optimizer, abstract state and step (allocates nothing)

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
    batch, count, processes = int(config.data.batch_size), int(config.train.micro_batches), jax.process_count()
    if batch % processes == 0 and (batch // processes) % count:
        raise ValueError(
            f"train.micro_batches {count} does not divide the per-process batch {batch // processes} "
            f"(data.batch_size {batch} / {processes} processes)"
        )
    micro = batch // count
    if micro % shards:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} / train.micro_batches {config.train.micro_batches} = {micro} "
            f"examples per micro-batch do not split over the {shards} batch shards of mesh {dict(mesh.shape)} "
            "(data x fsdp); use a multiple"
        )


def build(config: ml_collections.ConfigDict, *, devices: list[jax.Device] | None = None) -> Setup:
    """Validates the config (errors name the field) and builds the mesh, optimizer, abstract state and its
    shardings, and the step function; allocates nothing."""
    loss_config = experiment.check_config(config)
    model_config = experiment.model_config(config)
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
    ema_decay = float(config.train.ema_decay)
    abstract_state = jax.eval_shape(
        functools.partial(state_lib.create_state, tx=tx, with_teacher=with_teacher, with_ema=ema_decay > 0), abstract_params
    )
    shardings = state_lib.state_shardings(abstract_state, model_config, mesh)
    ema = loss_config["distill_ema_momentum"] if with_teacher and loss_config["distill_teacher"] == "ema" else None
    step_config = step_lib.StepConfig(model_config, loss_config, int(config.train.micro_batches), ema, ema_decay)
    frozen = optim_lib.frozen_mask(abstract_params, config.optim)
    compute_shardings = mesh_lib.drop_mesh_axis(shardings.params, "fsdp")
    train_step = step_lib.make_train_step(step_config, tx, schedule, frozen, mesh, compute_shardings)
    batch_spec = step_lib.global_batch_spec(host_spec, int(config.data.batch_size))
    return Setup(config, loss_config, model_config, mesh, abstract_state, shardings, batch_spec, train_step, tx, schedule)


# ---------------------------------------------------------------------------------------------------------
# Phase 2, inputs: config.json, the initial weights, the training iterator, the evaluation's overlap check and
# the truncation statistics; any of them unusable on any process is an InputError on every process

def _write_config(workdir: Any, config: ml_collections.ConfigDict, *, resuming: bool) -> None:
    plain = config_lib.as_plain_dict(config)
    if resuming:
        experiment.compare_resumed_config(workdir / CONFIG_FILE, plain)
        multihost.sync_barrier("config:compared")  # every process has read the old file before it is replaced
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(json.dumps(plain, indent=2, sort_keys=True))


def _truncation(config: ml_collections.ConfigDict) -> dict[str, float]:
    """`data/truncated/<kind>` fractions of the training texts; a statistic, so a failure is logged, not fatal."""
    from geoalign_jax.data import text_stats

    try:
        return text_stats.pipeline_truncation_metrics(config.data)
    except (ValueError, OSError, RuntimeError) as error:
        logger.warning("truncation statistics of %s not computed: %s", config.data.train_shards,
                       one_line(error, limit=None))
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
    evaluation (overlap with the training shards, logged) and the truncation statistics (fresh runs). A
    failure on any process is an InputError on every process (`multihost.agree_on_failure`)."""
    config = setup.config
    inputs = _Inputs(None, None, None, {})
    message = ""
    try:
        if fresh:
            inputs.host_params = state_lib.load_initial_params(config.init, setup.model_config)
        inputs.iterator = pipeline.make_train_iterator(config.data)
        if jax.process_index() == 0:
            if config.eval.tasks:
                from geoalign_jax.eval import runner

                inputs.train_images = runner.training_overlap(
                    config.eval.tasks, config.data.train_shards, config.data.train_split,
                    exclude=bool(config.eval.exclude_overlap))
            if fresh:
                inputs.truncation = _truncation(config)
    except (ValueError, OSError) as error:  # InitError, SourceError, TaskError, OverlapError
        logger.debug("input error", exc_info=True)
        message = one_line(error, limit=None)
    message = multihost.agree_on_failure(message)
    if message:
        if inputs.iterator is not None:
            inputs.iterator.close()
        raise InputError(message)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# Phase 3, state: a fresh state on the mesh (a resumed run restores its checkpoint instead)

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
        state_lib.create_state, tx=setup.tx, with_teacher=setup.abstract_state.teacher is not None,
        with_ema=setup.abstract_state.ema is not None,
    )
    return jax.jit(create, out_shardings=setup.shardings)(params)


# ---------------------------------------------------------------------------------------------------------
# Phase 4, compile: the step for the abstract state, logged with its cost and memory

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


# ---------------------------------------------------------------------------------------------------------
# Phase 5, the loop: step, evaluate, log, checkpoint; stop at train.num_steps, on a preemption notice, or on
# too many non-finite steps in a row

def _evaluate(setup: Setup, state: state_lib.TrainState, step: int, workdir: Any,
              train_images: TrainImages | None) -> dict[str, float]:
    """Runs config.eval.tasks with the current parameters; process 0 writes WORKDIR/eval/step_<step>/results.json
    and every process gets the metrics.

    Every process takes part in gathering the parameters into one host copy; process 0 alone then evaluates
    that copy on its local devices. The parameter hash in results.json is computed from the host copy, so it
    needs no other process (`eval.provenance.parameter_hash` gathers only arrays that are not fully
    addressable, which a host copy never is) and equals the hash of the sharded parameters."""
    config = setup.config
    use_ema = bool(config.eval.use_ema)
    host_params = multihost.gather_to_host(state.ema if use_ema else state.params)  # a collective: all processes
    results: dict[str, float] = {}
    if jax.process_index() == 0:
        from geoalign_jax.eval import evaluate

        from geoalign_jax.eval import provenance

        run_info = provenance.trainer_run_info(workdir, step, workdir / CONFIG_FILE, config.eval, setup.model_config,
                                               config.data.train_shards, config.data.train_split)
        if use_ema:
            run_info["weights"] = f"{run_info['weights']} (EMA, train.ema_decay {config.train.ema_decay})"
        results = evaluate(
            setup.model_config, host_params, list(config.eval.tasks), batch_size=int(config.eval.batch_size),
            progress=False, allow_train_split=bool(config.eval.allow_train_split), train_data=train_images,
            exclude_overlap=bool(config.eval.exclude_overlap), run_info=run_info,
            results_path=workdir / EVAL_DIR / f"step_{step}" / RESULTS_FILE,
        )
    return multihost.broadcast_json(results)


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


def _agreed_checks(host_metrics: dict[str, Any], lock: workdir_lock.FileLock | workdir_lock.Lease | None,
                   ) -> tuple[int, bool]:
    """(this step's decode errors of every process, whether process 0 lost the workdir's lease): one collective
    at the steps that log, evaluate or save, so every process stops at the same step."""
    mine = np.array([host_metrics.get(pipeline.DECODE_ERRORS_KEY, 0), bool(lock and lock.lost())], np.int64)
    every = np.asarray(multihost.gather_host_values(mine)).reshape(-1, 2)
    return int(every[:, 0].sum()), bool(every[:, 1].any())


class _NonFiniteGuard:
    """The longest run of non-finite steps since the last check, kept on the device: the host reads it only at
    log and save steps, so it never waits for the step just queued (a streak that reaches the limit and then
    recovers still stops the run; the state is not changed by non-finite steps meanwhile)."""

    def __init__(self, mesh: jax.sharding.Mesh, limit: int):
        self.limit = limit
        self._none = jax.device_put(np.int32(0), mesh_lib.replicated(mesh))
        self._longest = self._none
        self._maximum = jax.jit(jax.numpy.maximum)

    def track(self, streak: jax.Array) -> None:
        self._longest = self._maximum(self._longest, streak)

    def check(self, at_step: int, saved_step: int | None, directory: Any) -> None:
        if int(jax.device_get(self._longest)) >= self.limit:
            raise NonFiniteError(
                f"{self.limit} non-finite steps in a row (train.max_consecutive_nonfinite) by step "
                f"{at_step}: the loss or the gradient norm is not finite; the last good checkpoint (step "
                f"{saved_step}) is kept unchanged in {directory}"
            )
        self._longest = self._none


def _train(setup: Setup, compiled: step_lib.CompiledStep, state: state_lib.TrainState, step: int, *,
           workdir: Any, inputs: _Inputs, writer: metrics_lib.MetricsWriter,
           checkpointer: checkpoint_lib.Checkpointer, preemption: checkpoint_lib.Preemption,
           saved_step: int | None, on_step: Callable[[int], None] | None,
           lock: workdir_lock.FileLock | workdir_lock.Lease | None,
           ) -> tuple[state_lib.TrainState, int, str, dict[str, float]]:
    """Steps from `step` to train.num_steps (or a preemption notice, or the workdir's lease lost: checked before
    each evaluation, log and save); returns (state, step, status, the last logged metrics)."""
    config = setup.config
    num_steps, log_every = int(config.train.num_steps), int(config.train.log_every)
    ckpt_config = config.checkpoint
    eval_every = int(config.eval.every_steps)
    iterator = inputs.iterator
    batch_sharding = mesh_lib.batch_sharding(setup.mesh)
    guard = _NonFiniteGuard(setup.mesh, int(config.train.max_consecutive_nonfinite))
    status = "finished"
    last_logged: dict[str, float] = {}
    timer = metrics_lib.StepTimer()
    steps_since_log = 0
    while step < num_steps:
        batch = next(iterator)
        host_metrics = pipeline.pop_host_metrics(batch)
        state, step_metrics = compiled.run(state, multihost.host_batch_to_global(batch, batch_sharding))
        guard.track(step_metrics["nonfinite_streak"])
        step += 1
        steps_since_log += 1
        writer.advance()
        if on_step is not None:
            on_step(step)
        metrics_for_save = None
        log_now = step % log_every == 0 or step == num_steps
        eval_now = bool(eval_every) and (step % eval_every == 0 or step == num_steps)
        boundary = log_now or eval_now or step % int(ckpt_config.every_steps) == 0
        decode_errors, lease_lost = _agreed_checks(host_metrics, lock) if boundary else (0, False)
        if eval_now and not lease_lost:
            started = _after_queued_steps(state)
            results = _evaluate(setup, state, step, workdir, inputs.train_images)
            lease_lost = _agreed_checks({}, lock)[1]  # an evaluation may take minutes: again before writing
            if not lease_lost:
                _check_best_metric(str(ckpt_config.best_metric), results)
                eval_seconds = time.perf_counter() - started
                timer.exclude(eval_seconds)
                writer.write(step, {**{f"eval/{key}": value for key, value in results.items()},
                                    "eval_seconds": eval_seconds})
                metrics_for_save = results
        preempted = preemption.reached(step)  # after the evaluation: a notice that came during it saves this step
        if preempted and not boundary:  # a save that no check above covered
            lease_lost = _agreed_checks({}, lock)[1]
        if lease_lost:  # another trainer owns the workdir now: nothing more goes there
            writer.abandon()
            status = "lease_lost"
            break
        if log_now:
            values = {key: value for key, value in jax.device_get(step_metrics).items()}
            values["decode_errors"] = decode_errors
            values.update(metrics_lib.throughput(
                seconds=timer.lap(), steps=steps_since_log, global_batch=int(config.data.batch_size),
                flops_per_device=compiled.flops, device=jax.devices()[0],
            ))
            steps_since_log = 0
            writer.write(step, values)
            last_logged = {key: float(value) for key, value in values.items()}
            guard.check(step, saved_step, checkpointer.directory)
        if preempted or step % int(ckpt_config.every_steps) == 0 or step == num_steps or metrics_for_save:
            guard.check(step, saved_step, checkpointer.directory)  # never save a state past the limit
            started = _after_queued_steps(state)
            saved_step = checkpointer.save(state, iterator, step=step, metrics=metrics_for_save)
            timer.exclude(time.perf_counter() - started)
        if preempted:
            writer.console(f"preemption notice: saved step {step} on every process; exiting")
            status = "preempted"
            break
    return state, step, status, last_logged


# ---------------------------------------------------------------------------------------------------------
# The run: the phases in order

def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    setup: Setup | None = None,
) -> RunResult:
    """Trains `config` in `workdir` until `train.num_steps` (resuming from its latest checkpoint), or until a
    preemption notice, after which every process has saved the same step, or until another trainer took over
    the gs:// workdir's lease (status "lease_lost": every process stops there unsaved). `on_step(step)` is called after
    each step is dispatched (tests use it to deliver a signal at a known step). `setup`: `build(config)`
    when the caller has it already (the CLI validates the config with it first)."""
    workdir = filesystem.path(filesystem.absolute(workdir))  # a folder, or gs:// (data/filesystem.py)
    setup = setup if setup is not None else build(config)  # phase 1
    num_steps = int(config.train.num_steps)
    ckpt_config = config.checkpoint
    # Every resource is released however the run ends (a failed compile, an input error, an interrupt):
    # the SIGTERM handler uninstalled, files closed, pending checkpoint writes finished (LIFO).
    with contextlib.ExitStack() as resources:
        # phase 2: the workdir (one trainer at a time) and the inputs
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
        resources.callback(inputs.iterator.close)
        # phase 3: state
        if resumed_from is not None:
            target = state_lib.with_shardings(setup.abstract_state, setup.shardings)
            resumed_from, state = checkpointer.restore_newest_intact(target, inputs.iterator)  # damaged: set aside
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
        # phase 4: compile
        compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
        _log_compile(writer, setup, compiled)
        if resumed_from is not None:
            writer.console(f"resumed from step {resumed_from}")
        # phase 5: the loop
        state, step, status, last_logged = _train(
            setup, compiled, state, step, workdir=workdir, inputs=inputs, writer=writer, checkpointer=checkpointer,
            preemption=preemption, saved_step=resumed_from, on_step=on_step, lock=lock,
        )
    return RunResult(status, step, resumed_from, state, last_logged)


__all__ = ["InputError", "NonFiniteError", "RunResult", "Setup", "build", "initial_state", "run", "state_from_params"]
