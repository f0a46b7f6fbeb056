"""`tools/bench_data.py --bucket`: the same shards from a GCS bucket (a local emulator on 127.0.0.1) and from
local disk, measured in the same run.

Two numbers per setting and storage:
* records/s per worker of the raw reads alone: grain's read threads call the source (ArrayRecord's own GCS
  reader: one ranged GET per record in flight per thread), no decoding; the storage's share of the cost.
* examples/s per worker of the full pipeline (decode, augment, tokenise, batch) with the same settings.
The ratio bucket/local is printed beside each; "concurrent reads per worker" = grain read threads.

``--mechanisms`` times, in the same run and with the same read threads, the reader a user could pick instead
of ArrayRecord's own: a grain source over gcsfs ranged reads, raw and in the full pipeline (one process). ArrayRecord's Python reader
takes a path only (a local file, or gs:// for its C++ reader), not a Python file object, and no riegeli
parser is installed, so that source is timed as its upper bound: one gcsfs ranged GET per record, of as many
bytes as the record takes in its shard, with no parsing (`RangedReadSource`). A gcsfuse mount cannot run
here (no FUSE in this container). In the pipeline the gcsfs source fetches each record's byte range, then
hands the pipeline that record from the local copy (`RangedThenLocal`): the network and GIL cost of gcsfs,
without the parsing.
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence



sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gcs_emulator  # noqa: E402

BUCKET = "geoalign-bench"


def raw_records_per_s(shards: str, split: str, *, threads: int, buffer_size: int, num_records: int,
                      warmup: int) -> float:
    """Raw records/s of one process reading a shuffled order of the split through grain's read threads."""
    from geoalign_jax.data import sources

    return _records_per_s(sources.RecordSource.from_dir(shards, split, raw=True), threads=threads,
                          buffer_size=buffer_size, num_records=num_records, warmup=warmup)


class RangedReadSource:
    """One gcsfs ranged read per record: record i of a shard is the byte range of its share of the shard's
    size (shares in proportion to the records' lengths), so the bytes and the requests are those of a real
    Python ArrayRecord source, and the time is a lower bound of one (it parses nothing)."""

    def __init__(self, local_shards: Sequence[str], remote_shards: Sequence[str]):
        from geoalign_jax.data import sources

        self._ranges: list[tuple[str, int, int]] = []
        for local, remote in zip(local_shards, remote_shards):
            source = sources.RecordSource([local], raw=True)
            lengths = [len(source[i]) for i in range(len(source))]
            scale = os.path.getsize(local) / sum(lengths)
            start = 0.0
            for length in lengths:
                end = start + length * scale
                self._ranges.append((remote[len("gs://"):], int(start), int(end)))
                start = end
        self._fs = None
        self.stopped = False  # set before the emulator goes: grain's read-ahead threads may still call in

    def __len__(self) -> int:
        return len(self._ranges)

    def __getitem__(self, index: int) -> bytes:
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem("gs")  # data/filesystem.configure() chose the emulator's class
        key, start, end = self._ranges[index]
        return b"" if self.stopped else self._fs.cat_file(key, start=start, end=end)


class RangedThenLocal:
    """The training pipeline's source for the gcsfs mechanism: record i's byte range is fetched with gcsfs (its
    cost), then record i itself comes from the local shards (the parsing a real gcsfs source would do)."""

    def __init__(self, local, ranged: RangedReadSource):
        self._local, self._ranged = local, ranged

    def __len__(self) -> int:
        return len(self._local)

    def __getitem__(self, index: int):
        self._ranged[index]
        return self._local[index]

    def locate(self, index: int) -> tuple[str, int]:
        return self._local.locate(index)


def _records_per_s(source, *, threads: int, buffer_size: int, num_records: int, warmup: int) -> float:
    import grain

    dataset = grain.MapDataset.source(source).seed(0).shuffle().repeat(None)
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer_size)))
    try:
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(num_records):
            next(iterator)
        return num_records / (time.perf_counter() - start)
    finally:
        if hasattr(iterator, "close"):  # stop the read-ahead threads before the emulator goes
            iterator.close()


