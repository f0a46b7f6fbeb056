"""Whole-process time of a zero-shot evaluation: JAX towers vs the open_clip (torch) backend, interleaved.

    python tools/bench_eval_zeroshot.py --open-clip EXPORT_DIR --data CLASS_FOLDER_TREE [--rounds 2]
        [--cache-dir DIR] [--baseline-code DIR]

Runs ``python -m geoalign_jax.evaluate --open-clip EXPORT_DIR --tasks zeroshot:aid=DATA`` with
``--backend jax`` and ``--backend open_clip`` alternately (jax, open_clip, jax, ...), so both see the same
machine load, and prints each run's wall time, the median per backend and the ratio jax / open_clip, with
the load average before and after (on a shared machine the ratio is the number to read). With
``--cache-dir`` the JAX runs also go once more with JAX's persistent compilation cache in DIR
(``JAX_COMPILATION_CACHE_DIR``; the first of them fills it, the rest read it). With ``--baseline-code DIR``
(another checkout of geoalign-jax, e.g. before a change) its JAX path runs too, as ``jax@baseline``.
Both backends must give the same top-1 (checked: a faster wrong answer is no result).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run_once(backend: str, args: argparse.Namespace, out: pathlib.Path, cache: str | None,
             code: str | None = None) -> tuple[float, float, float]:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
    if code:
        env["PYTHONPATH"] = code
    command = [sys.executable, "-m", "geoalign_jax.evaluate", "--open-clip", args.open_clip, "--backend", backend,
               "--tasks", f"zeroshot:aid={args.data}", "--out", str(out), "--no-progress", "--no-plots",
               "--batch-size", str(args.batch_size)]
    started, cpu_before = time.perf_counter(), _children_cpu()
    # `python -m` puts the working directory first on sys.path: run the baseline from its own checkout.
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=code)
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    top1 = json.loads((out / "results.json").read_text())["metrics"]["zeroshot/aid/top1"]
    return seconds, cpu, top1


def _children_cpu() -> float:
    """User + system CPU seconds of finished children (less sensitive to other processes' load than wall
    time, though a backend whose threads spin while waiting is charged for the spinning)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-clip", required=True, help="open_clip export folder (open_clip_config.json + weights)")
    parser.add_argument("--data", required=True, help="class-folder tree (e.g. AID)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="also time JAX with this persistent compilation cache")
    parser.add_argument("--baseline-code", default=None, help="also time the JAX path of this checkout")
    args = parser.parse_args()
    modes = [("jax", None), ("open_clip", None)] + ([("jax+cache", args.cache_dir)] if args.cache_dir else []) \
        + ([("jax@baseline", None)] if args.baseline_code else [])
    times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    cpus: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    answers: dict[str, set[float]] = {mode: set() for mode, _ in modes}
    print(f"load before: {load()}  (cpus: {os.cpu_count()})", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for mode, cache in modes:
                backend = mode.split("+")[0].split("@")[0]
                code = args.baseline_code if mode == "jax@baseline" else None
                seconds, cpu, top1 = run_once(backend, args, pathlib.Path(scratch) / mode, cache, code)
                times[mode].append(seconds)
                cpus[mode].append(cpu)
                answers[mode].add(round(top1, 6))
                print(f"round {round_index + 1} {mode:12s} {seconds:7.1f} s wall {cpu:7.1f} s cpu  top1 {top1:.2f}  "
                      f"load {load()}",
                      flush=True)
    if len({value for values in answers.values() for value in values}) != 1:
        print(f"error: the backends disagree on top-1: {answers}", file=sys.stderr)
        return 1
    baseline, cpu_baseline = statistics.median(times["open_clip"]), statistics.median(cpus["open_clip"])
    for mode, _ in modes:
        median, cpu = statistics.median(times[mode]), statistics.median(cpus[mode])
        print(f"{mode:12s} median {median:7.1f} s wall ({median / baseline:.2f}x open_clip), {cpu:7.1f} s cpu "
              f"({cpu / cpu_baseline:.2f}x)")
    print(f"load after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
