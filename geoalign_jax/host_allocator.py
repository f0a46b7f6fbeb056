"""The host memory allocator of a training process: tcmalloc when the machine has it.

Why: XLA's CPU runtime allocates a step's temporaries afresh on every call (3.8 GB for ViT-B/32, batch 32).
glibc's malloc hands blocks over 32 MiB out with mmap and returns them with munmap, so every step touches
~2.8 GB of new pages again: 690,000 page faults and 1.4 CPU-seconds of kernel time per step on 2 cores
(measured with getrusage around one step). tcmalloc keeps freed memory in the process (8 faults per step):
the step went from 5.5 to 4.7 s (tools/bench_step.py, README "Training step"). TPU VMs and MaxText preload
tcmalloc for the same reason. Its memory is not returned to the system between steps, which is what we want
in a training process.

The allocator must be chosen before the process starts (the dynamic loader binds malloc), so the CLI entry
points call `use_tcmalloc()` first thing: when tcmalloc is found and not loaded yet, it re-executes the same
command line with it in LD_PRELOAD (`os.execve`: same process id, so launchers, schedulers and signals see
one process). `GEOALIGN_ALLOCATOR` chooses: unset or "tcmalloc" (use it when found), "system" (leave the
process as started), or the path of a tcmalloc shared library.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import sysconfig

ENV_CHOICE = "GEOALIGN_ALLOCATOR"
# Set on the re-executed process: never re-execute twice, even if the preload did not take.
ENV_REEXECUTED = "GEOALIGN_ALLOCATOR_REEXECUTED"
LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_MULTIARCH = sysconfig.get_config_var("MULTIARCH")
# This interpreter's multiarch folder first: a library of another architecture would not load.
LIBRARY_DIRS = ((f"/usr/lib/{_MULTIARCH}",) if _MULTIARCH else ()) + ("/usr/lib64", "/usr/lib", "/usr/local/lib")
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools-libs (RHEL/Fedora)"

_log = logging.getLogger(__name__)


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of the first tcmalloc shared library in `dirs`, or None."""
    for directory in dirs:
        for name in LIBRARY_NAMES:
            path = pathlib.Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def loaded_tcmalloc() -> str | None:
    """Path of the tcmalloc library mapped into this process, None when there is none, "" when it cannot be
    told (no readable /proc/self/maps)."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "tcmalloc" in pathlib.Path(path).name:
            return path
    return None


def use_tcmalloc(argv: list[str] | None = None) -> None:
    """Re-executes this process with tcmalloc preloaded when it is found and not loaded (see the module
    docstring); returns normally when there is nothing to do. `argv`: the command line to re-run (default:
    the interpreter's original one, `sys.orig_argv`). Raises ValueError when GEOALIGN_ALLOCATOR names a
    library that does not exist."""
    choice = os.environ.get(ENV_CHOICE, "tcmalloc").strip()
    if choice.lower() == "system" or not sys.platform.startswith("linux"):
        return  # LD_PRELOAD is the Linux dynamic loader's
    if loaded_tcmalloc() is not None:  # loaded, or cannot be told: leave the process alone
        return
    if os.environ.get(ENV_REEXECUTED):
        _log.warning("tcmalloc was preloaded (%s) but is not mapped; running with the system allocator",
                     os.environ.get("LD_PRELOAD", ""))
        return
    if choice.lower() in ("", "tcmalloc"):
        library = find_tcmalloc()
        if library is None:
            _log.warning(
                "tcmalloc not found in %s: the system allocator maps the step's host temporaries afresh every step "
                "(15-58%% more time per ViT-B/32 CPU step in our runs); install it with %s, or set %s=system to "
                "silence this",
                ", ".join(LIBRARY_DIRS), INSTALL_HINT, ENV_CHOICE,
            )
            return
    else:
        library = choice
        if not pathlib.Path(library).is_file():
            raise ValueError(f"{ENV_CHOICE}={choice!r}: no such file (use 'tcmalloc', 'system' or the path of a "
                             "tcmalloc shared library)")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[ENV_REEXECUTED] = "1"
    # tcmalloc reports every allocation over 1 GiB on stderr by default; a training step makes several.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 50))
    command = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *command[1:]], env)
    except OSError as error:
        _log.warning("could not re-execute with tcmalloc (%s); running with the system allocator", error)
