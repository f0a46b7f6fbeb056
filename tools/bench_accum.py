"""Gradient accumulation (train.micro_batches = K, GradCache: train/grad_cache.py): memory and speed against K = 1
at the same global batch, measured on the trainer's own compiled step (`loop.build`, `step.compile_step`).

    # XLA's memory analysis per device for K = 1, 4, 16 (compiles only, allocates nothing), and the largest
    # global batch that fits a device of --capacity-gb for each K (affine in the batch: two compiles per K give
    # the line, a third confirms its prediction); one K per process keeps a ViT-B/16 compile within 24 GiB
    .venv/bin/python tools/bench_accum.py memory --config configs/geoalignclip.py --batch 32 --micro 1,4,16
    # does a batch fit? FarSLIP's 160 per GPU, 4 local crops, bf16, block remat, K = 8
    .venv/bin/python tools/bench_accum.py memory --config configs/farslip.py --batch 160 --micro 8 \
        --dtype bfloat16 --remat block --no-fit
    # does this backend's schedule keep block remat's saving? the image tower's gradient alone, remat off and on
    .venv/bin/python tools/bench_accum.py remat --config configs/farslip.py:s1 --batch 16 --dtype bfloat16
    # step time, K = 4 vs K = 1, interleaved (K1, K4, K1, ...), medians
    .venv/bin/python tools/bench_accum.py speed --config configs/demo.py --batch 32 --micro 1,4 --iters 5

Memory: argument (state + batch), output, alias (donated state written in place) and temporaries (activations,
gradients, the cache) as XLA's memory analysis reports them for the compiled step on this backend; "total" =
argument + output - alias + temp, the per-device peak the step needs. "cache" is the size of the towers'
outputs for the whole global batch (what GradCache keeps between its passes; its gradient is as large again).
Batches are synthetic (the recipe's batch spec: random pixels, captions that fill --caption-tokens tokens, valid
boxes), the parameters random (config.init is not read). The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ of this checkout

from geoalign_jax.data import pipeline  # noqa: E402
from geoalign_jax.losses import objective as objective_lib  # noqa: E402
from geoalign_jax.parallel import mesh as mesh_lib  # noqa: E402
from geoalign_jax.parallel import multihost  # noqa: E402
from geoalign_jax.params_checkpoint import abstract_params  # noqa: E402
from geoalign_jax.train import loop  # noqa: E402
from geoalign_jax.train import step as step_lib  # noqa: E402

GIB = 2**30


def load_config(path: str, batch: int, micro: int, dtype: str, remat: str):
    """The recipe at `path` ("file.py" or "file.py:arg") with the benchmark's batch, K, numerics and a single
    device; random initial parameters."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_recipe", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.data.batch_size = batch
    config.train.micro_batches = micro
    config.train.remat = remat
    if dtype:
        config.model.overrides.dtype = dtype
    config.init.kind = "scratch"
    config.init.path = ""
    config.eval.tasks = ()
    config.eval.every_steps = 0
    for axis in ("data", "fsdp", "tensor"):
        config.mesh[axis] = 1
    return config


def cache_bytes(setup: loop.Setup) -> int:
    """Bytes of the towers' outputs for the global batch (GradCache's cache), the teacher's crop branch included
    (a "frozen" or "ema" distillation teacher is read from the state)."""
    outputs = jax.eval_shape(
        lambda params, batch, teacher: objective_lib.compute_outputs(
            setup.model_config, params, batch, setup.loss_config, teacher_params=teacher),
        abstract_params(setup.model_config), dict(setup.batch_spec), setup.abstract_state.teacher,
    )
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(outputs))


def compiled_memory(args: argparse.Namespace, batch: int, micro: int) -> dict[str, Any]:
    setup = loop.build(load_config(args.config, batch, micro, args.dtype, args.remat))
    compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
    memory = compiled.memory
    total = (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
             - memory.get("alias_size_in_bytes", 0) + memory.get("temp_size_in_bytes", 0))
    row = {"batch": batch, "micro_batches": micro, "total_gib": total / GIB, "cache_gib": cache_bytes(setup) / GIB,
           "compile_s": round(compiled.compile_seconds, 1),
           **{key.replace("_size_in_bytes", "_gib"): value / GIB for key, value in memory.items()
              if key != "generated_code_size_in_bytes"}}
    print(json.dumps(row), flush=True)
    return row


