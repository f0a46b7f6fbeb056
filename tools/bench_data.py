"""Throughput of the full training input pipeline (geoalign_jax.data.pipeline), examples/s per CPU core.

Runs the real pipeline (ArrayRecord read, shuffle, decode, random resized crop + flip with boxes, resize,
CLIP normalisation, tokenisation of caption / long text / hard negatives / region texts, batching, worker
processes) for each worker count and reports, after a warm-up:

* examples/s (wall clock), and
* examples per CPU-second: the CPU time of this process and all of its worker processes, read from
  /proc, over the same window. That is the "examples/s per core" the pipeline costs, independent of how
  busy the machine's other cores are.

Without ``--data`` it builds a benchmark set from the RSICD sample JPEGs (224x224; docs/design.md, Test data) via the
JSONL `prepare` format, adding what RSICD lacks so the benchmark exercises every branch: 6 random boxes per image
(categories, half with captions), 4 hard negatives (captions of other images) and a long text (the image's
captions joined).

    python tools/bench_data.py --workers 0 1 2 --batch-size 64 --image-size 224 --num-batches 30
    python tools/bench_data.py --data data/demo/scenes --image-size 64 --max-regions 4

``--bucket`` also uploads the shards to a local GCS emulator on 127.0.0.1 (tools/gcs_emulator.py) and
measures, per worker process, records/s of the raw ArrayRecord reads (grain read threads = concurrent reads
per worker, for each ``--read-threads`` / ``--read-buffer-sizes`` setting) and examples/s of the full
pipeline, from the bucket and from local disk in the same run, with the bucket/local ratio:

    python tools/bench_data.py --bucket --workers 0 --read-threads 2 8 16 --read-buffer-sizes 32 128

``--bucket --mechanisms`` instead times the two ways to read records from the bucket against each other in
one run (raw records/s, and examples/s of the full pipeline in one process): ArrayRecord's own C++ GCS reader,
and a grain source over gcsfs ranged reads (its upper bound: same bytes and requests, no parsing;
tools/bench_bucket.py says why):

    python tools/bench_data.py --bucket --mechanisms --read-threads 1 4 --read-buffer-sizes 32
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import prepare_formats, pipeline  # noqa: E402

# The real RS samples: $GEOALIGN_SHARED_DATA, as for the tests (default: shared/data beside the checkout).
SAMPLES = pathlib.Path(
    os.environ.get("GEOALIGN_SHARED_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
)
RSICD_SAMPLE = SAMPLES / "rsicd_sample"
CATEGORIES = ("airplane", "ship", "storage tank", "vehicle", "building", "bridge")


def build_rsicd_benchmark_set(out_dir: pathlib.Path, sample_dir: pathlib.Path = RSICD_SAMPLE, seed: int = 0) -> str:
    """Prepare the RSICD sample (real JPEGs) with synthetic regions / hard negatives / long texts; returns the
    prepared folder."""
    annotation = json.loads((sample_dir / "dataset_rsicd.json").read_text())
    images = annotation["images"]
    rng = np.random.default_rng(seed)
    all_captions = [s["raw"] for entry in images for s in entry["sentences"] if s["raw"].strip()]
    lines = []
    for entry in images:
        captions = [s["raw"] for s in entry["sentences"] if s["raw"].strip()]
        regions = []
        for _ in range(6):
            w, h = rng.uniform(16, 96, size=2)
            x, y = rng.uniform(0, 224 - w), rng.uniform(0, 224 - h)
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            region = {"box": [float(x), float(y), float(x + w), float(y + h)], "category": category}
            if rng.random() < 0.5:
                region["caption"] = f"a {category} in a {entry.get('label', 'scene').lower()} area"
            regions.append(region)
        negatives = [all_captions[int(i)] for i in rng.choice(len(all_captions), size=4, replace=False)]
        lines.append({
            "image": f"images/{entry['filename']}", "split": "train", "id": entry["filename"],
            "captions": captions, "long_caption": " ".join(captions), "hard_negatives": negatives,
            "regions": regions,
        })
    jsonl = out_dir / "rsicd_bench.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records_dir = out_dir / "records"
    prepare_formats.prepare_jsonl(jsonl, records_dir, name="rsicd_bench", image_root=sample_dir, num_shards=4,
                             progress=False)
    return str(records_dir)


def _cpu_seconds_of_tree(root_pid: int) -> float:
    """user + system CPU seconds of ``root_pid`` and all of its live descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0.0) for pid in tree)


