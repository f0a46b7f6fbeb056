"""Time and memory of the scene contrastive loss, forward + backward, plain vs chunked.

    .venv/bin/python tools/bench_loss.py --batches 4096 8192 16384 --dim 512 --chunk 1024

For each global batch size: wall time of one jitted value_and_grad call (after compilation, with
block_until_ready; the best of --repeats runs) and the compiled executable's memory_analysis():
temp_size_in_bytes is the scratch memory XLA allocates for the step (the logits live there), argument
and output sizes are the embeddings and their gradients. The chunked column reports temp / (batch x
chunk x 4 B): it stays flat as the batch grows when memory is O(batch x chunk) (the plain form's temp
grows as batch^2). Runs on whatever backend JAX picks (the CPU here); one device, no mesh.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.losses.contrastive import clip_loss, siglip_loss  # noqa: E402

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Measurement:
    batch: int
    chunk: int
    seconds: float
    compile_seconds: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    loss: float


def _loss_fn(kind: str, chunk: int):
    if kind == "siglip":
        return lambda i, t, s, b: siglip_loss(i, t, s, b, chunk_size=chunk)[0]
    return lambda i, t, s, b: clip_loss(i, t, s, chunk_size=chunk)[0]


def measure(batch: int, dim: int, chunk: int, kind: str, repeats: int, seed: int = 0) -> Measurement:
    """Compiles fwd+bwd for one (batch, chunk) and times `repeats` calls after a warm-up call."""
    keys = jax.random.split(jax.random.key(seed), 2)
    image = jax.random.normal(keys[0], (batch, dim), jnp.float32)
    text = jax.random.normal(keys[1], (batch, dim), jnp.float32)
    scale, bias = jnp.float32(np.log(1 / 0.07)), jnp.float32(-10.0)
    step = jax.jit(jax.value_and_grad(_loss_fn(kind, chunk), argnums=(0, 1, 2, 3)))
    start = time.perf_counter()
    compiled = step.lower(image, text, scale, bias).compile()
    compile_seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    loss, _ = jax.block_until_ready(compiled(image, text, scale, bias))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(image, text, scale, bias))
        times.append(time.perf_counter() - start)
    return Measurement(
        batch=batch,
        chunk=chunk,
        seconds=min(times),
        compile_seconds=compile_seconds,
        temp_bytes=int(getattr(analysis, "temp_size_in_bytes", -1)),
        argument_bytes=int(getattr(analysis, "argument_size_in_bytes", -1)),
        output_bytes=int(getattr(analysis, "output_size_in_bytes", -1)),
        loss=float(loss),
    )


def format_table(rows: list[tuple[Measurement, Measurement]], dim: int, kind: str) -> str:
    """Markdown table: plain vs chunked time and temp memory, with chunked/plain ratios."""
    chunk = rows[0][1].chunk
    header = (
        f"| global batch | plain s | chunked s | time ratio | plain temp MiB | chunked temp MiB | memory ratio "
        f"| chunked temp / (batch x {chunk} x 4 B) | loss diff |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [f"{kind} loss, embedding {dim}, chunk {chunk}, fwd+bwd, backend {jax.default_backend()} "
             f"({jax.device_count()} device(s))", "", header]
    for plain, chunked in rows:
        block_bytes = chunked.batch * chunked.chunk * 4
        lines.append(
            f"| {plain.batch} | {plain.seconds:.2f} | {chunked.seconds:.2f} | {chunked.seconds / plain.seconds:.2f} "
            f"| {plain.temp_bytes / MIB:.0f} | {chunked.temp_bytes / MIB:.0f} "
            f"| {chunked.temp_bytes / plain.temp_bytes:.3f} | {chunked.temp_bytes / block_bytes:.2f} "
            f"| {abs(chunked.loss - plain.loss):.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384], help="global batch sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk size of the chunked form")
    parser.add_argument("--kind", choices=("infonce", "siglip"), default="infonce", help="scene loss")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (best is reported)")
    args = parser.parse_args(argv)
    if args.chunk < 1 or args.dim < 1 or any(batch < 1 for batch in args.batches):
        parser.error("--batches, --dim and --chunk must be positive")
    rows = []
    for batch in args.batches:
        plain = measure(batch, args.dim, 0, args.kind, args.repeats)
        chunked = measure(batch, args.dim, args.chunk, args.kind, args.repeats)
        print(f"batch {batch}: plain {plain.seconds:.2f}s (compile {plain.compile_seconds:.1f}s), "
              f"chunked {chunked.seconds:.2f}s (compile {chunked.compile_seconds:.1f}s)", flush=True)
        rows.append((plain, chunked))
    print()
    print(format_table(rows, args.dim, args.kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