def memory_mode(args: argparse.Namespace) -> dict[str, Any]:
    rows = {micro: compiled_memory(args, args.batch, micro) for micro in args.micro}
    result: dict[str, Any] = {"rows": list(rows.values())}
    if 1 in rows:
        base = rows[1]["temp_gib"]
        result["temp_vs_k1"] = {micro: row["temp_gib"] / base for micro, row in rows.items()}
    if args.fit:
        capacity = args.capacity_gb * 1e9 / GIB
        result["largest_batch_in"] = {"capacity_gb": args.capacity_gb, "capacity_gib": capacity,
                                      **{micro: largest_batch(args, row, capacity) for micro, row in rows.items()}}
    return result


def largest_batch(args: argparse.Namespace, row: dict[str, Any], capacity: float) -> dict[str, Any]:
    """The largest global batch (a multiple of K) whose compiled step fits `capacity` GiB per device.

    Memory is close to affine in the batch (activations grow with it, state and code do not), so a compile at
    twice the batch gives the line and its prediction is compiled to confirm it; when the confirmation misses
    (over capacity), the line through the two nearest compiled points predicts again (at most --fit-tries
    compiles in all). Compiles are the expensive part (minutes each for ViT-B/16 on a CPU)."""
    micro = row["micro_batches"]
    points = {row["batch"]: row["total_gib"], 2 * row["batch"]: compiled_memory(args, 2 * row["batch"], micro)["total_gib"]}

    def predict() -> tuple[int | None, float, float]:
        below = sorted(points, key=lambda batch: abs(points[batch] - capacity))[:2]
        (b1, t1), (b2, t2) = sorted((batch, points[batch]) for batch in below)
        slope = (t2 - t1) / (b2 - b1)
        fixed = t1 - slope * b1
        if slope <= 0:
            return None, fixed, slope
        return int((capacity - fixed) / slope) // micro * micro, fixed, slope

    largest, fixed, per_example = predict()
    first_prediction = largest
    for _ in range(args.fit_tries):
        if largest is None or largest <= 0 or largest in points:
            break
        points[largest] = compiled_memory(args, largest, micro)["total_gib"]
        if points[largest] <= capacity:
            break
        largest, fixed, per_example = predict()
        largest = min(largest, max(points) - micro) if largest is not None else None
    fitting = [batch for batch, total in points.items() if total <= capacity]
    confirmed = max(fitting) if fitting else None
    return {"fixed_gib": fixed, "per_example_gib": per_example, "predicted_batch": first_prediction,
            "largest_confirmed_batch": confirmed, "compiled_total_gib": dict(sorted(points.items()))}
    return result


def remat_mode(args: argparse.Namespace) -> dict[str, Any]:
    """The gradient of the recipe's image tower alone (--batch images, the sum of its outputs as the loss),
    compiled without and with `train.remat=block`: XLA's temporaries and the rematerialised blocks in the jaxpr.
    Why: whether the backend's schedule keeps remat's saving shows here in two small compiles (use_cpu_scheduler)."""
    from geoalign_jax.models import clip
    from geoalign_jax.train import experiment

    rows = {}
    for remat in ("none", "block"):
        model_config = experiment.model_config(load_config(args.config, args.batch, 1, args.dtype, remat))
        size = model_config.vision.image_size
        image = jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32)
        gradient = jax.grad(lambda params, x: sum(jnp.sum(out) for out in clip.encode_image(model_config, params, x)))
        params = abstract_params(model_config)
        jaxpr = str(jax.make_jaxpr(gradient)(params, image))
        checkpointed = jaxpr.count("remat2[") + jaxpr.count("checkpoint[")  # the primitive's printed names
        memory = jax.jit(gradient).lower(params, image).compile().memory_analysis()
        rows[remat] = {"temp_gib": memory.temp_size_in_bytes / GIB, "checkpointed_blocks": checkpointed,
                       "layers": model_config.vision.layers}
        print(json.dumps({"remat": remat, **rows[remat]}), flush=True)
    return {"rows": rows, "block_vs_none": rows["block"]["temp_gib"] / rows["none"]["temp_gib"]}


