"""XLA:CPU's float32 kernels against torch's, on the shapes of a ViT tower: is there speed left to win at equal numerics?

    .venv/bin/python tools/bench_cpu_kernels.py                       # one product of the ViT MLP's shape
    .venv/bin/python tools/bench_cpu_kernels.py --tower ViT-B-32 --batch 60 --rounds 6
    .venv/bin/python tools/bench_cpu_kernels.py --tower ViT-B-16 --batch 16 --dense segearth

Matmul: [rows, 768] x [768, 3072] (the MLP's first product for 60 ViT-B/32 images of 50 tokens) in float32
with XLA's default dot library (YNNPACK in jaxlib 0.10), with XLA's own Eigen kernels instead (per-function
``compiler_options``, so both run in this one process under the same load), and in torch (MKL);
then bfloat16 products with float32 accumulation, with their relative error, to show what less precise
arithmetic would buy and cost. Prints GFLOP/s and the ratio to torch's float32 (the baseline, same run).

Tower: the image tower's embedding function compiled once per dot-library choice (random weights) and run
alternately, ``--rounds`` times each, so every choice sees the same load: median seconds per batch, the
ratio to XLA's default, how often the choice beat the default in paired runs, and the largest difference of
the embeddings (float rounding).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# XLA:CPU dot libraries, as per-compilation options (jaxlib 0.10.2's DebugOptions; "" = no YNNPACK fusions, so
# XLA's own Eigen kernels). The XNNPACK and oneDNN fusion types were tried the same way: the compiled modules
# held none of their fusions, so they are not offered. Each compile is checked for what it holds.
CHOICES = {
    "xla default (YNNPACK)": {},
    "Eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
YNN_MARK = "__ynn_fusion"


def compile_checked(lowered, name: str):
    compiled = lowered.compile(compiler_options=CHOICES[name])
    if (YNN_MARK in compiled.as_text()) != (name == "xla default (YNNPACK)"):
        raise RuntimeError(f"{name}: the compiled module does not use the dot library asked for")
    return compiled


def best_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_table(rows: int, repeats: int) -> None:
    import torch

    rng = np.random.default_rng(0)
    lhs, rhs = rng.normal(size=(rows, 768)).astype(np.float32), rng.normal(size=(768, 3072)).astype(np.float32)
    flops = 2 * rows * 768 * 3072
    exact = lhs.astype(np.float64) @ rhs.astype(np.float64)
    lhs_t, rhs_t = torch.from_numpy(lhs), torch.from_numpy(rhs)
    torch_f32 = best_seconds(lambda: lhs_t @ rhs_t, repeats)
    print(f"[{rows}, 768] x [768, 3072], best of {repeats}; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), jax {jax.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"  {'torch float32 (MKL)':34s} {flops / torch_f32 / 1e9:7.0f} GFLOP/s  1.00x  rel. error "
          f"{np.abs((lhs_t @ rhs_t).numpy() - exact).max() / np.abs(exact).max():.1e}")
    lhs_j, rhs_j = jnp.asarray(lhs), jnp.asarray(rhs)
    for name in CHOICES:
        product = compile_checked(jax.jit(lambda a, b: a @ b).lower(lhs_j, rhs_j), name)
        seconds = best_seconds(lambda: product(lhs_j, rhs_j).block_until_ready(), repeats)
        error = np.abs(np.asarray(product(lhs_j, rhs_j)) - exact).max() / np.abs(exact).max()
        print(f"  {'jax float32, ' + name:34s} {flops / seconds / 1e9:7.0f} GFLOP/s  {torch_f32 / seconds:.2f}x  "
              f"rel. error {error:.1e}")
    bf16 = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                        preferred_element_type=jnp.float32))
    seconds = best_seconds(lambda: bf16(lhs_j, rhs_j).block_until_ready(), repeats)
    error = np.abs(np.asarray(bf16(lhs_j, rhs_j)) - exact).max() / np.abs(exact).max()
    print(f"  {'jax bfloat16 in, float32 out':34s} {flops / seconds / 1e9:7.0f} GFLOP/s  {torch_f32 / seconds:.2f}x  "
          f"rel. error {error:.1e}")
    lhs_b, rhs_b = lhs_t.bfloat16(), rhs_t.bfloat16()
    seconds = best_seconds(lambda: lhs_b @ rhs_b, repeats)
    error = np.abs((lhs_b @ rhs_b).float().numpy() - exact).max() / np.abs(exact).max()
    print(f"  {'torch bfloat16 (AMX where present)':34s} {flops / seconds / 1e9:7.0f} GFLOP/s  "
          f"{torch_f32 / seconds:.2f}x  rel. error {error:.1e}")


def tower_table(model: str, batch: int, dense: str, rounds: int) -> None:
    from geoalign_jax.models import clip

    config = clip.get_model_config(model)
    params = jax.device_put(clip.init_params(config, jax.random.key(0)))
    images = np.random.default_rng(0).normal(size=(batch, config.vision.image_size,
                                                   config.vision.image_size, 3)).astype(np.float32)

    def embed(p, x):
        embedding, patches = clip.encode_image(config, p, x, dense=dense)
        return embedding if dense == "last" else patches

    lowered = jax.jit(embed).lower(params, images)
    compiled = {name: compile_checked(lowered, name) for name in CHOICES}
    outputs = {name: np.asarray(fn(params, images)) for name, fn in compiled.items()}
    times: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    for round_index in range(rounds):
        for name in order[round_index % len(order):] + order[:round_index % len(order)]:  # rotate who goes first
            started = time.perf_counter()
            np.asarray(compiled[name](params, images))
            times[name].append(time.perf_counter() - started)
    default = order[0]
    base = statistics.median(times[default])
    print(f"{model} image tower, batch {batch}, output {'embedding' if dense == 'last' else dense + ' patches'}, "
          f"{rounds} alternating rounds, load {os.getloadavg()[0]:.2f}")
    for name in order:
        median = statistics.median(times[name])
        wins = sum(mine < theirs for mine, theirs in zip(times[name], times[default]))
        difference = float(np.abs(outputs[name] - outputs[default]).max())
        print(f"  {name:24s} median {median:6.3f} s/batch  {median / base:.2f}x default  faster in "
              f"{wins}/{rounds} paired rounds  max |diff| {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000, help="matmul rows (60 images x 50 tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tower", default="", help="a model name (e.g. ViT-B-32): time its image tower instead")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--dense", default="last", choices=("last", "segearth"),
                        help="last: embeddings (zero-shot); segearth: the dense patch map (segmentation)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.tower:
        tower_table(args.tower, args.batch, args.dense, args.rounds)
    else:
        matmul_table(args.rows, args.repeats)


if __name__ == "__main__":
    main()
