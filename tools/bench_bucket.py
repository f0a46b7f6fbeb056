"""`tools/bench_data.py --bucket`: the same shards from a GCS bucket (a local emulator on 127.0.0.1) and from
local disk, measured in the same run.

Two numbers per setting and storage:
* records/s per worker of the raw reads alone: grain's read threads call the source (ArrayRecord's own GCS
  reader: one ranged GET per record in flight per thread), no decoding; the storage's share of the cost.
* examples/s per worker of the full pipeline (decode, augment, tokenise, batch) with the same settings.
The ratio bucket/local is printed beside each; "concurrent reads per worker" = grain read threads.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence



sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gcs_emulator  # noqa: E402

BUCKET = "geoalign-bench"


def raw_records_per_s(shards: str, split: str, *, threads: int, buffer_size: int, num_records: int,
                      warmup: int) -> float:
    """Raw records/s of one process reading a shuffled order of the split through grain's read threads."""
    import grain

    from geoalign_jax.data import sources

    source = sources.RecordSource.from_dir(shards, split, raw=True)
    dataset = grain.MapDataset.source(source).seed(0).shuffle().repeat(None)
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer_size)))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_records):
        next(iterator)
    return num_records / (time.perf_counter() - start)


def compare(config, data: str, bench: Callable[..., dict], *, workers: Sequence[int], read_threads: Sequence[int],
            buffer_sizes: Sequence[int], warmup_batches: int, num_batches: int) -> None:
    import gcsfs.core

    from geoalign_jax.data import filesystem

    with gcs_emulator.running_emulator(BUCKET) as endpoint:
        os.environ[filesystem.EMULATOR_ENV] = endpoint
        os.environ[filesystem.NATIVE_EMULATOR_ENV] = endpoint
        uploader = gcsfs.core.GCSFileSystem(endpoint_url=endpoint, token="anon")
        uploader.put(data, f"{BUCKET}/bench", recursive=True)
        remote = f"gs://{BUCKET}/bench"
        print(f"bucket: {remote} on the gcp-storage-emulator at {endpoint} (loopback); load: "
              f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
        num_records = max(200, num_batches * int(config.batch_size))
        for threads in read_threads:
            for buffer_size in buffer_sizes:
                rates = {name: raw_records_per_s(where, config.train_split, threads=threads, buffer_size=buffer_size,
                                                 num_records=num_records, warmup=buffer_size + threads)
                         for name, where in (("local", data), ("bucket", remote))}
                print(f"raw reads, {threads} concurrent reads per worker, prefetch {buffer_size}: local "
                      f"{rates['local']:8.1f} records/s, bucket {rates['bucket']:8.1f} records/s, bucket/local "
                      f"{rates['bucket'] / rates['local']:.2f}", flush=True)
                for count in workers:
                    results = {}
                    for name, where in (("local", data), ("bucket", remote)):
                        trial = config.copy_and_resolve_references()
                        trial.train_shards = where
                        trial.read_threads = threads
                        trial.read_buffer_size = buffer_size
                        results[name] = bench(trial, workers=count, warmup_batches=warmup_batches,
                                              num_batches=num_batches)
                    per_worker = max(count, 1)
                    local, bucket = (results[n]["examples_per_s"] / per_worker for n in ("local", "bucket"))
                    print(f"  pipeline, workers={count}: local {local:7.1f} examples/s per worker, bucket "
                          f"{bucket:7.1f}, bucket/local {bucket / local:.2f} (decode errors "
                          f"{results['bucket']['decode_errors']})", flush=True)
        print(f"retries counted by geoalign_jax.data.filesystem in this process: {dict(filesystem.RETRIES)}")

