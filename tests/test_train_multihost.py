"""The trainer under jax.distributed with two local processes (2 CPU devices each, one 4-device mesh): both
train, a SIGTERM to one process makes both save the same step and stop, the rerun resumes there, and the
resumed run ends bitwise equal to an uninterrupted one (a damaged newer step, which only process 0's digest
check catches, is skipped by both). Only process 0 writes the metrics log and the
evaluation's results.json (whose parameter hash is that of the parameters sharded over both); each process
checkpoints its own data-iterator position. The processes run tests/train_multihost_worker.py.
"""
from __future__ import annotations

import json
import pathlib
import sys

import process_harness
import train_fixtures

REPO_ROOT = train_fixtures.REPO_ROOT
WORKER = REPO_ROOT / "tests" / "train_multihost_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
PREEMPT_STEP = 2
TIMEOUT_S = 500


def _run(data: str, out: pathlib.Path) -> list[dict]:
    # The three runs of each process compile the same step: they share the executables through the session's
    # persistent compilation cache (tests/conftest.py), which the workers' environment inherits.
    env = process_harness.worker_env(DEVICES_PER_PROCESS)
    coordinator = f"127.0.0.1:{process_harness.free_port()}"
    commands = [[sys.executable, str(WORKER), "--process-id", str(process_id), "--num-processes",
                 str(NUM_PROCESSES), "--coordinator", coordinator, "--data", data, "--out", str(out),
                 "--preempt-step", str(PREEMPT_STEP)] for process_id in range(NUM_PROCESSES)]
    return process_harness.run_processes(commands, out, env=env, timeout_s=TIMEOUT_S, what="trainer")[0]


def test_two_processes_train_save_on_sigterm_together_and_resume_bitwise(tmp_path):
    data = train_fixtures.make_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    results = _run(data, out)
    first, second = results
    assert first["device_count"] == second["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS

    # SIGTERM reached only process 1, yet both stopped after saving the same step.
    assert first["interrupted"] == second["interrupted"]
    status, stopped_at = first["interrupted"]
    assert status == "preempted" and PREEMPT_STEP <= stopped_at < 6
    step_dir = out / "interrupted" / "checkpoints" / "6"  # (the preemption step itself is rotated out: keep = 2)
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                                 "process_1-of-2.json"]
    # A damaged step after it (tests/train_multihost_worker.py) was set aside by both processes together.
    assert (out / "interrupted" / "checkpoints" / f"{stopped_at + 1}.damaged").is_dir()
    # Both resumed from it and finished; the result is bit for bit the uninterrupted run's.
    for result in results:
        assert result["resumed"][:3] == ["finished", stopped_at, 6]
        assert result["straight"][:2] == ["finished", 6]
        assert result["resumed"][3:] == result["straight"][2:]  # params and optimizer state digests
    # Only process 0 writes the log: one line per step, none twice.
    steps = [json.loads(line)["step"] for line in (out / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 7))  # step 0: the truncation statistics, logged by the fresh run only
    # The evaluation: process 0 wrote results.json, whose parameter hash is that of the sharded parameters.
    results_files = [p.relative_to(out).as_posix() for p in out.glob("*/eval/*/results.json")]
    assert results_files == ["straight/eval/step_6/results.json"]
    written = json.loads((out / "straight" / "eval" / "step_6" / "results.json").read_text())
    assert written["provenance"]["model"]["parameter_hash"] == first["parameter_hash"] == second["parameter_hash"]
    assert written["provenance"]["tasks"]["retrieval/seen"]["overlap"]["exact"] == 4
    evaluated = [json.loads(line) for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evaluated if "eval/retrieval/seen/standard/mean_recall" in r] == [6]
