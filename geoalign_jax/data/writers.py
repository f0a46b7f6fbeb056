"""The shard writer of dataset preparation: records built in parallel (`record_builder`, `parallel_map`) are
written to shards with their fingerprint sidecars, then the manifest and the summary (skip accounting: `skip_accounting`).

Why one place: every converter must behave the same way on bad input (skip, count, name the file, fail past
a bad fraction), write byte-identical shards whatever the worker count, and leave either a complete output
(shards + manifest.json) or none. Converters only turn their annotation files into `ImageTask`s.

Interrupted conversions: shards are written under temporary names and the manifest, written last and
atomically (temp + rename, after every shard is on disk), is what makes a folder a dataset. SIGINT and
SIGTERM remove the temporary shards (`ConversionInterrupted`); after a SIGKILL or a power cut the folder
holds no manifest (an overwritten dataset's manifest is removed before its shards are replaced) but holds
`records.UNFINISHED_NAME` (so a shard glob refuses it too: data/glob_check.py), and the next run cleans the
leftovers (`--overwrite` for shards already renamed into place).

This module never imports jax: worker processes are started with 'spawn', and jax must not be forked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from geoalign_jax.data import fingerprints, records, text_stats
from geoalign_jax.data.output_folder import leaves_no_empty_folder
from geoalign_jax.data.parallel_map import ordered_parallel_map
from geoalign_jax.data.record_builder import BuildOptions, ImageTask, RecordBuilder
from geoalign_jax.data.skip_accounting import ConversionError, SkipLog



class ConversionInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a conversion; the temporary shards were removed and no manifest was written.
    A KeyboardInterrupt, so code that already stops on Ctrl-C stops on it too."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """While writing, SIGINT and SIGTERM raise ConversionInterrupted (SIGTERM's default would end the process
    without cleaning up). Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise ConversionInterrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}  # an ignored signal (nohup) stays ignored
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# ---------------------------------------------------------------------------------------------------------
# Sharded writing, manifest and summary

MANIFEST_NAME = "manifest.json"


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    """`<name>-<split>-00000-of-00004.array_record`, the shard naming every reader expects."""
    return f"{name}-{split}-{index:05d}-of-{num_shards:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class ShardingOptions:
    """Either a fixed number of shards per split (`num_shards`) or a target `records_per_shard`."""

    num_shards: int | None = None
    records_per_shard: int | None = None
    writer_options: str = "group_size:1"  # group_size:1 = random access, which grain needs

    def records_per_shard_for(self, expected_records: int) -> int:
        if self.records_per_shard is not None:
            return max(1, self.records_per_shard)
        num_shards = self.num_shards or 1
        return max(1, math.ceil(expected_records / num_shards))


def _temp_shard_name(name: str, split: str, index: int) -> str:
    return f".tmp-{name}-{split}-{index:05d}.array_record"


