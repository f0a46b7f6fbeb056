"""The one harness of the multi-process tests: start local processes that join one jax.distributed job, wait
with a deadline, kill what is left, and fail with every process's log tail (so the reason is in the report)."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time

import pytest

from geoalign_jax.parallel import multihost

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the environment variables that configure jax.distributed: a worker gets only what the test gives it
ENV_NAMES = (multihost.COORDINATOR_ENV, multihost.NUM_PROCESSES_ENV, multihost.PROCESS_ID_ENV,
             multihost.LOCAL_DEVICE_IDS_ENV, multihost.MODE_ENV)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def xla_flags(devices: int, *, default_codegen: bool = False) -> str:
    """This process's XLA_FLAGS (the session's compile options, tests/conftest.py) on `devices` CPU devices;
    `default_codegen`: without those compile options (XLA's default code generation, what training uses)."""
    import conftest

    dropped = {"--xla_force_host_platform_device_count", *(conftest.TEST_XLA_FLAGS if default_codegen else ())}
    kept = [word for word in os.environ.get("XLA_FLAGS", "").split() if word.split("=", 1)[0] not in dropped]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def worker_env(devices_per_process: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the jax.distributed variables, on `devices_per_process` CPU devices."""
    env = {key: value for key, value in os.environ.items() if key not in ENV_NAMES}
    env.update(
        XLA_FLAGS=xla_flags(devices_per_process),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    env.update(extra or {})
    return env


def run_processes(commands: list[list[str]], out: pathlib.Path, *, env: dict[str, str], timeout_s: float,
                  what: str) -> tuple[list[dict], str]:
    """Runs the commands side by side (process i logs to out/process_<i>.log and writes out/process_<i>.json);
    returns the JSON results and the logs' report. A process still running at the deadline is killed, and a
    timeout or a non-zero exit fails the test with every process's log tail."""
    log_paths = [out / f"process_{i}.log" for i in range(len(commands))]
    processes = []
    timed_out = False
    with contextlib.ExitStack() as stack:
        for command, log_path in zip(commands, log_paths):
            log = stack.enter_context(open(log_path, "w"))
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT))
        deadline = time.monotonic() + timeout_s
        try:
            for process in processes:
                try:
                    process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
    report = "\n".join(
        f"--- process {i} (exit code {process.returncode}) ---\n{log_path.read_text()[-6000:]}"
        for i, (process, log_path) in enumerate(zip(processes, log_paths))
    )
    if timed_out:
        pytest.fail(f"the {what} processes did not finish within {timeout_s} s\n{report}")
    if any(process.returncode != 0 for process in processes):
        pytest.fail(f"a {what} process failed\n{report}")
    return [json.loads((out / f"process_{i}.json").read_text()) for i in range(len(commands))], report
