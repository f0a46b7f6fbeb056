"""The training CLI's allocator switch (host_allocator): re-executes once with tcmalloc preloaded when the machine
has it, keeps the command line, honours GEOALIGN_ALLOCATOR, and says what to install when tcmalloc is missing."""
from __future__ import annotations

import json
import os
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
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.ENV_REEXECUTED)}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", PROBE, "--flag", "a b"], env=env, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    return report, done.stderr, done.returncode


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