def _fsync(path: pathlib.Path) -> None:
    """Flush a file, or a folder's entries, to disk: the manifest must never reach the disk before its shards
    (a crash would leave a dataset that looks complete). Filesystems that cannot fsync a folder are let be."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class _SplitWriter:
    """Writes one split's records to consecutive temporary shards, each with its fingerprint sidecar
    (`fingerprints.sidecar_path`); both are renamed once the final count is known."""

    def __init__(self, out_dir: pathlib.Path, name: str, split: str, records_per_shard: int, writer_options: str):
        self.out_dir, self.name, self.split = out_dir, name, split
        self.records_per_shard = records_per_shard
        self.writer_options = writer_options
        self.count = 0
        self.temp_paths: list[pathlib.Path] = []
        self.sidecar_names: list[str] = []
        self.tokens = text_stats.TokenHistogram()
        self._writer = None
        self._fingerprints: list[tuple[bytes, int]] = []

    def write(self, data: bytes, fingerprint: tuple[bytes, int],
              token_counts: Mapping[str, Sequence[int]] | None = None) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.count % self.records_per_shard == 0:
            self._close_current()
            path = self.out_dir / _temp_shard_name(self.name, self.split, len(self.temp_paths))
            self.temp_paths.append(path)
            self._writer = ArrayRecordWriter(str(path), self.writer_options)
        self._writer.write(data)
        self._fingerprints.append(fingerprint)
        self.tokens.add(token_counts or {})
        self.count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            sidecar = fingerprints.sidecar_path(self.temp_paths[-1])
            fingerprints.write_sidecar(sidecar, fingerprints.fingerprint_rows(self._fingerprints))
            self._fingerprints = []

    def close(self) -> None:
        """Close the last shard and flush every shard and its sidecar to disk (before any manifest may name them)."""
        self._close_current()
        for temp in self.temp_paths:
            _fsync(temp)
            _fsync(fingerprints.sidecar_path(temp))

    def publish(self) -> list[str]:
        """Rename the closed shards (and their sidecars) to the final `-of-N` names; returns the shard names
        relative to out_dir (the sidecar names are left in `sidecar_names`, same order)."""
        names = []
        for index, temp in enumerate(self.temp_paths):
            final = shard_name(self.name, self.split, index, len(self.temp_paths))
            os.replace(temp, self.out_dir / final)
            sidecar = fingerprints.sidecar_path(self.out_dir / final)
            os.replace(fingerprints.sidecar_path(temp), sidecar)
            names.append(final)
            self.sidecar_names.append(sidecar.name)
        return names

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for temp in self.temp_paths:
            temp.unlink(missing_ok=True)
            fingerprints.sidecar_path(temp).unlink(missing_ok=True)


@dataclasses.dataclass
class ConversionSummary:
    """What a conversion wrote and skipped; `format()` is the report the CLIs print."""

    name: str
    out_dir: str
    written: dict[str, int]
    shards: dict[str, list[str]]
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]]
    records_seen: int
    records_skipped: int
    annotations_seen: int
    annotations_skipped: int
    max_bad_fraction: float
    failed: bool = False
    #: per split, the token counts of the written records' texts (what a CLIP context would cut)
    text_tokens: dict[str, text_stats.TokenHistogram] = dataclasses.field(default_factory=dict)

    def all_text_tokens(self) -> text_stats.TokenHistogram:
        """The token histogram over all splits."""
        total = text_stats.TokenHistogram()
        for histogram in self.text_tokens.values():
            total.update(histogram)
        return total

    def truncation(self) -> dict[str, dict[str, float]]:
        """Over all splits: per kind of text, how many are longer than their usual context (77 / 248 tokens)."""
        return self.all_text_tokens().truncation()

    def format(self) -> str:
        total = sum(self.written.values())
        if self.failed:
            lines = [f"{self.name}: built {total} records, NOTHING written to {self.out_dir} (too much bad input)"]
        else:
            lines = [f"{self.name}: wrote {total} records to {self.out_dir}"]
        for split, count in sorted(self.written.items()):
            lines.append(f"  {split}: {count} records in {len(self.shards.get(split, []))} shards")
        lines.append(
            f"  skipped {self.records_skipped} of {self.records_seen} inputs, "
            f"{self.annotations_skipped} of {self.annotations_seen} annotations "
            f"(max bad fraction {self.max_bad_fraction:g})"
        )
        for reason, count in sorted(self.skipped.items()):
            examples = ", ".join(self.skipped_examples.get(reason, []))
            more = " ..." if count > len(self.skipped_examples.get(reason, [])) else ""
            lines.append(f"    {reason}: {count} (e.g. {examples}{more})")
        lines.append("  texts longer than the context (cut in training): "
                     + text_stats.format_truncation(self.all_text_tokens()))
        return "\n".join(lines)


def _check_bad_fraction(log: SkipLog, max_bad_fraction: float) -> str | None:
    problems = []
    if log.record_fraction() > max_bad_fraction:
        problems.append(f"{log.records_skipped} of {log.records_seen} inputs skipped ({log.record_fraction():.1%})")
    if log.annotation_fraction() > max_bad_fraction:
        problems.append(
            f"{log.annotations_skipped} of {log.annotations_seen} annotations skipped ({log.annotation_fraction():.1%})"
        )
    if log.records_seen == 0:
        problems.append("no inputs found")
    elif log.records_seen == log.records_skipped:
        problems.append("every input was skipped")
    if not problems:
        return None
    return "; ".join(problems) + f" (allowed bad fraction: {max_bad_fraction:g}, --max-bad-fraction)"


def _old_shards(out_dir: pathlib.Path, overwrite: bool) -> list[str] | None:
    """Create out_dir; the shards an existing conversion there lists, or None when there is none.

    An existing dataset is refused without `overwrite`; with it, nothing is deleted here: the old shards are
    removed only after the new dataset has been written completely (see `_remove_stale_shards`), so a
    conversion that fails leaves the old dataset as it was.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    if not overwrite:
        raise ConversionError(f"{manifest_path} exists: pass overwrite=True (--overwrite) to replace that dataset")
    try:
        old = json.loads(manifest_path.read_text())
        shards = [s for split in old.get("splits", {}).values() for s in split.get("shards", [])]
        return shards + [s for names in (old.get("image_hashes") or {}).values() for s in names]
    except (OSError, ValueError, AttributeError) as error:
        raise ConversionError(f"{manifest_path} is unreadable ({error}); remove it by hand") from None


