"""Damaged record shards at every entry point that reads them: the training pipeline skips and counts an
unreadable record (and refuses a shard it cannot open when it is built); evaluation names the shard, the
record and the task, or skips and counts with --skip_bad_records. The damage is made here, on tiny data."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from bad_files import make_noise_dataset, truncate, unreadable_indices, wrong_magic, zero_block
from data_fixtures import small_data_config
from geoalign_jax.data import pipeline, records, sources
from geoalign_jax.eval import datasets
from geoalign_jax.evaluate import main as evaluate_main

COUNT = 40


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """40 noise images with captions and labels, in two shards of 20 records."""
    return make_noise_dataset(tmp_path_factory.mktemp("noise"), count=COUNT, num_shards=2)


@pytest.fixture(scope="module")
def damaged(clean, tmp_path_factory):
    """A copy with 20 KB zeroed inside the record data of the second shard: (folder, that shard, global
    indices of the records array_record itself cannot read). The shard is padded to whole 64 KiB blocks after
    its footer, so the block goes at 30% of the file, among the records."""
    folder = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(clean, folder)
    first, second = sources.shard_paths(folder, "train")
    zero_block(second, at=0.3)
    offset = sources.check_shard(first)
    bad = [offset + index for index in unreadable_indices(second)]
    assert 0 < len(bad) < 10 and bad[-1] < COUNT - 1  # a few records, not the last one
    return folder, second, bad


def _config(train_shards, **overrides):
    """data_fixtures.small_data_config with one example per batch and a smaller read buffer by default."""
    return small_data_config(train_shards, **{"batch_size": 1, "read_buffer_size": 4, **overrides})


def _one_epoch_in_order(folder):
    config = _config(folder, shuffle=False, num_epochs=1)
    return list(pipeline.make_train_iterator(config, process_index=0, process_count=1))


# ---------------------------------------------------------------------------------------------------------
# Training pipeline


def test_pipeline_skips_counts_and_logs_each_unreadable_record_once(clean, damaged, caplog):
    folder, shard, bad = damaged
    expected = [batch["text"] for index, batch in enumerate(_one_epoch_in_order(clean)) if index not in bad]
    with caplog.at_level(logging.WARNING, logger="geoalign_jax.data.pipeline"):
        batches = _one_epoch_in_order(folder)
    # every readable record, its neighbours included, in order; the unreadable ones counted
    assert len(batches) == COUNT - len(bad)
    for got, want in zip(batches, expected):
        np.testing.assert_array_equal(got["text"], want)
    assert int(batches[-1]["decode_errors"]) == len(bad)
    logged = [r.getMessage() for r in caplog.records if "unreadable record" in r.getMessage()]
    offset = COUNT // 2
    assert len(logged) == len(bad)
    for index in bad:
        assert sum(f"{shard} record {index - offset}:" in line for line in logged) == 1
    assert all("hash mismatch" in line for line in logged)


def test_iterator_state_stays_exact_across_unreadable_records(damaged):
    folder, _, bad = damaged
    config = _config(folder, batch_size=4, shuffle=True, num_epochs=None)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    first = pipeline.take(iterator, 10)
    state = pipeline.iterator_state(iterator)
    rest = pipeline.take(iterator, 10)
    assert int(rest[-1]["decode_errors"]) >= 2 * len(bad)  # 80 examples: two epochs went past every bad one
    resumed = pipeline.make_train_iterator(config, process_index=0, process_count=1, state=state)
    again = pipeline.take(resumed, 10)
    assert int(first[-1]["decode_errors"]) < int(rest[-1]["decode_errors"])
    for a, b in zip(rest, again):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_batched_read_falls_back_to_single_records(clean, damaged):
    folder, shard, bad = damaged
    good = sources.RecordSource.from_dir(clean, "train", raw=True)
    marked = sources.RecordSource.from_dir(folder, "train", raw=True, unreadable="mark")
    items = marked.__getitems__(list(range(COUNT)))
    assert [i for i, item in enumerate(items) if isinstance(item, sources.UnreadableRecord)] == bad
    assert all(items[i] == good[i] for i in range(COUNT) if i not in bad)
    assert items[bad[0]].where == f"{shard} record {bad[0] - COUNT // 2}"

    strict = sources.RecordSource.from_dir(folder, "train")
    with pytest.raises(sources.RecordReadError) as error:
        strict.__getitems__([0, bad[0], COUNT - 1])
    message = str(error.value)
    assert f"{shard} record {bad[0] - COUNT // 2}: cannot be read" in message
    assert "python -m geoalign_jax.prepare jsonl" in message and "--overwrite" in message and "\n" not in message
    assert isinstance(error.value, records.RecordError)


def test_a_shard_cut_short_after_the_source_was_built_marks_its_records(clean, tmp_path):
    """A short read: the file shrank under a running source (a copy replaced mid-run); its records come back
    marked, the other shard's records are read as before. (The shard's record count can no longer be read,
    so the mark names the record's global index and the shards.)"""
    folder = tmp_path / "data"
    shutil.copytree(clean, folder)
    source = sources.RecordSource.from_dir(folder, "train", raw=True, unreadable="mark")
    first, second = source.paths
    truncate(second)
    items = [source[index] for index in range(COUNT)]
    assert not any(isinstance(item, sources.UnreadableRecord) for item in items[:COUNT // 2])
    marked = items[COUNT // 2:]
    assert all(isinstance(item, sources.UnreadableRecord) for item in marked)
    assert [item.where.split(" of the shards")[0] for item in marked] == [f"record {i}" for i in range(20, COUNT)]
    assert all(second in item.where and "cannot be read" in item.reason for item in marked)


def _not_an_array_record(path):
    with open(path, "wb") as handle:
        handle.write(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("damage", [truncate, _not_an_array_record, os.remove,
                                    lambda path: open(path, "w").write("not a shard")],
                         ids=["truncated", "random bytes", "missing", "small text file"])
def test_a_shard_that_cannot_be_opened_fails_when_the_pipeline_is_built(clean, tmp_path, damage):
    folder = tmp_path / "data"
    shutil.copytree(clean, folder)
    shard = sources.shard_paths(folder, "train")[1]
    damage(shard)
    with pytest.raises(sources.SourceError) as error:
        pipeline.make_train_dataset(_config(folder), process_index=0, process_count=1)  # nothing iterated
    message = str(error.value)
    assert shard in message and str(sources.shard_paths(clean, "train")[0]) not in message
    assert f"python -m geoalign_jax.prepare jsonl ... --out {folder} --overwrite" in message
    assert "\n" not in message


def test_a_zeroed_header_alone_still_reads(clean, tmp_path):
    """The reader goes by the footer's index, so a zeroed file signature loses nothing: not an error."""
    folder = tmp_path / "data"
    shutil.copytree(clean, folder)
    wrong_magic(sources.shard_paths(folder, "train")[0])
    assert [len(sources.RecordSource.from_dir(folder, "train")[i]["image"]) for i in range(COUNT)] == \
        [len(sources.RecordSource.from_dir(clean, "train")[i]["image"]) for i in range(COUNT)]


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error")]


def test_evaluate_names_the_shard_record_and_task_of_an_unreadable_record(damaged, tmp_path, capsys):
    folder, shard, bad = damaged
    code = evaluate_main(["--model", "tiny", "--allow-train-split", "--tasks", f"zeroshot:noise={folder}", "--out", str(tmp_path / "out"),
                          "--no_progress", "--no_plots"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert f"task zeroshot:noise: {shard} record {bad[0] - COUNT // 2}: cannot be read" in line
    assert "--skip-bad-records" in line
    assert not (tmp_path / "out" / "results.json").exists()


def test_evaluate_with_skip_bad_records_counts_them_in_results(damaged, tmp_path):
    folder, _, bad = damaged
    out = tmp_path / "out"
    assert evaluate_main(["--model", "tiny", "--allow-train-split", "--tasks", f"zeroshot:noise={folder}", "--out", str(out),
                          "--no_progress", "--no_plots", "--skip_bad_records", "--batch_size", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["zeroshot/noise/skipped/unreadable_records"] == len(bad)
    assert results["run"]["skip_bad_records"] is True
    assert f"({COUNT - len(bad)} images" in results["details"]["zeroshot/noise"]["description"]


def test_every_eval_loader_raises_or_skips_and_counts(damaged):
    folder, shard, bad = damaged
    for load in (datasets.load_retrieval, datasets.load_classification):
        with pytest.raises(datasets.EvalDataError, match=f"record {bad[0] - COUNT // 2}: cannot be read"):
            load(folder)
        assert load(folder, skip_bad_records=True).skipped == {datasets.UNREADABLE_RECORDS: len(bad)}
    retrieval = datasets.load_retrieval(folder, skip_bad_records=True)
    assert len(retrieval.captions) == COUNT - len(bad)
    assert f"noise picture number {bad[0]}" not in [c for captions in retrieval.captions for c in captions]


def test_evaluate_names_a_shard_it_cannot_open(clean, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(clean, folder)
    shard = sources.shard_paths(folder, "train")[0]
    truncate(shard)
    code = evaluate_main(["--model", "tiny", "--allow-train-split", "--tasks", f"retrieval:noise={folder}", "--out", str(tmp_path / "out"),
                          "--no_progress", "--no_plots"])
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: task retrieval:noise: shard {shard} cannot be opened")


def _shard_without_sidecar(shard):
    from geoalign_jax.data import fingerprints

    os.remove(fingerprints.sidecar_path(shard))


@pytest.mark.parametrize("damage", ["cannot be opened", "unreadable record, no sidecar"])
def test_evaluate_names_a_damaged_training_shard_given_as_train_data(clean, damaged, tmp_path, capsys, damage):
    """--train-data reads the training shards to fingerprint them (sidecars, else the images): a damaged one
    is one line naming it, exit 2, like a damaged evaluation shard."""
    folder = tmp_path / "train"
    if damage == "cannot be opened":
        shutil.copytree(clean, folder)
        shard = sources.shard_paths(folder, "train")[1]
        truncate(shard)
        words = f"training data: shard {shard} cannot be opened"
    else:
        shutil.copytree(damaged[0], folder)
        shard = sources.shard_paths(folder, "train")[1]
        _shard_without_sidecar(shard)
        words = f"training data: {shard} record {damaged[2][0] - COUNT // 2}: cannot be read"
    code = evaluate_main(["--model", "tiny", "--allow-train-split", "--tasks", f"zeroshot:noise={clean}",
                          "--train-data", str(folder), "--out", str(tmp_path / "out"), "--no_progress", "--no_plots"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"error: {words}") and "--overwrite" in line


def test_an_overlap_with_an_unreadable_training_record_is_still_reported(clean, damaged, tmp_path):
    """The sidecar still fingerprints the unreadable training records, so the overlap is found; their
    description cannot read the record's id, and says so instead of failing the evaluation."""
    folder, shard, bad = damaged
    out = tmp_path / "out"
    assert evaluate_main(["--model", "tiny", "--allow-train-split", "--tasks", f"zeroshot:noise={clean}",
                          "--train-data", str(folder), "--out", str(out), "--no_progress", "--no_plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["zeroshot/noise/overlap/exact"] == COUNT
    described = {match["train"] for match in results["provenance"]["tasks"]["zeroshot/noise"]["overlap"]["images"]}
    assert {f"{shard} record {index - COUNT // 2} (id unreadable)" for index in bad} <= described
    assert sum("(id unreadable)" in text for text in described) == len(bad)


def test_a_training_sidecar_with_a_zeroed_block_is_not_trusted(clean, tmp_path, caplog):
    """Fingerprint sidecars carry no checksum and only their first and last rows are checked against the
    shard: zeroed rows in between would hide those training images from the overlap check."""
    from geoalign_jax.data import fingerprints
    from geoalign_jax.eval import overlap

    folder = tmp_path / "train"
    shutil.copytree(clean, folder)
    shard = sources.shard_paths(folder, "train")[0]
    zero_block(fingerprints.sidecar_path(shard), size=100, at=0.4)
    with caplog.at_level(logging.WARNING, logger="geoalign_jax.eval.overlap"):
        damaged_images = overlap.TrainImages.from_data(folder)
    assert damaged_images.from_sidecars == 1 and any("zeroed" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(damaged_images.rows, overlap.TrainImages.from_data(clean).rows)
