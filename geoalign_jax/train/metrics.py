"""What a run reports: a console progress bar (tqdm), WORKDIR/metrics.jsonl (one JSON object per logged step,
with a "step" key) and TensorBoard event files in WORKDIR/tb (tensorboardX). A fresh run's step-0 record holds
the fractions of training texts longer than their context (`data/truncated/<kind>`, see train/loop.py). Only
process 0 writes; the other processes get a writer that does nothing, so the loop calls it unconditionally.
In a gs:// workdir (which has no appends) metrics.jsonl is rewritten whole at most every BUCKET_UPLOAD_S and
at the end, and TensorBoard's event file uploaded every TENSORBOARD_FLUSH_S; a TensorBoard that cannot write
is said in one line and the run goes on (metrics.jsonl holds every value).

MFU = (FLOPs of the compiled step per device, from XLA's cost analysis) / step time / (the device's peak
dense bf16 FLOP/s). Peaks are listed for the accelerators we know; elsewhere (CPUs) MFU is not reported and
the log says why. XLA counts a conditional at its costliest branch, so with the text tower's length buckets
(models/text.py) the count is that of full-length captions: for batches that take a shorter bucket it is an
upper bound (tools/bench_step.py also reports the FLOPs of the bucket a batch takes).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np

from geoalign_jax.data import filesystem
from geoalign_jax.error_text import one_line

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
TENSORBOARD_FLUSH_S = 60  # tensorboardX's own flushes (write() flushes too; in a bucket each one uploads the file)
BUCKET_UPLOAD_S = 60.0  # a gs:// workdir's metrics.jsonl is rewritten at most this often (and at the end)

#: Peak dense bf16 FLOP/s per device by `device_kind` prefix (vendor data sheets; per chip for TPUs).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA GH200", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def peak_flops(device: jax.Device) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None when unknown (CPUs, unlisted accelerators)."""
    kind = str(getattr(device, "device_kind", ""))
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None


def _scalar(value: Any) -> float | int:
    array = np.asarray(value)
    if array.dtype.kind in "iub":
        return int(array)
    return float(array)


class MetricsWriter:
    """Progress bar + metrics.jsonl + TensorBoard on process 0; a no-op elsewhere."""

    def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, initial_step: int, progress: bool = True):
        """`initial_step` > 0 resumes: records of later steps (logged after the checkpoint the run resumes
        from, before a crash) are dropped from metrics.jsonl and TensorBoard, so each step appears once."""
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._tb = None
        self._jsonl = None
        self._tb_files = _BucketEventFiles()
        if not self.enabled:
            return
        workdir = filesystem.path(workdir)  # a folder, or gs://
        workdir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(workdir / METRICS_FILE, initial_step)
        if filesystem.is_gcs(workdir):
            self._jsonl = _ObjectLog(workdir / METRICS_FILE)
        else:
            self._jsonl = (workdir / METRICS_FILE).open("a", encoding="utf-8")
        self._tb = _open_tensorboard(os.fspath(workdir / TENSORBOARD_DIR), initial_step, self._tb_files)
        self._flush_each_write = not filesystem.is_gcs(workdir)  # in a bucket: every TENSORBOARD_FLUSH_S
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One logged step: appended to metrics.jsonl, added to TensorBoard, summarised on the console."""
        if not self.enabled or self._jsonl is None:
            return
        values = {key: _scalar(value) for key, value in metrics.items()}
        # Strict JSON: a non-finite value (a skipped step's loss) is null.
        record = {"step": int(step), **{key: value if math.isfinite(value) else None for key, value in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(key, value, global_step=int(step))
                if self._flush_each_write:
                    self._tb.flush()
            except Exception as error:  # noqa: BLE001 - TensorBoard is a view; metrics.jsonl holds every value
                logger.warning("TensorBoard: stopped writing event files (%s); metrics.jsonl keeps every logged "
                               "value", one_line(error))
                self._tb = None
        self.console(format_line(step, values))

    def console(self, line: str) -> None:
        """A line above the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def abandon(self) -> None:
        """Writes nothing more into the workdir, not even what close() would upload (the run lost its gs://
        workdir to another trainer, whose metrics.jsonl and event files it must not overwrite); the console
        still works."""
        self._tb_files.closed = True  # tensorboardX's flushes and close, even from its threads, upload nothing
        if isinstance(self._jsonl, _ObjectLog):
            self._jsonl.discard()  # (a local file holds every record already: each write flushes it)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as error:  # noqa: BLE001 - as in write()
                logger.warning("TensorBoard: the last event file did not close (%s)", one_line(error))
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _open_tensorboard(logdir: str, initial_step: int, bucket_files: _BucketEventFiles) -> Any:
    """tensorboardX's writer on `logdir` (a folder or gs://), or None, said in one line, when it cannot write
    there: TensorBoard is a view of what metrics.jsonl holds, never a reason to stop a run."""
    try:
        from tensorboardX import SummaryWriter, record_writer

        if filesystem.is_gcs(logdir):
            record_writer.register_writer_factory("gs", bucket_files)
        # In a bucket the whole event file is uploaded at each flush: every TENSORBOARD_FLUSH_S.
        return SummaryWriter(logdir=logdir, purge_step=initial_step + 1 if initial_step else None,
                             flush_secs=TENSORBOARD_FLUSH_S)
    except Exception as error:  # noqa: BLE001 - any failure: no TensorBoard, said once
        logger.warning("TensorBoard: cannot write event files in %s (%s); metrics.jsonl keeps every logged value",
                       logdir, one_line(error))
        return None