def bench(config, *, workers: int, warmup_batches: int, num_batches: int) -> dict[str, float]:
    config = config.copy_and_resolve_references()
    config.worker_count = workers
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        cpu_start, wall_start = _cpu_seconds_of_tree(os.getpid()), time.perf_counter()
        for _ in range(num_batches):
            batch = next(iterator)
        wall = time.perf_counter() - wall_start
        cpu = _cpu_seconds_of_tree(os.getpid()) - cpu_start
    finally:
        iterator.close()
    examples = num_batches * int(config.batch_size)
    return {"workers": workers, "examples_per_s": examples / wall, "examples_per_cpu_s": examples / cpu,
            "cpu_cores_busy": cpu / wall, "decode_errors": int(batch["decode_errors"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="prepared folder or shard glob (default: RSICD sample set)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-batches", type=int, default=30, help="measured batches per worker count")
    parser.add_argument("--warmup-batches", type=int, default=5)
    parser.add_argument("--max-regions", type=int, default=4)
    parser.add_argument("--hard-negatives", type=int, default=4)
    parser.add_argument("--long-context", type=int, default=248)
    parser.add_argument("--region-crop-size", type=int, default=0)
    parser.add_argument("--local-crops", type=int, default=0)
    parser.add_argument("--local-crop-size", type=int, default=0)
    parser.add_argument("--read-threads", type=int, nargs="+", default=[2],
                        help="read + decode threads per process (the first value outside --bucket)")
    parser.add_argument("--read-buffer-sizes", type=int, nargs="+", default=[32],
                        help="examples prefetched per process (with --bucket: each value is measured)")
    parser.add_argument("--bucket", action="store_true",
                        help="also read the shards from a local GCS emulator and print bucket/local ratios")
    parser.add_argument("--mechanisms", action="store_true",
                        help="with --bucket: ArrayRecord's C++ GCS reader vs gcsfs ranged reads (raw and pipeline)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        data = args.data or build_rsicd_benchmark_set(pathlib.Path(scratch))
        config = pipeline.default_data_config()
        config.train_shards = data
        config.train_split = args.split
        config.batch_size = args.batch_size
        config.image_size = args.image_size
        config.max_regions = args.max_regions
        config.num_hard_negatives = args.hard_negatives
        config.long_context_length = args.long_context
        config.region_crop_size = args.region_crop_size
        config.num_local_crops = args.local_crops
        config.local_crop_size = args.local_crop_size
        config.read_threads = args.read_threads[0]
        config.read_buffer_size = args.read_buffer_sizes[0]
        if args.bucket:
            import bench_bucket

            bench_bucket.compare(config, data, bench, workers=args.workers, read_threads=args.read_threads,
                                 buffer_sizes=args.read_buffer_sizes, warmup_batches=args.warmup_batches,
                                 num_batches=args.num_batches, mechanisms=args.mechanisms)
            return 0
        print(f"data: {data if args.data else 'RSICD sample JPEGs (224x224) + synthetic regions/negatives'}; "
              f"batch {args.batch_size}, {args.image_size} px, R={args.max_regions}, K={args.hard_negatives}, "
              f"long={args.long_context}, region crops={args.region_crop_size}, local crops={args.local_crops}; "
              f"{os.cpu_count()} CPUs")
        for workers in args.workers:
            result = bench(config, workers=workers, warmup_batches=args.warmup_batches, num_batches=args.num_batches)
            print(f"workers={workers}: {result['examples_per_s']:7.1f} examples/s, "
                  f"{result['examples_per_cpu_s']:7.1f} examples per CPU-second "
                  f"({result['cpu_cores_busy']:.2f} cores busy), decode errors {result['decode_errors']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
