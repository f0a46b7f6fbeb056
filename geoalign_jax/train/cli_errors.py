"""How the train CLI ends a run that cannot go on: one line, an exit status, a traceback only when asked.

Exit status 2, a refusal: a bad config or command-line argument, an input that cannot be used, a workdir
held by another trainer, a workdir whose checkpoints are of another model or data order, no intact checkpoint
step. Exit status 1, a failure: anything else (a full disk, a non-finite run, a bug); at most a few lines, the
first says what failed. `--debug` or GEOALIGN_DEBUG=1 prints the traceback as well. (Exit status 3, a gs://
workdir lease another trainer took over mid-run, is no exception: the run returns it, `__main__.ended`.)

The library log noise the CLI silences (three harmless messages) is named, and why each is harmless said, in
geoalign_jax/cli_logging.py, which the evaluate and convert CLIs use as well.
"""
from __future__ import annotations

import errno
import os
import pathlib
import re
import sys
import traceback

from geoalign_jax import checkpoint_steps
from geoalign_jax.cli_logging import quiet_library_logs
from geoalign_jax.error_text import DEBUG_ENV, debug_env, one_line
from geoalign_jax.train.workdir_lock import WorkdirBusyError



def debug_wanted(argv: list[str] | None = None) -> bool:
    """--debug on the command line or GEOALIGN_DEBUG set to anything but "", "0", "false"."""
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or debug_env()


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def exit_status(error: BaseException) -> int:
    """2 for a refusal (ValueError, including InputError and NoIntactStepError; WorkdirBusyError), 1 otherwise."""
    if isinstance(error, (ValueError, WorkdirBusyError)) and not _disk_full(error):
        return 2
    return 1


def _disk_full(error: BaseException) -> OSError | None:
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return cause
        if "No space left on device" in str(cause):
            return OSError(errno.ENOSPC, "No space left on device",
                           getattr(cause, "filename", None) or _quoted_path(str(cause)))
    return None


def _quoted_path(message: str) -> str | None:
    """The file a tensorstore / orbax write error names: the last quoted absolute path before "No space left"
    (`... Failed writing: "/w/checkpoints/30.orbax-checkpoint-tmp/.../d/1f2e": Failed to write ...`)."""
    paths = re.findall(r'"((?:/|[a-z][a-z0-9+]*://)[^"]+)"', message.split("No space left on device")[0])
    return paths[-1] if paths else None


def describe(error: BaseException, workdir: str | os.PathLike | None) -> str:
    """The line the CLI prints after "error: "."""
    full = _disk_full(error)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        kept = ""
        if workdir is not None:
            checkpoints = pathlib.Path(workdir) / checkpoint_steps.CHECKPOINTS_DIR
            steps = checkpoint_steps.finished_steps(checkpoints) if checkpoints.is_dir() else []
            kept = (f"; the newest complete checkpoint is step {steps[0]} in {checkpoints} (the same command "
                    "resumes from it once there is space)" if steps else "; no checkpoint step was complete")
        return f"no space left on device{where}{kept}"
    if exit_status(error) == 2:
        return one_line(error, limit=600)
    return f"{type(error).__name__}: {one_line(error, limit=600)}"


def report(error: BaseException, workdir: str | os.PathLike | None, *, debug: bool) -> int:
    """Prints the error (and the traceback under --debug / GEOALIGN_DEBUG) to stderr; returns the exit status."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    status = exit_status(error)
    hint = "" if debug or status == 2 else f" (the traceback: --debug or {DEBUG_ENV}=1)"
    print(f"error: {describe(error, workdir)}{hint}", file=sys.stderr)
    return status


__all__ = ["DEBUG_ENV", "debug_wanted", "describe", "exit_status", "quiet_library_logs", "report"]