class _BucketEventFile:
    """A TensorBoard event file in a bucket, for tensorboardX: each flush uploads the whole file (through
    data/filesystem.py); nothing after close. tensorboardX's own gs:// writer uploads once more when it is
    garbage-collected, which its atexit hook delays to the interpreter's exit: a 120 s hang and a traceback there
    when the bucket no longer answers (a lost network, a test's stopped emulator)."""

    def __init__(self, path: str, files: _BucketEventFiles):
        self._path, self._data, self._closed, self._files = filesystem.path(path), bytearray(), False, files

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        if not self._closed and not self._files.closed:
            self._path.write_bytes(bytes(self._data))

    def close(self) -> None:
        self.flush()
        self._closed = True


class _BucketEventFiles:
    """tensorboardX's writer factory for gs:// (`record_writer.register_writer_factory`) of one MetricsWriter;
    `closed`: its files upload nothing more (`MetricsWriter.abandon`)."""

    def __init__(self) -> None:
        self.closed = False

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path, self)

    def directory_check(self, path: str) -> None:
        del path  # a bucket has no folders to create


class _ObjectLog:
    """metrics.jsonl in a bucket, which has no appends: the whole object is rewritten by the first record
    written `BUCKET_UPLOAD_S` seconds or more after the last upload, and at close (a run killed meanwhile loses
    the records since the last upload, at most BUCKET_UPLOAD_S plus one logging interval of them, from the log;
    they are still in the console output)."""

    def __init__(self, path: Any):
        self._path = path
        self._text = path.read_text(encoding="utf-8") if path.is_file() else ""
        self._uploaded_at = time.monotonic()
        self._pending = False

    def write(self, text: str) -> None:
        self._text += text
        self._pending = True

    def flush(self, *, now: bool = False) -> None:
        if self._pending and (now or time.monotonic() - self._uploaded_at >= BUCKET_UPLOAD_S):
            self._path.write_text(self._text, encoding="utf-8")
            self._uploaded_at, self._pending = time.monotonic(), False

    def close(self) -> None:
        self.flush(now=True)

    def discard(self) -> None:
        """Drops the records not uploaded yet: close() then uploads nothing."""
        self._pending = False


