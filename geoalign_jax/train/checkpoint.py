"""Training checkpoints (orbax `CheckpointManager`) and preemption.

Layout of WORKDIR/checkpoints (one folder per saved step; orbax writes each atomically):
```
model_config.json     the architecture (params_checkpoint's format), written by process 0 (rewritten by a
                      rerun until the first step is saved)
<step>/params/        the parameters: the same orbax tree as a parameters checkpoint's params/, so a step
                      (or the workdir: its latest step) is read by params_checkpoint.load_params, the convert
                      CLI's export and the evaluate CLI's --checkpoint
<step>/state/         {step, opt_state, teacher (when there is one), nonfinite_streak, nonfinite_total}
<step>/ema/           the EMA of the parameters (train.ema_decay > 0), the same tree as params/ (read by
                      params_checkpoint.load_params(..., ema=True), `convert export --ema`)
<step>/data/          the grain iterator position, one process_<i>-of-<n>.json per process (grain's handler)
<step>/digest.json    size and CRC-32 of every file of the step, written by process 0 after orbax commits it
<step>.damaged/       a step that did not read back, set aside by a resuming run (checkpoint_steps.py)
```
Every process calls `save` / `restore` (orbax writes and reads each process's shards). Restoring reads the
arrays straight into the shardings of the given target, so a checkpoint written on one mesh restores on any
other (8 devices -> 1, 1 -> 8, another fsdp/tensor split).

Preemption: on SIGTERM every process must save at the same step. With several processes, jax's preemption
service (on by default under jax.distributed) catches SIGTERM on any host and agrees on a step;
`Preemption.reached(step)` turns True at that step on every process. A single process catches SIGTERM
itself.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from geoalign_jax import checkpoint_steps, params_checkpoint
from geoalign_jax.data import filesystem
from geoalign_jax.models import clip
from geoalign_jax.parallel import multihost
from geoalign_jax.train import state as state_lib
from geoalign_jax.train.state import TrainState

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = params_checkpoint.TRAINER_CHECKPOINTS_DIR
PARAMS_ITEM, STATE_ITEM, DATA_ITEM = params_checkpoint.PARAMS_DIR, "state", "data"
EMA_ITEM = params_checkpoint.EMA_DIR


def _state_item(state: TrainState) -> dict[str, Any]:
    item = {
        "step": state.step,
        "opt_state": state.opt_state,
        "nonfinite_streak": state.nonfinite_streak,
        "nonfinite_total": state.nonfinite_total,
    }
    if state.teacher is not None:
        item["teacher"] = state.teacher
    return item


def _model_differences(stored: clip.CLIPConfig, wanted: clip.CLIPConfig) -> str:
    """'model.vision.image_size: 64 -> 32; ...': each field that differs, with both values."""
    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict):
            return {key: value for name, item in tree.items() for key, value in flat(item, f"{prefix}.{name}").items()}
        return {prefix: tree}

    before, after = flat(stored.to_dict(), "model"), flat(wanted.to_dict(), "model")
    return "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(before.keys() | after.keys())
                     if before.get(key) != after.get(key))


class Checkpointer:
    """Saves and restores (params, optimizer state, teacher, counters, data iterator) by step."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int,
        async_save: bool = True,
        best_metric: str = "",
        best_mode: str = "max",
        keep_best: int = 1,
    ):
        # a folder, or gs:// (orbax writes there through tensorstore's GCS driver; data/filesystem.py)
        self.directory = filesystem.path(filesystem.join(filesystem.absolute(workdir), CHECKPOINTS_DIR))
        self.best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._async = async_save
        self._undigested: list[int] = []  # steps saved (async: maybe not committed yet) without a digest job
        # Process 0 writes each step's digest.json in this thread once orbax has committed the step: off the
        # training loop's path (README "What a run survives" has its cost).
        self._digester = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-digest")
        self._digests: list[concurrent.futures.Future] = []

    def write_model_config(self, model_config: clip.CLIPConfig) -> None:
        """Writes checkpoints/model_config.json (process 0). Once a step is saved, a resumed run must have the
        same architecture (numerics may change: dtype, param_dtype, remat); before that (a first run that died
        before its first checkpoint) the file describes no checkpoint and is rewritten for the new config.

        Every process reads and compares, so a mismatch raises everywhere rather than leaving the others
        waiting at the barrier; process 0 writes atomically (rename), so a reader never sees half a file."""
        path = self.directory / params_checkpoint.CONFIG_FILE
        has_steps = self.manager.latest_step() is not None
        if has_steps and path.is_file():
            stored = params_checkpoint.read_model_config(self.directory)  # this very file, no step needed
            if not state_lib.same_architecture(model_config, stored):
                raise ValueError(
                    f"{path}: the checkpoints in this workdir are of another model "
                    f"({_model_differences(stored, model_config)}); use another --workdir"
                )
            if stored != model_config:
                logger.info("resuming with other numerics than the checkpoints' (dtype, param_dtype, remat): %s",
                            model_config)
        elif jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            checkpoint_steps.write_atomic(path, params_checkpoint.model_config_json(model_config))
        multihost.sync_barrier("checkpoint:model_config")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, iterator: grain.DatasetIterator, *, step: int | None = None,
             metrics: dict[str, float] | None = None) -> int:
        """Saves `state` and the iterator's position under `step` (the state's step, which the loop knows
        without waiting for the device; read from the state when not given). Async when configured; the
        iterator state is written before this returns, so the caller may advance it."""
        if step is None:
            step = int(jax.device_get(state.step))
        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            STATE_ITEM: ocp.args.StandardSave(_state_item(state)),
            DATA_ITEM: grain.checkpoint.CheckpointSave(iterator),
        }
        if state.ema is not None:
            items[EMA_ITEM] = ocp.args.StandardSave(state.ema)
        args = ocp.args.Composite(**items)
        self.manager.save(step, args=args, metrics=metrics, force=True)  # first waits for the previous save
        self._digest_committed()  # the previous (async) steps are committed now
        self._undigested.append(step)
        if not self._async:
            self._digest_committed()
        return step

    def _digest_committed(self) -> None:
        """Queues the digest of every committed step that has none (process 0)."""
        steps, self._undigested = self._undigested, []
        if jax.process_index() == 0:
            self._digests += [self._digester.submit(self._write_digest, step) for step in steps]

    def _write_digest(self, step: int) -> None:
        try:
            checkpoint_steps.write_digest(self.directory / str(step))
        except OSError as error:  # removed meanwhile by the keep policy, or the disk is full: restorable as before
            logger.warning("no digest.json for checkpoint step %d (%s): it is checked by restoring alone", step,
                           checkpoint_steps.reason(error))

    def restore_newest_intact(self, target: TrainState, iterator: grain.DatasetIterator) -> tuple[int, TrainState]:
        """Restores the newest step that reads back whole (digest and orbax restore, see `restore`); each
        damaged step newer than it is moved aside to `<step>.damaged` by process 0 and reported in one line.
        Every process decides alike (the reasons are agreed by a collective). NoIntactStepError when no
        step reads back."""
        def agree(own: str) -> str:
            return multihost.agree_on_failure(own, failed_to="could not read it")

        def read(step: int) -> TrainState:
            # The digest first, agreed on: no process starts orbax's restore of a step that another one skips.
            mismatch = ""
            if jax.process_index() == 0:
                try:
                    checkpoint_steps.verify_digest(self.directory / str(step))
                except checkpoint_steps.DamagedStepError as error:
                    mismatch = str(error)
            mismatch = agree(mismatch)
            if mismatch:
                raise checkpoint_steps.DamagedStepError(mismatch)
            return self.restore(step, target, iterator)

        def set_aside(step: int, why: str) -> None:
            if jax.process_index() == 0:
                moved = checkpoint_steps.set_aside(self.directory / str(step))
                logger.warning(checkpoint_steps.damaged_line(self.directory, step, why, f"moved to {moved.name}"))
            multihost.sync_barrier("checkpoint:set_aside")
            self.manager.reload()

        steps = self.all_steps()
        for step in steps:
            self._check_process_count(step)  # a refusal about this run, not damage: raised as it is
        found = checkpoint_steps.newest_intact(steps, read, on_damaged=set_aside, agree=agree)
        if found is None:
            raise checkpoint_steps.NoIntactStepError(
                f"{self.directory}: no checkpoint step reads back (moved aside: "
                f"{', '.join(f'{step}{checkpoint_steps.DAMAGED_SUFFIX}' for step in sorted(steps))}); run again to "
                "start from step 0, or move a step folder back"
            )
        return found

    def restore(self, step: int, target: TrainState, iterator: grain.DatasetIterator) -> TrainState:
        """Reads step `step` into `target`'s shapes and shardings (ShapeDtypeStructs with shardings) and moves
        `iterator` to the saved position."""
        self._check_process_count(step)
        state_target = _state_item(target)
        items = {
            PARAMS_ITEM: ocp.args.StandardRestore(target.params),
            STATE_ITEM: ocp.args.StandardRestore(state_target),
            DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator),
        }
        if target.ema is not None:
            if not (self.directory / str(step) / EMA_ITEM).is_dir():
                raise ValueError(
                    f"{self.directory / str(step)} has no {EMA_ITEM}/ (written with train.ema_decay = 0); "
                    "resume with train.ema_decay = 0 or use another --workdir"
                )
            items[EMA_ITEM] = ocp.args.StandardRestore(target.ema)
        args = ocp.args.Composite(**items)
        restored = self.manager.restore(step, args=args)
        item = restored[STATE_ITEM]
        return TrainState(
            step=item["step"],
            params=restored[PARAMS_ITEM],
            opt_state=item["opt_state"],
            teacher=item.get("teacher"),
            nonfinite_streak=item["nonfinite_streak"],
            nonfinite_total=item["nonfinite_total"],
            ema=restored[EMA_ITEM] if target.ema is not None else None,
        )

    def _check_process_count(self, step: int) -> None:
        """The data position is per process: a checkpoint restores only with the process count it was saved with
        (the model state itself restores on any mesh)."""
        data_dir = self.directory / str(step) / DATA_ITEM
        saved = sorted(path.name for path in data_dir.glob("process_*-of-*.json"))
        wanted = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if saved and wanted not in saved:
            raise ValueError(
                f"{data_dir} holds the data-iterator positions of another number of processes ({saved[0]} ...); "
                f"this run has {jax.process_count()} process(es). Resume with the same process count"
            )

    def wait(self) -> None:
        """Blocks until every pending async save is on disk (raises if one failed) and has its digest."""
        self.manager.wait_until_finished()
        self._digest_committed()
        for future in self._digests:
            future.result()
        self._digests = []

    def close(self) -> None:
        # orbax's close() does not wait for the temporary-folder cleanup its constructor starts in a thread: a
        # run that fails before its first save (a bad init.path) would exit under that thread, which then
        # prints a traceback at interpreter shutdown. (Private, hence looked up; a save awaits it as well.)
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()
        self._digester.shutdown(wait=True)


class Preemption:
    """Has a preemption notice (SIGTERM) arrived, and is this the step at which every process saves?"""

    def __init__(self) -> None:
        self._signalled = threading.Event()
        self._distributed = jax.process_count() > 1
        self._service = self._distributed
        self._previous_handler = None
        if not self._distributed:
            self._install_handler()

    def _install_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM is not caught, a preemption will not save")
            return

        def handler(signum: int, frame: Any) -> None:
            del frame
            logger.warning("received signal %d: saving at the next step boundary, then exiting", signum)
            self._signalled.set()

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def reached(self, step: int) -> bool:
        """True at the step where every process should save and stop (call it at every step, on every process)."""
        if not self._distributed:
            return self._signalled.is_set()
        if self._service:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError as error:  # the preemption service is disabled (jax_enable_preemption_service)
                logger.warning("jax preemption service unavailable (%s); SIGTERM is synchronised by a collective", error)
                self._service = False
                self._install_handler()
        flags = multihost.gather_host_values(int(self._signalled.is_set()))
        return bool(max(int(flag) for flag in flags.reshape(-1)))

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


__all__ = ["CHECKPOINTS_DIR", "Checkpointer", "Preemption"]
