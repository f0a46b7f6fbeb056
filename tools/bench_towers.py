"""Forward throughput of the image and text towers: geoalign-jax (jit) against open_clip (torch), same
config, same weights, same batch, same machine.

    .venv/bin/python tools/bench_towers.py --model ViT-B-32 --batch 32 --iters 3

Our side: `jax.jit` of `encode_image` / `encode_text`, timed after compilation with `block_until_ready`.
open_clip side: the same weights (exported with `params_to_open_clip`) in `torch.inference_mode()` with
`torch.set_num_threads(os.cpu_count())`. Both run on the CPU unless jax finds an accelerator (printed).
Prints images/s and captions/s and the ratio ours / open_clip (> 1: we are faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np

from geoalign_jax.convert.open_clip import open_clip_model_cfg, params_to_open_clip
from geoalign_jax.models.clip import CLIPConfig, encode_image, encode_text, get_model_config, init_params
from geoalign_jax.tokenizer import tokenize

CAPTION = "many planes are parked near the terminal of an airport beside a long runway and green fields"


def time_per_call(run: Callable[[], object], iters: int) -> float:
    """Median wall seconds of `run()` over `iters` calls (after one untimed warm-up call)."""
    run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_ours(config: CLIPConfig, params, images: np.ndarray, tokens: np.ndarray, iters: int) -> dict[str, float]:
    image_fn = jax.jit(lambda p, x: encode_image(config, p, x)[0])
    text_fn = jax.jit(lambda p, t: encode_text(config, p, t)[0])
    device_params = jax.device_put(params)
    device_images, device_tokens = jax.device_put(images), jax.device_put(tokens)
    start = time.perf_counter()
    image_fn(device_params, device_images).block_until_ready()
    text_fn(device_params, device_tokens).block_until_ready()
    compile_s = time.perf_counter() - start
    return {
        "image_s": time_per_call(lambda: image_fn(device_params, device_images).block_until_ready(), iters),
        "text_s": time_per_call(lambda: text_fn(device_params, device_tokens).block_until_ready(), iters),
        "compile_s": compile_s,
    }


def bench_open_clip(config: CLIPConfig, params, images: np.ndarray, tokens: np.ndarray, iters: int) -> dict[str, float]:
    import open_clip
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = open_clip.CLIP(**open_clip_model_cfg(config)).eval()
    model.load_state_dict({key: torch.from_numpy(value) for key, value in params_to_open_clip(config, params).items()})
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_tokens = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        return {
            "image_s": time_per_call(lambda: model.encode_image(torch_images), iters),
            "text_s": time_per_call(lambda: model.encode_text(torch_tokens), iters),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, ViT-B-32, ViT-B-16, ViT-L-14 (optionally -quickgelu)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per tower (median reported)")
    args = parser.parse_args(argv)

    config = get_model_config(args.model)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    size = config.vision.image_size
    images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), dtype=np.float32)
    tokens = tokenize([CAPTION] * args.batch, config.text.context_length).astype(np.int32)

    ours = bench_ours(config, params, images, tokens, args.iters)
    theirs = bench_open_clip(config, params, images, tokens, args.iters)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"model {args.model}, batch {args.batch}, {args.iters} timed iters (median), fp32")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; our compile {ours['compile_s']:.1f} s")
    print(f"{'tower':<7}{'geoalign-jax':>16}{'open_clip':>16}{'ours/open_clip':>16}")
    for tower, unit in (("image", "img/s"), ("text", "cap/s")):
        ours_rate = args.batch / ours[f"{tower}_s"]
        theirs_rate = args.batch / theirs[f"{tower}_s"]
        print(f"{tower:<7}{ours_rate:>10.1f} {unit}{theirs_rate:>10.1f} {unit}{ours_rate / theirs_rate:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