def _pipeline_examples_per_s(config, bench: Callable[..., dict], source, **options) -> float:
    """examples/s of the full pipeline in one process (workers=0); ``source`` replaces the pipeline's own."""
    from unittest import mock

    from geoalign_jax.data import pipeline

    if source is None:
        return bench(config, workers=0, **options)["examples_per_s"]
    with mock.patch.object(pipeline, "open_train_source", lambda _config: source):
        return bench(config, workers=0, **options)["examples_per_s"]


def compare_mechanisms(config, bench: Callable[..., dict], data: str, remote: str, *, read_threads: Sequence[int],
                       buffer_sizes: Sequence[int], num_records: int, warmup_batches: int, num_batches: int,
                       rounds: int = 3) -> None:
    """Raw records/s and pipeline examples/s per worker from the bucket: ArrayRecord's C++ GCS reader vs gcsfs
    ranged reads, measured alternately ``rounds`` times per setting (medians printed: this machine's load
    moves single runs 3x)."""
    from geoalign_jax.data import filesystem, sources

    split = config.train_split

    filesystem.configure()
    native_source = sources.RecordSource.from_dir(remote, split, raw=True)
    local_paths = sources.shard_paths(data, split)
    ranged = RangedReadSource(local_paths, sources.shard_paths(remote, split))
    ranged_pipeline_source = RangedThenLocal(sources.RecordSource(local_paths, raw=True, unreadable="mark"), ranged)
    for threads in read_threads:
        for buffer_size in buffer_sizes:
            options = dict(threads=threads, buffer_size=buffer_size, num_records=num_records,
                           warmup=buffer_size + threads)
            slow_before = filesystem.RETRIES["slow_record"]
            native, python = [], []
            for _ in range(rounds):
                native.append(_records_per_s(native_source, **options))
                python.append(_records_per_s(ranged, **options))
            n, p = statistics.median(native), statistics.median(python)
            print(f"{threads} concurrent reads per worker, prefetch {buffer_size}: ArrayRecord C++ GCS reader "
                  f"{n:7.1f} records/s ({min(native):.0f}-{max(native):.0f}), gcsfs ranged reads (no parsing) "
                  f"{p:7.1f} ({min(python):.0f}-{max(python):.0f}), C++/gcsfs {n / p:.2f}; C++ reads of 1 s or "
                  f"more (retried by the C++ reader, or slow): {filesystem.RETRIES['slow_record'] - slow_before}; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            trial = config.copy_and_resolve_references()
            trial.read_threads, trial.read_buffer_size = threads, buffer_size
            native_trial = trial.copy_and_resolve_references()
            native_trial.train_shards = remote
            trial.train_shards = data
            native, python, local = [], [], []
            timing = dict(warmup_batches=warmup_batches, num_batches=num_batches)
            for _ in range(rounds):
                native.append(_pipeline_examples_per_s(native_trial, bench, None, **timing))
                python.append(_pipeline_examples_per_s(trial, bench, ranged_pipeline_source, **timing))
                local.append(_pipeline_examples_per_s(trial, bench, None, **timing))
            n, p, d = (statistics.median(rates) for rates in (native, python, local))
            print(f"  pipeline, workers=0: C++ GCS reader {n:6.1f} examples/s ({min(native):.0f}-{max(native):.0f}),"
                  f" gcsfs ranged reads {p:6.1f} ({min(python):.0f}-{max(python):.0f}), local disk {d:6.1f} "
                  f"({min(local):.0f}-{max(local):.0f}); C++/gcsfs {n / p:.2f}, C++/local {n / d:.2f}, gcsfs/local "
                  f"{p / d:.2f}; load {os.getloadavg()[0]:.1f}", flush=True)
    ranged.stopped = True
    time.sleep(1.0)  # let reads already in flight finish while the emulator still answers


def compare(config, data: str, bench: Callable[..., dict], *, workers: Sequence[int], read_threads: Sequence[int],
            buffer_sizes: Sequence[int], warmup_batches: int, num_batches: int, mechanisms: bool = False) -> None:
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
        if mechanisms:
            compare_mechanisms(config, bench, data, remote, read_threads=read_threads, buffer_sizes=buffer_sizes,
                               num_records=num_records, warmup_batches=warmup_batches, num_batches=num_batches)
            return
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