def _dataset_shards(out_dir: pathlib.Path, name: str) -> list[str]:
    """The files in out_dir named like shards of dataset `name` (`<name>-<split>-NNNNN-of-NNNNN.array_record`)."""
    from geoalign_jax.data.sources import parse_shard_name

    return sorted(entry.name for entry in out_dir.iterdir()
                  if entry.is_file() and (parse_shard_name(entry.name) or ("",))[0] == name)


def _clean_unfinished(out_dir: pathlib.Path, name: str, has_manifest: bool, overwrite: bool) -> None:
    """Remove what an interrupted conversion of `name` left in out_dir: its temporary shards and manifest
    always (they are never part of a dataset); without a manifest, shards already renamed into place too, but
    only with `overwrite` (they may be bare shards someone copied there)."""
    # a temporary shard (see _temp_shard_name) or its sidecar, also one whose shard a kill let be renamed
    temp_file = re.compile(rf"^\.tmp-{re.escape(name)}-[^-]+-\d{{5}}"
                           rf"({re.escape(fingerprints.SHARD_SUFFIX)}|{re.escape(fingerprints.SIDECAR_SUFFIX)})$")
    for entry in out_dir.iterdir():
        if entry.name == f".tmp-{MANIFEST_NAME}" or temp_file.match(entry.name):
            entry.unlink(missing_ok=True)
            fingerprints.sidecar_path(entry).unlink(missing_ok=True)
    if has_manifest:
        return
    unfinished = _dataset_shards(out_dir, name)
    if unfinished and not overwrite:
        raise ConversionError(
            f"{out_dir} holds {len(unfinished)} shards of {name!r} without a {MANIFEST_NAME} (an interrupted "
            f"conversion?), e.g. {unfinished[0]}: pass overwrite=True (--overwrite) to replace them")
    for shard in unfinished:
        (out_dir / shard).unlink(missing_ok=True)
        fingerprints.sidecar_path(out_dir / shard).unlink(missing_ok=True)


def _remove_stale_shards(out_dir: pathlib.Path, name: str, old_shards: Sequence[str],
                         new_shards: Iterable[str]) -> None:
    """Delete the shards of the replaced dataset and of interrupted runs that the new manifest does not list:
    those the old manifest listed, and every file named like a shard of `name` (never anything outside out_dir)."""
    keep = set(new_shards)
    root = out_dir.resolve()
    for shard in [*old_shards, *_dataset_shards(out_dir, name)]:
        if not isinstance(shard, str) or shard in keep:
            continue
        target = (out_dir / shard).resolve()
        if target.parent == root:  # whatever the old manifest says
            target.unlink(missing_ok=True)
            fingerprints.sidecar_path(target).unlink(missing_ok=True)


def check_split_name(split: Any) -> str:
    """A split name usable in `<name>-<split>-NNNNN-of-NNNNN.array_record`: non-empty, no "-" (readers take the
    last "-" field before the numbering as the split), no path separator, not hidden."""
    if not isinstance(split, str) or not split or any(ch in split for ch in "-/\\") or split.startswith("."):
        raise ConversionError(
            f"split name {split!r} cannot be used: split names must be non-empty and contain no '-', '/' or '\\' "
            "(shards are named <name>-<split>-NNNNN-of-NNNNN.array_record); rename the split, e.g. 'val_2'"
        )
    return split