def _drop_records_after(path: Any, step: int) -> None:
    """Keeps the records up to `step`; later ones (logged after the checkpoint a run resumes from) are
    appended to `metrics.jsonl.after_<step>`, set aside rather than lost or interleaved with the rerun. A last
    line that is not JSON was cut by a kill mid-write and is dropped (logged); a damaged line before it is an
    error naming the file and line."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept, later = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: dropped its last line, cut short (%s): %r", path, error, line[:80])
                continue
            raise ValueError(f"{path} line {number} is not JSON ({error}); repair or remove it") from None
        (kept if record.get("step", 0) <= step else later).append(line)
    if later:
        aside = path.parent / f"{path.name}.after_{step}"
        earlier = aside.read_text(encoding="utf-8") if aside.is_file() else ""  # a bucket has no appends
        aside.write_text(earlier + "".join(line + "\n" for line in later), encoding="utf-8")
        logger.warning("%s: %d record(s) of steps after %d moved to %s", path, len(later), step, aside.name)
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


_CONSOLE_KEYS = ("loss", "learning_rate", "grad_norm", "logit_scale", "step_seconds", "examples_per_second", "mfu")


def format_line(step: int, values: Mapping[str, Any]) -> str:
    """A compact console summary: headline numbers, each term's loss, then the counters."""
    parts = [f"step {step}"]
    for key in _CONSOLE_KEYS:
        if key in values:
            parts.append(f"{key} {values[key]:.4g}")
    terms = sorted(key for key in values if key.endswith("/loss"))
    parts += [f"{key} {values[key]:.4g}" for key in terms]
    for key in ("nonfinite_total", "decode_errors"):
        if key in values:
            parts.append(f"{key} {values[key]}")
    parts += [f"{key} {values[key]:.2%}" for key in sorted(values) if key.startswith("data/truncated/")]
    parts += [f"{key} {values[key]:.4g}" for key in sorted(values) if key.startswith("eval/")]
    if "eval_seconds" in values:
        parts.append(f"eval_seconds {values['eval_seconds']:.1f}")
    return "  ".join(parts)


class StepTimer:
    """Training wall time between logged steps (the loop blocks on the metrics there, so the span is real
    work), less the time spent in evaluations and checkpoint saves, which `exclude` reports."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._start = now - self._start - self._excluded, now
        self._excluded = 0.0
        return max(elapsed, 0.0)


def throughput(
    *, seconds: float, steps: int, global_batch: int, flops_per_device: float | None, device: jax.Device
) -> dict[str, float]:
    """step_seconds, examples_per_second and (where the device's peak is known) mfu."""
    step_seconds = seconds / max(steps, 1)
    out = {"step_seconds": step_seconds, "examples_per_second": global_batch / step_seconds if step_seconds else 0.0}
    peak = peak_flops(device)
    if peak is not None and flops_per_device:
        out["mfu"] = flops_per_device / step_seconds / peak
    return out


def mfu_note(device: jax.Device, flops_per_device: float | None) -> str:
    """Says once how MFU is computed here, or why it is not."""
    peak = peak_flops(device)
    if flops_per_device is None:
        return "MFU not reported: XLA gave no FLOP count for the step on this backend"
    if peak is None:
        return (f"MFU not reported: peak FLOP/s of {device.platform} device {getattr(device, 'device_kind', '?')!r} "
                f"is not known (step: {flops_per_device / 1e9:.2f} GFLOP per device)")
    return (f"MFU = {flops_per_device / 1e9:.2f} GFLOP per device and step / step time / {peak / 1e12:.0f} TFLOP/s peak "
            "(FLOPs of full-length captions: an upper bound for batches in a shorter text bucket)")


__all__ = ["METRICS_FILE", "MetricsWriter", "PEAK_FLOPS", "StepTimer", "TENSORBOARD_DIR", "format_line",
           "mfu_note", "peak_flops", "throughput"]
