"""Open-vocabulary segmentation speed and memory: ``eval.segmentation`` (JAX, batched windows through one
compiled function) against a straightforward PyTorch implementation of the same SegEarth-OV protocol
(tools/segearth_torch.py, window by window as SegEarth-OV runs it) on the same weights, exported to open_clip.

    .venv/bin/python tools/bench_segmentation.py --model ViT-B-16 --size 1024            # speed, one run
    .venv/bin/python tools/bench_segmentation.py --model ViT-B-16 --size 512 --threads 1  # both on one core
    .venv/bin/python tools/bench_segmentation.py --memory-tile 6000                      # peak memory

Speed: one image of --size x --size (smooth synthetic colours), LoveDA's 7 classes, random weights (no
network); --resize none keeps the image at its size (1024: 81 windows of 224), as a large tile is cut.
Both sides get the same queries; the text towers are not timed. Ours is timed twice: the first call
includes compiling the window function, the second is the steady state a split sees. Prints windows/s,
the time ratio ours / torch (goal <= 0.8), wall and CPU seconds (user + system of the process while each
side runs; both run in this process one after the other), and the fraction of pixels on which both predict
the same class. Like with like: ``--threads N`` pins the whole process to N cores (``os.sched_setaffinity``,
which both XLA's and torch's thread pools size themselves from) and gives torch N threads; N = 1 also turns
off XLA's multi-threaded Eigen (``--xla_cpu_multi_thread_eigen=false``). The default is every core for both.
Memory: a --memory-tile square image with the tiny model (crop 224, stride 112, no resize: every window
interpolates the position embedding), peak RSS of the process against the image and the full-image
logits the row streaming avoids.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from geoalign_jax.data import segmentation_presets  # noqa: E402
from geoalign_jax.eval import embed, prompts, segmentation  # noqa: E402
from geoalign_jax.models import clip  # noqa: E402


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Smooth colours, filled in bands of rows (so that making a 6000 px tile costs no more than the tile)."""
    rng = np.random.default_rng(seed)
    periods = rng.uniform(20, 90, (3, 2))
    image = np.empty((size, size, 3), np.uint8)
    xx = np.arange(size, dtype=np.float32)[None, :]
    for top in range(0, size, 256):
        yy = np.arange(top, min(top + 256, size), dtype=np.float32)[:, None]
        for c in range(3):
            band = np.sin(yy / periods[c, 0] + c) * 80 + np.cos(xx / periods[c, 1]) * 60 + 110
            image[top:top + yy.shape[0], :, c] = np.clip(band, 0, 255).astype(np.uint8)
    return image


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def speed(args: argparse.Namespace) -> None:
    import torch

    from geoalign_jax.convert.open_clip import export_open_clip
    from segearth_torch import TorchSegEarth

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = clip.get_model_config(args.model)
    params = clip.init_params(config, jax.random.key(0))
    classes = segmentation_presets.get_preset("loveda").classes
    templates = prompts.get_templates("openai_imagenet")
    resize = segmentation.parse_resize(args.resize)
    options = segmentation.SegEarthOptions(resize=resize, window_batch=args.window_batch, threshold=0.3)
    image = synthetic_image(args.size)
    with tempfile.TemporaryDirectory() as folder:
        export_open_clip(config, params, folder)
        reference = TorchSegEarth(folder, classes, templates, resize=resize, threshold=0.3)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        expected = reference.predict(image)
        torch_seconds, torch_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    windows = reference.windows
    embedder = embed.JaxEmbedder(config, params)
    queries, query_class = segmentation.class_queries(embedder.embed_texts, classes, templates)
    segmenter = segmentation.SegEarthSegmenter(config, params, queries, query_class, options)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    segmenter.predict([image])
    first_seconds, first_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    start, cpu_start = time.perf_counter(), cpu_seconds()
    ours = segmenter.predict([image])[0]
    jax_seconds, jax_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    print(f"{args.model}, {args.size}x{args.size}, resize {args.resize}: {windows} windows of {options.crop}, "
          f"{len(query_class)} queries; jax {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {len(os.sched_getaffinity(0))} cores, XLA_FLAGS "
          f"{os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()[0]:.2f}")
    for label, seconds, cpu in (("torch reference (window by window)", torch_seconds, torch_cpu),
                                ("ours, first call (with compile)   ", first_seconds, first_cpu),
                                (f"ours, compiled (batch {args.window_batch:2d})        ", jax_seconds, jax_cpu)):
        print(f"  {label}: {seconds:7.2f} s wall {windows / seconds:6.2f} windows/s, {cpu:7.2f} s cpu")
    print(f"  ratio ours / torch: wall {jax_seconds / torch_seconds:.2f} (with compile "
          f"{first_seconds / torch_seconds:.2f}), cpu {jax_cpu / torch_cpu:.2f}; same class on "
          f"{np.mean(ours == expected) * 100:.3f}% of pixels")


def memory(args: argparse.Namespace) -> None:
    config = clip.get_model_config("tiny")
    params = clip.init_params(config, jax.random.key(0))
    classes = segmentation_presets.get_preset("isaid").classes  # 16 classes: the largest logit volume
    embedder = embed.JaxEmbedder(config, params)
    queries, query_class = segmentation.class_queries(embedder.embed_texts, classes, ("a photo of a {}.",))
    options = segmentation.SegEarthOptions(resize=None, window_batch=args.window_batch)
    segmenter = segmentation.SegEarthSegmenter(config, params, queries, query_class, options)
    segmenter.predict([synthetic_image(224)])  # compile
    image = synthetic_image(args.memory_tile)
    before, compiled_windows = peak_rss_mb(), segmenter.windows_run
    rows = 0

    def count(index: int, first: int, labels: np.ndarray) -> None:
        nonlocal rows
        rows += labels.shape[0]

    start = time.perf_counter()
    segmenter.predict_stream(iter([image]), count)
    seconds = time.perf_counter() - start
    size = args.memory_tile
    windows = segmenter.windows_run - compiled_windows
    print(f"tile {size}x{size}, tiny model, {len(query_class)} queries, {windows} windows in {seconds:.1f} s, "
          f"{rows} label rows")
    print(f"  peak RSS {peak_rss_mb():.0f} MB (with the tile loaded, before segmenting: {before:.0f} MB); the uint8 "
          f"tile is {image.nbytes / 2**20:.0f} MB, its full-size float32 logits would be "
          f"{size * size * len(query_class) * 4 / 2**20:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--resize", default="none", help="N, NxM or none (SegEarth-OV's presets: 448)")
    parser.add_argument("--window-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0,
                        help="pin the process to this many cores for both sides (1 also runs XLA's matmuls "
                             "single-threaded); default 0: every core")
    parser.add_argument("--memory-tile", type=int, default=0, help="measure peak memory on a tile of this size")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.threads < 0 or args.threads > len(cores):
        parser.error(f"--threads takes 0 (every core) to {len(cores)}")
    if args.threads:  # before JAX starts its CPU backend (the first computation) and before torch's first op
        os.sched_setaffinity(0, cores[:args.threads])
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    memory(args) if args.memory_tile else speed(args)


if __name__ == "__main__":
    main()
