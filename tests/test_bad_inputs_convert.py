"""Interrupted conversions, in real processes stopped by real signals: SIGINT / SIGTERM leave no file behind
(and no traceback), SIGKILL leaves no manifest, an interrupted --overwrite keeps the old dataset or, once it
has started replacing shards, leaves no manifest; a rerun with --overwrite starts clean.

The child pauses at a chosen point (it prints "paused" and sleeps) through a monkeypatch in its own script,
so the signal lands mid-conversion deterministically, without timing guesses or test hooks in the code."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from bad_files import write_noise_sources
from geoalign_jax.data import prepare_formats, sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COUNT = 12
PER_SHARD = 4  # 3 shards

CHILD = '''
import os, signal, sys, time
from geoalign_jax import prepare
from geoalign_jax.data import prepare_formats, writers

# A test runner started in the background by a non-interactive shell ignores SIGINT, and its children inherit
# that (the converter rightly keeps an ignored signal ignored): give this child the SIGINT of a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

pause_at, jsonl, out, overwrite = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

def pause():
    print("paused", flush=True)
    # Short sleeps: a signal the kernel hands to another thread of the process runs its Python handler at
    # the main thread's next bytecode, which one long sleep would put off.
    for _ in range(1200):
        time.sleep(0.1)

if pause_at == "write":  # after the 6th record: shard 0 closed, shard 1 half written
    real_write = writers._SplitWriter.write
    def write(self, data, *args, **kwargs):
        real_write(self, data, *args, **kwargs)
        if self.count == 6:
            pause()
    writers._SplitWriter.write = write
else:  # "publish": right after the first shard got its final name
    real_replace = os.replace
    def replace(source, target):
        real_replace(source, target)
        if str(target).endswith(".array_record"):
            pause()
    writers.os.replace = replace

sys.exit(prepare.run_cli(lambda: prepare_formats.prepare_jsonl(
    jsonl, out, name="noise", records_per_shard=%d, overwrite=overwrite, progress=False, workers=1)))
''' % PER_SHARD


@pytest.fixture(scope="module")
def sources_a_b(tmp_path_factory):
    """Two inputs with the same images and different captions: a dataset and its replacement."""
    root = tmp_path_factory.mktemp("inputs")
    return (write_noise_sources(root / "a", count=COUNT, image_size=16, caption="first version"),
            write_noise_sources(root / "b", count=COUNT, image_size=16, caption="second version"))


def _start_paused(tmp_path, pause_at, jsonl, out, overwrite=False) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    process = subprocess.Popen(
        [sys.executable, str(script), pause_at, str(jsonl), str(out), "1" if overwrite else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    line = process.stdout.readline()
    if line.strip() != "paused":
        process.kill()
        raise AssertionError(f"the child did not reach its pause: {line!r} {process.stderr.read()}")
    return process


def _stop(process, signum) -> tuple[int, str]:
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def _captions(out) -> list[str]:
    source = sources.RecordSource.from_dir(out, "train")
    return [source[index]["captions"][0] for index in range(len(source))]


def _convert(jsonl, out, overwrite=False):
    return prepare_formats.prepare_jsonl(jsonl, out, name="noise", records_per_shard=PER_SHARD, overwrite=overwrite,
                                    progress=False)


def _listed_files(out) -> set[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest.json", *(s for split in manifest["splits"].values() for s in split["shards"]),
            *(s for names in manifest["image_hashes"].values() for s in names)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_conversion_leaves_nothing_and_one_line(sources_a_b, tmp_path, signum):
    out = tmp_path / "out"
    process = _start_paused(tmp_path, "write", sources_a_b[0], out)
    assert any(out.iterdir())  # mid-way: temporary shards exist
    code, err = _stop(process, signum)
    assert code == 128 + signum
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: conversion interrupted ({signal.Signals(signum).name}); the new dataset was not written "
        "(no manifest.json for it); run the same command again"]
    assert not out.exists()  # the folder it created is removed with the temporary shards


def test_a_killed_conversion_leaves_no_manifest_and_a_rerun_starts_clean(sources_a_b, tmp_path):
    out = tmp_path / "out"
    code, _ = _stop(_start_paused(tmp_path, "write", sources_a_b[0], out), signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = sorted(os.listdir(out))
    assert left and "manifest.json" not in left and all(name.startswith(".tmp-") for name in left)
    with pytest.raises(sources.SourceError, match="no manifest.json"):
        sources.shard_paths(out, "train")
    _convert(sources_a_b[0], out)  # no dataset there yet: no --overwrite needed; the leftovers go
    assert set(os.listdir(out)) == _listed_files(out)
    assert _captions(out) == [f"first version {i}" for i in range(COUNT)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_overwrite_interrupted_while_writing_keeps_the_old_dataset(sources_a_b, tmp_path, signum):
    out = tmp_path / "out"
    _convert(sources_a_b[0], out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    _stop(_start_paused(tmp_path, "write", sources_a_b[1], out, overwrite=True), signum)
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    assert _captions(out) == [f"first version {i}" for i in range(COUNT)]
    _convert(sources_a_b[1], out, overwrite=True)
    assert set(os.listdir(out)) == _listed_files(out)
    assert _captions(out) == [f"second version {i}" for i in range(COUNT)]


def test_a_kill_while_shards_are_renamed_leaves_no_manifest(sources_a_b, tmp_path):
    """The replacement has the same shard names: once one is renamed over an old one, the old manifest would
    describe a mix of both datasets; it must be gone by then."""
    out = tmp_path / "out"
    _convert(sources_a_b[0], out)
    old_shards = sorted(_listed_files(out) - {"manifest.json"})
    _stop(_start_paused(tmp_path, "publish", sources_a_b[1], out, overwrite=True), signal.SIGKILL)
    left = set(os.listdir(out))
    assert "manifest.json" not in left and set(old_shards) <= left  # one new shard in place, old ones around
    with pytest.raises(sources.SourceError, match=r"\.prepare-unfinished is there\), so its shards may mix"):
        sources.shard_paths(str(out / "*.array_record"), "train")  # a glob of them is refused as well
    with pytest.raises(prepare_formats.ConversionError, match=r"3 shards of 'noise' without a manifest.json .*--overwrite"):
        _convert(sources_a_b[1], out)
    _convert(sources_a_b[1], out, overwrite=True)
    assert set(os.listdir(out)) == _listed_files(out)
    assert _captions(out) == [f"second version {i}" for i in range(COUNT)]


def test_conversion_workers_leave_sigint_and_sigterm_to_the_parent():
    """A scheduler's SIGTERM (or Ctrl-C) reaches the whole process group. A worker it killed while sending a
    result would leave half a message in the pool's pipe, and the parent would wait for the rest forever
    instead of cleaning up; so workers ignore both and the parent stops them (measured before this: 5 of 8
    conversions with --workers 2 hung on a process-group SIGTERM)."""
    from geoalign_jax.data import parallel_map

    handlers = list(parallel_map.ordered_parallel_map(signal.getsignal, [signal.SIGINT, signal.SIGTERM], workers=2))
    assert handlers == [signal.SIG_IGN, signal.SIG_IGN]


def test_a_rerun_removes_a_temporary_sidecar_whose_shard_was_already_renamed(sources_a_b, tmp_path):
    """A kill between a shard's rename and its sidecar's leaves the temporary sidecar alone; a rerun that
    writes fewer shards does not reuse its name, so it must be removed by name, like temporary shards."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-noise-train-00007.hashes.npy").write_bytes(b"left by a kill")
    _convert(sources_a_b[0], out)
    assert set(os.listdir(out)) == _listed_files(out)
