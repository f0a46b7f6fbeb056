"""The training CLI's allocator switch (host_allocator): re-executes once with tcmalloc preloaded when the machine
has it, keeps the command line, honours GEOALIGN_ALLOCATOR, and says what to install when tcmalloc is missing."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from geoalign_jax import host_allocator

# A process that goes through use_tcmalloc and reports what it ended up with.
PROBE = """
import json, os, sys
from geoalign_jax import host_allocator
host_allocator.use_tcmalloc()
print(json.dumps({"tcmalloc": host_allocator.loaded_tcmalloc(), "argv": sys.argv[1:], "pid": os.getpid(),
                  "reexecuted": os.environ.get(host_allocator.ENV_REEXECUTED)}))
"""


def _probe(env_extra: dict[str, str]) -> tuple[dict, str, int]:
    """Runs PROBE; the report, stderr and exit status. The process id must survive the re-execution (launchers
    and schedulers signal the pid they started)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.ENV_REEXECUTED)}
    env.update(env_extra)
    process = subprocess.Popen([sys.executable, "-c", PROBE, "--flag", "a b"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=120)
    report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    if report:
        assert report["pid"] == process.pid
    return report, stderr, process.returncode


def _mapped_library(prefix: str) -> pathlib.Path | None:
    """Path of a shared library with this name prefix mapped into this process."""
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        path = pathlib.Path(line.split()[-1]) if len(line.split()) >= 6 else None
        if path is not None and path.name.startswith(prefix) and ".so" in path.name:
            return path
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexecutes_with_a_named_library_keeping_pid_and_command_line(tmp_path):
    """The re-execution path on any Linux machine, tcmalloc installed or not: a harmless library (a copy of the
    maths library) under a tcmalloc-like name, named by GEOALIGN_ALLOCATOR, ends up mapped in the same process
    with the same arguments."""
    libm = _mapped_library("libm.so") or _mapped_library("libm-")
    assert libm is not None, "the interpreter maps libm"
    probe = tmp_path / "libtcmalloc_probe.so"
    shutil.copy(libm, probe)
    report, stderr, code = _probe({host_allocator.ENV_CHOICE: str(probe)})
    assert code == 0, stderr
    assert report["tcmalloc"] is not None and os.path.samefile(report["tcmalloc"], probe)
    assert report["argv"] == ["--flag", "a b"] and report["reexecuted"] == "1"


def test_reexecutes_with_tcmalloc_when_found_and_keeps_the_command_line():
    library = host_allocator.find_tcmalloc()
    report, stderr, code = _probe({})
    assert code == 0, stderr
    assert report["argv"] == ["--flag", "a b"]
    if library is None:
        # Nothing to preload: one warning naming the package, the process runs as started.
        assert report["tcmalloc"] is None and report["reexecuted"] is None
        assert "libtcmalloc-minimal4" in stderr and host_allocator.ENV_CHOICE in stderr
    else:
        assert report["tcmalloc"] is not None and os.path.samefile(report["tcmalloc"], library)
        assert report["reexecuted"] == "1"
        assert "large alloc" not in stderr


def test_system_choice_leaves_the_process_alone():
    report, stderr, code = _probe({host_allocator.ENV_CHOICE: "system"})
    assert code == 0, stderr
    assert report["tcmalloc"] is None and report["reexecuted"] is None and stderr == ""


def test_a_named_library_that_does_not_exist_is_an_error_naming_the_variable():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(host_allocator.ENV_CHOICE, "/nonexistent/libtcmalloc.so.4")
        patch.delenv(host_allocator.ENV_REEXECUTED, raising=False)
        if host_allocator.loaded_tcmalloc() is not None:
            pytest.skip("this test process already runs on tcmalloc")  # nothing would be re-executed
        with pytest.raises(ValueError, match="GEOALIGN_ALLOCATOR='/nonexistent/libtcmalloc.so.4': no such file"):
            host_allocator.use_tcmalloc()


def test_never_reexecutes_twice(monkeypatch):
    """A preload that did not take (e.g. a library of another architecture) must not loop on exec."""
    monkeypatch.setenv(host_allocator.ENV_REEXECUTED, "1")
    monkeypatch.setenv(host_allocator.ENV_CHOICE, "tcmalloc")
    monkeypatch.setattr(host_allocator, "loaded_tcmalloc", lambda: None)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed a second time"))
    host_allocator.use_tcmalloc()


def test_the_train_cli_refuses_a_missing_allocator_library(tmp_path):
    """Through the real entry point: GEOALIGN_ALLOCATOR naming a missing library is one line naming the
    variable and exit status 2, before anything is built."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.ENV_REEXECUTED)}
    env[host_allocator.ENV_CHOICE] = "/nonexistent/libtcmalloc.so.4"
    done = subprocess.run([sys.executable, "-m", "geoalign_jax.train", "--config", "configs/demo.py", "--workdir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "GEOALIGN_ALLOCATOR='/nonexistent/libtcmalloc.so.4': no such file" in done.stderr