@leaves_no_empty_folder
@_interrupts_raise()
def write_dataset(
    tasks: Iterable[ImageTask],
    out_dir: str | os.PathLike,
    *,
    name: str,
    created_by: str,
    skip_log: SkipLog | None = None,
    workers: int = 1,
    sharding: ShardingOptions = ShardingOptions(),
    build_options: BuildOptions = BuildOptions(),
    max_bad_fraction: float = 0.05,
    manifest_extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    expected_counts: Mapping[str, int] | None = None,
) -> ConversionSummary:
    """Build the tasks in parallel, write them in task order to sharded ArrayRecord files and a manifest.

    `skip_log` carries what the converter already dropped while reading its annotation files (malformed
    lines, ...). `tasks` may be a lazy iterable (bounded memory for big sources) when `expected_counts`
    gives the number of tasks per split (it sizes the shards). The output is the same for any `workers`. When
    the bad fraction is exceeded (or anything fails) no new file is left behind and ConversionError carries the
    summary. With `overwrite`, an existing dataset in `out_dir` stays untouched until the new shards are all
    written (under temporary names, flushed to disk); then its manifest is removed, the new shards are renamed
    into place, the new manifest is written atomically, and only then are shards it does not list deleted.
    So the folder never holds a manifest whose shards are not all there. SIGINT / SIGTERM raise
    ConversionInterrupted after removing the temporary shards; what a killed run leaves, the next run removes.
    """
    from tqdm import tqdm

    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise ConversionError(f"dataset name {name!r} must be a plain file-name prefix")
    out_path = pathlib.Path(out_dir)
    old_shards = _old_shards(out_path, overwrite)
    _clean_unfinished(out_path, name, old_shards is not None, overwrite)
    log = skip_log or SkipLog()
    if expected_counts is None:
        tasks = list(tasks)
        expected_counts = Counter(task.split for task in tasks)
    expected = dict(expected_counts)
    for split in expected:
        check_split_name(split)
    writers = {
        split: _SplitWriter(out_path, name, split, sharding.records_per_shard_for(count), sharding.writer_options)
        for split, count in sorted(expected.items())
    }
    try:
        results = ordered_parallel_map(RecordBuilder(build_options), tasks, workers)
        bar = tqdm(results, total=sum(expected.values()), desc=f"converting {name}", unit="img", disable=not progress,
                   file=sys.stderr)
        for result in bar:
            log.records_seen += 1
            log.annotations_seen += result.annotations_seen
            for skip in result.skips:
                log.add(skip)
            if result.record is not None:
                if result.split not in writers:
                    raise ConversionError(f"task of split {result.split!r} not announced in expected_counts")
                writers[result.split].write(result.record, result.fingerprint, result.token_counts)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    summary = ConversionSummary(
        name=name, out_dir=str(out_path), written={s: w.count for s, w in writers.items() if w.count},
        shards={}, skipped=dict(log.counts), skipped_examples={k: list(v) for k, v in log.examples.items()},
        records_seen=log.records_seen, records_skipped=log.records_skipped,
        annotations_seen=log.annotations_seen, annotations_skipped=log.annotations_skipped,
        max_bad_fraction=max_bad_fraction,
        text_tokens={s: w.tokens for s, w in writers.items() if w.count},
    )
    problem = _check_bad_fraction(log, max_bad_fraction)
    if problem is not None:
        summary.failed = True
        for writer in writers.values():
            writer.abort()
        raise ConversionError(f"{name}: {problem}; nothing written.\n{summary.format()}", summary)
    for writer in writers.values():
        writer.close()
    # From here until the new manifest is in place the folder may mix old and new shards: the marker makes a
    # shard glob refuse it (data/glob_check.py), the missing manifest makes reading the folder refused.
    (out_path / records.UNFINISHED_NAME).write_bytes(b"")
    _fsync(out_path)
    if old_shards is not None:
        (out_path / MANIFEST_NAME).unlink(missing_ok=True)
        _fsync(out_path)
    summary.shards = {split: writer.publish() for split, writer in writers.items() if writer.count}
    manifest = {
        "format": records.FORMAT_NAME,
        "version": records.FORMAT_VERSION,
        "name": name,
        "splits": {split: {"count": summary.written[split], "shards": summary.shards[split]}
                   for split in sorted(summary.shards)},
        "skipped": dict(sorted(summary.skipped.items())),
        "skipped_examples": dict(sorted(summary.skipped_examples.items())),
        "inputs": {"seen": log.records_seen, "skipped": log.records_skipped},
        "annotations": {"seen": log.annotations_seen, "skipped": log.annotations_skipped},
        "class_names": [],
        "created_by": created_by,
        "image_hashes": {split: writers[split].sidecar_names for split in sorted(summary.shards)},
        "text_tokens": {split: summary.text_tokens[split].to_json() for split in sorted(summary.shards)},
        "truncation": {split: summary.text_tokens[split].truncation() for split in sorted(summary.shards)},
    }
    manifest.update(manifest_extra or {})
    manifest_path = out_path / MANIFEST_NAME
    temp_manifest = out_path / f".tmp-{MANIFEST_NAME}"
    temp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _fsync(temp_manifest)
    os.replace(temp_manifest, manifest_path)
    (out_path / records.UNFINISHED_NAME).unlink()
    _fsync(out_path)
    _remove_stale_shards(out_path, name, old_shards or [],
                         [*(s for names in summary.shards.values() for s in names),
                          *(s for writer in writers.values() for s in writer.sidecar_names)])
    return summary