def synthetic_batch(setup: loop.Setup, caption_tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixels, captions of `caption_tokens` tokens ending in EOT, boxes inside the image, masks on."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, spec in setup.batch_spec.items():
        shape, dtype = spec.shape, np.dtype(spec.dtype)
        if dtype == np.bool_:
            batch[key] = np.ones(shape, bool)
        elif key.endswith("boxes"):
            start = rng.uniform(0.0, 0.4, size=shape[:-1] + (2,))
            batch[key] = np.concatenate([start, start + 0.5], axis=-1).astype(dtype)
        elif key.endswith("category"):
            batch[key] = rng.integers(0, 5, size=shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            tokens = np.zeros(shape, dtype)
            length = min(caption_tokens, shape[-1] - 1)
            tokens[..., :length] = rng.integers(1, 49000, size=shape[:-1] + (length,))
            tokens[..., length] = 49407
            batch[key] = tokens
        else:
            batch[key] = rng.normal(size=shape).astype(dtype)
    return batch


def speed_mode(args: argparse.Namespace) -> dict[str, Any]:
    runs = {}
    for micro in args.micro:
        setup = loop.build(load_config(args.config, args.batch, micro, args.dtype, args.remat))
        compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
        batch = multihost.host_batch_to_global(synthetic_batch(setup, args.caption_tokens), mesh_lib.batch_sharding(setup.mesh))
        state = loop.initial_state(setup)
        state, metrics = compiled.run(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        runs[micro] = {"compiled": compiled, "batch": batch, "state": state, "times": [],
                       "compile_s": compiled.compile_seconds}
    for _ in range(args.iters):
        for micro, run in runs.items():
            start = time.perf_counter()
            run["state"], metrics = run["compiled"].run(run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    medians = {micro: statistics.median(run["times"]) for micro, run in runs.items()}
    base = medians.get(1) or next(iter(medians.values()))
    return {"step_s": medians, "vs_k1": {micro: value / base for micro, value in medians.items()},
            "compile_s": {micro: round(run["compile_s"], 1) for micro, run in runs.items()}}


def use_cpu_scheduler(kind: str) -> None:
    """Chooses XLA:CPU's instruction scheduler, which decides what the CPU memory analysis reports.

    Why: XLA:CPU schedules for concurrency by default (breadth first: every instruction as early as its
    operands allow), which hoists the backward pass's recomputation of a rematerialised block next to the
    forward pass, so its activations are live at once and `train.remat=block` looks useless on the CPU
    (`remat --config configs/farslip.py:s1 --batch 16 --dtype bfloat16`: temporaries 3.39 GiB without remat,
    3.39 GiB with). The memory-minimising scheduler keeps most of the recomputation where the backward pass
    needs it (2.35 -> 1.24 GiB), closer to what a GPU/TPU compile does under its memory limit. Must run before jax starts a backend."""
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    if flag in os.environ.get("XLA_FLAGS", ""):
        return  # the caller chose
    value = "false" if kind == "memory" else "true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={value}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("memory", "remat", "speed"))
    parser.add_argument("--config", required=True, help="a recipe file, optionally with its argument: configs/farslip.py:s1")
    parser.add_argument("--batch", type=int, required=True, help="global batch")
    parser.add_argument("--micro", default="1,4", help="comma-separated micro-batch counts K")
    parser.add_argument("--dtype", default="", help="compute dtype (default: the recipe's)")
    parser.add_argument("--remat", default="none", choices=("none", "block"))
    parser.add_argument("--iters", type=int, default=5, help="speed: timed steps per K (median)")
    parser.add_argument("--caption-tokens", type=int, default=20, help="speed: tokens per caption (RS captions: 15-20)")
    parser.add_argument("--capacity-gb", type=float, default=80.0, help="memory: device memory for the fit (1e9 bytes)")
    parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                        help="memory: also compile at twice the batch to find the largest batch that fits")
    parser.add_argument("--fit-tries", type=int, default=3,
                        help="memory: at most this many compiles to confirm the predicted largest batch")
    parser.add_argument("--cpu-scheduler", default="memory", choices=("memory", "concurrency"),
                        help="XLA:CPU's scheduler: 'memory' minimises peak memory (remat shows), 'concurrency' is "
                             "XLA:CPU's default (use_cpu_scheduler)")
    args = parser.parse_args(argv)
    use_cpu_scheduler(args.cpu_scheduler)
    args.micro = [int(value) for value in args.micro.split(",")]
    result = {"memory": memory_mode, "remat": remat_mode, "speed": speed_mode}[args.mode](args)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps({"mode": args.mode, "config": args.config, "batch": args.batch, "dtype": args.dtype or "recipe",
                      "remat": "none,block" if args.mode == "remat" else args.remat, "cpu_scheduler": args.cpu_scheduler, "backend": jax.default_backend(), "load_average": load, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
