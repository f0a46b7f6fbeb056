"""One process of the two-process trainer test in tests/test_train_multihost.py (not a test module itself).

    python tests/train_multihost_worker.py --process-id 0 --num-processes 2 --coordinator 127.0.0.1:PORT \
        --data DEMO/scenes --out OUT --preempt-step 2

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2. The process joins the job through
``multihost.initialize_distributed`` and trains the tiny scene config three times on a mesh of all 4 devices:
straight through in OUT/straight (evaluating at the end); then in OUT/interrupted, where process 1 sends
itself SIGTERM after step ``--preempt-step`` (jax's preemption service must make both processes save the same step and stop); then
again in OUT/interrupted, which resumes. It writes what the test checks to ``OUT/process_<i>.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import jax  # noqa: E402

import bad_files  # noqa: E402
from geoalign_jax.parallel import multihost  # noqa: E402

NUM_STEPS = 6


def _digest(tree) -> str:
    """SHA-256 of every leaf's bytes (the whole global array, gathered: a collective)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(multihost.gather_to_host(tree)):
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--preempt-step", type=int, required=True)
    args = parser.parse_args()
    multihost.initialize_distributed(args.coordinator, args.num_processes, args.process_id, initialization_timeout_s=60)

    import train_fixtures
    from geoalign_jax.train import loop

    config = train_fixtures.tiny_config(args.data, **{"train.num_steps": NUM_STEPS, "checkpoint.every_steps": 4})
    # The straight run also evaluates once, at its last step, on 4 of its own training images: process 0
    # evaluates while process 1 waits, and results.json must hash the parameters all processes hold.
    evaluated = config.copy_and_resolve_references()
    evaluated.eval.tasks = (f"retrieval:seen={args.data},split=train,limit=4",)
    evaluated.eval.allow_train_split, evaluated.eval.every_steps, evaluated.eval.batch_size = True, NUM_STEPS, 4
    straight = loop.run(evaluated, args.out / "straight", progress=False)

    def preempt(step: int) -> None:
        if step == args.preempt_step and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = loop.run(config, args.out / "interrupted", progress=False, on_step=preempt)
    # A damaged newer step (a copy of the saved one, a block zeroed: its digest fails on process 0 only, which
    # reads it): both processes must skip it together and resume from the saved step.
    checkpoints = args.out / "interrupted" / "checkpoints"
    if jax.process_index() == 0:
        damaged = checkpoints / str(interrupted.step + 1)
        shutil.copytree(checkpoints / str(interrupted.step), damaged)
        bad_files.zero_block(max((p for p in (damaged / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size),
                             size=64)
    multihost.sync_barrier("test:damaged_step")
    resumed = loop.run(config, args.out / "interrupted", progress=False)
    from geoalign_jax.eval import provenance

    result = {
        "process_index": jax.process_index(),
        "parameter_hash": provenance.parameter_hash(straight.state.params),  # sharded: gathered, a collective
        "device_count": jax.device_count(),
        "straight": [straight.status, straight.step, _digest(straight.state.params), _digest(straight.state.opt_state)],
        "interrupted": [interrupted.status, interrupted.step],
        "resumed": [resumed.status, resumed.resumed_from, resumed.step, _digest(resumed.state.params),
                    _digest(resumed.state.opt_state)],
    }
    (args.out / f"process_{args.process_id}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
