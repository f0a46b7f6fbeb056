"""The train CLI.

    python -m geoalign_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]

e.g. `python -m geoalign_jax.train --config configs/demo.py --workdir runs/demo --config.train.num_steps=200`.
Fields are overridden with `--config.section.field=value` (ml_collections config flags); an unknown or
mistyped field is an error naming it. Running the same command again in a DIR with checkpoints resumes from
the latest one. Multi-host: start one such process per host (see parallel/multihost.py for the environment
variables); every process runs the same command. Exit status: 0 finished, 0 after a preemption save (the
scheduler restarts the job, which resumes), 1 on a training error, 2 on a bad config or an input that cannot be
used (a missing, truncated or damaged `init.path`, training shard or evaluation dataset: one line naming it,
before anything compiles), a workdir another trainer holds, or no intact checkpoint step, 3 when another
trainer took over the gs:// workdir's lease mid-run (this run let it go stale): stopped without saving, one
line (`LEASE_LOST_EXIT`; restarting would only be refused, the workdir is the other trainer's). Errors are one line
(train/cli_errors.py); `--debug` or GEOALIGN_DEBUG=1 adds the traceback. The process re-executes itself once
with tcmalloc preloaded when the machine has it and it is not loaded (geoalign_jax/host_allocator.py;
GEOALIGN_ALLOCATOR=system keeps the system allocator).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from geoalign_jax import host_allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/NAME.py[:ARG])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: config.json, metrics.jsonl, tb/, checkpoints/")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_DEBUG = flags.DEFINE_bool("debug", False, "print the traceback of an error (also: GEOALIGN_DEBUG=1)")
flags.mark_flags_as_required(["config", "workdir"])
LEASE_LOST_EXIT = 3


def ended(status: str, step: int, workdir: str) -> int:
    """The exit status of a run that ended with `status` at `step`; a lost lease is also said on stderr."""
    if status == "lease_lost":
        print(f"error: workdir {workdir}: stopped at step {step} without saving it: another trainer owns the "
              "workdir now (it took over this run's lease, which had gone stale)", file=sys.stderr)
        return LEASE_LOST_EXIT
    logging.info("run %s at step %d", status, step)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    # Before anything touches a jax backend, and never at import time (grain workers re-import modules).
    from geoalign_jax.parallel import multihost
    from geoalign_jax.train import cli_errors

    debug = _DEBUG.value or cli_errors.debug_wanted([])
    cli_errors.quiet_library_logs(keep_tracebacks=debug)
    multihost.initialize_distributed()
    import jax

    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # only process 0 writes logs
    from geoalign_jax.train import loop

    try:
        config = _CONFIG.value  # config_flags loads the file lazily: a missing/broken file raises here
        setup = loop.build(config)  # validate first: a bad config is exit status 2 with the field named
    except (ValueError, OSError) as error:
        if debug:
            raise
        print(f"error: {cli_errors.describe(ValueError(str(error)), None)}", file=sys.stderr)
        return 2
    try:
        result = loop.run(config, _WORKDIR.value, progress=_PROGRESS.value, setup=setup)
    except Exception as error:  # noqa: BLE001 - every failure is a line (and a traceback under --debug)
        return cli_errors.report(error, _WORKDIR.value, debug=debug)
    return ended(result.status, result.step, _WORKDIR.value)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a mistyped `--config.section.field` (ml_collections raises AttributeError or
    KeyError naming it) or a bad value is one line and exit status 2, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        text = str(error).replace("\\n", "\n").replace("\\'", "'")
        lines = [_unquoted(line) for line in text.splitlines() if _unquoted(line)]
        if any(line.startswith("Traceback (most recent call last)") for line in lines):
            # the recipe's get_config(arg) raised: its own message (e.g. the choices of `arg`), not the traceback
            if "--debug" in argv or _debug_env():
                print(text, file=sys.stderr)
            flag = next((line.split(": Error", 1)[0] for line in lines if line.startswith("flag --")), "--config")
            lines = [flag, lines[-1]]
        print(f"error: bad command-line config: {': '.join(lines)}", file=sys.stderr)
        sys.exit(2)


def _unquoted(line: str) -> str:
    """A line of an error's repr without the quotes the repr added: a pair around it, or one left over at an
    end (a quote inside is kept: `got 's9'`, `'12.5'`)."""
    line = line.strip()
    while line:
        if len(line) >= 2 and line[0] in "'\"" and line[-1] == line[0]:
            line = line[1:-1].strip()
        elif line[0] in "'\"" and line.count(line[0]) % 2:
            line = line[1:].strip()
        elif line[-1] in "'\"" and line.count(line[-1]) % 2:
            line = line[:-1].strip()
        else:
            return line
    return line


def _debug_env() -> bool:
    from geoalign_jax.train import cli_errors

    return cli_errors.debug_wanted([])


def entry() -> None:
    """Runs the CLI (see the module docstring)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    # Only as `python -m geoalign_jax.train`: re-executing replaces the whole process, which is this CLI's
    # own here but would be the caller's (a notebook, a test runner) if entry() were called in-process.
    try:
        host_allocator.use_tcmalloc()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    entry()
