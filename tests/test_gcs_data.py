"""Training data in a bucket: shards, manifests and records read from gs:// (the emulator on 127.0.0.1, see
gcs_fixtures.py) give exactly what the same shards give from local disk, and storage faults are retried,
counted or named."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from data_fixtures import assert_batches_equal as _assert_batches_equal, load_demo_module, small_data_config
from gcs_fixtures import gcs, healthy  # noqa: F401 - fixtures
from geoalign_jax.data import filesystem, pipeline, sources

NUM_TRAIN = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("gcs-demo")
    result = load_demo_module().make_demo_data(out, num_train=NUM_TRAIN, num_val=4, num_per_class=0, image_size=48,
                                               seed=0)
    return pathlib.Path(result["scenes"])


@pytest.fixture(scope="module")
def remote(gcs, demo) -> str:
    return gcs.upload(demo, "data", "scenes")


def _config(train_shards, **overrides):
    return small_data_config(train_shards, num_hard_negatives=2, long_context_length=0, **overrides)


def test_folder_and_glob_in_a_bucket_list_the_same_shards_as_local(healthy, demo, remote):
    local = sources.shard_paths(demo, "train")
    from_manifest = sources.shard_paths(remote, "train")
    from_glob = sources.shard_paths(remote + "/*-train-*.array_record", "train")
    names = [pathlib.Path(p).name for p in local]
    assert [p.rsplit("/", 1)[1] for p in from_manifest] == names
    assert from_glob == from_manifest and all(p.startswith(remote + "/") for p in from_glob)
    assert sources.shard_paths(healthy.url("data", "sc*", "*-train-*.array_record"),
                               "train") == from_manifest
    assert sources.read_manifest(remote) == sources.read_manifest(demo)


def test_records_from_a_bucket_are_the_local_records(healthy, demo, remote):
    local = sources.RecordSource.from_dir(demo, "train", raw=True)
    bucket = sources.RecordSource.from_dir(remote, "train", raw=True)
    assert len(bucket) == len(local) == NUM_TRAIN
    order = np.random.default_rng(0).permutation(NUM_TRAIN).tolist()
    assert bucket.__getitems__(order) == local.__getitems__(order)
    assert bucket.locate(NUM_TRAIN - 1) == (bucket.paths[-1], local.locate(NUM_TRAIN - 1)[1])


def test_a_read_killed_mid_record_is_resumed_with_the_right_bytes(healthy, demo, remote):
    local = sources.RecordSource.from_dir(demo, "train", raw=True)
    bucket = sources.RecordSource.from_dir(remote, "train", raw=True)
    # Read from the cut record's own shard first: a cut in a shard's first record read was re-requested at once,
    # without the C++ back-off, in 3 of 8 runs (then nothing is counted); in a shard already read, 8 of 8 waited.
    bucket[NUM_TRAIN // 2]
    before, counted = healthy.proxy.media_requests, dict(filesystem.RETRIES)
    healthy.proxy.cut_downloads(1, after_bytes=64)
    assert bucket[NUM_TRAIN // 2 + 1] == local[NUM_TRAIN // 2 + 1]
    assert healthy.proxy.cuts == 1 and healthy.proxy.media_requests >= before + 2  # cut, then read again
    # the C++ reader resumed it by itself, after its back-off: counted as slow, never reached `retry`
    assert filesystem.RETRIES["slow_record"] == counted.get("slow_record", 0) + 1
    assert filesystem.RETRIES["record"] == counted.get("record", 0)


def test_a_read_the_cpp_reader_retried_by_itself_is_counted(healthy, demo, remote):
    """google-cloud-cpp retries a 503 inside ArrayRecord's reader, unseen by `filesystem.retry`; the back-off
    it sleeps first (1 s or more) is what makes the read counted, as a slow one."""
    local = sources.RecordSource.from_dir(demo, "train", raw=True)
    bucket = sources.RecordSource.from_dir(remote, "train", raw=True)
    bucket[0]
    before, failures = dict(filesystem.RETRIES), healthy.proxy.failures
    healthy.proxy.fail_downloads(1, 503)
    assert bucket[NUM_TRAIN - 1] == local[NUM_TRAIN - 1] and healthy.proxy.failures == failures + 1
    assert filesystem.RETRIES["slow_record"] == before.get("slow_record", 0) + 1
    assert filesystem.RETRIES["record"] == before.get("record", 0)  # no error ever reached Python


def test_transient_failures_are_retried_with_backoff_and_counted(monkeypatch, caplog):
    delays, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("UNAVAILABLE: Retry policy exhausted in Read(): connection reset")
        return b"record"

    before = filesystem.RETRIES["record"]
    assert filesystem.retry(flaky, what="gs://b/x record 3", kind="record", sleep=delays.append) == b"record"
    assert filesystem.RETRIES["record"] - before == 2 and delays == [0.5, 1.0]
    assert "gs://b/x record 3: transient error (UNAVAILABLE" in caplog.text  # the running total is logged
    assert f"retry 2 of 3 in 1.0 s ({before + 2} record retries in this process)" in caplog.text
    with pytest.raises(RuntimeError, match="chunk hash mismatch at byte 5003"):  # damaged bytes: no retry
        filesystem.retry(lambda: (_ for _ in ()).throw(RuntimeError("chunk hash mismatch at byte 5003")),
                         what="x", sleep=delays.append)
    assert delays == [0.5, 1.0]


def test_a_missing_shard_is_named_when_the_pipeline_is_built(healthy, demo):
    folder = healthy.upload(demo, "data", "missing-shard")
    gone = sources.shard_paths(folder, "train")[-1]
    healthy.fs.rm(gone[len("gs://"):])
    with pytest.raises(sources.SourceError) as caught:
        pipeline.make_train_dataset(_config(folder), process_index=0, process_count=1)
    message = str(caught.value)
    assert "\n" not in message and gone in message and "missing" in message


def test_a_refused_object_is_one_line_naming_it(healthy, demo):
    folder = healthy.upload(demo, "data", "denied")
    manifest = folder + "/manifest.json"
    healthy.proxy.deny(manifest[len("gs://") + len(healthy.name) + 1:])
    with pytest.raises(sources.SourceError) as caught:
        pipeline.make_train_dataset(_config(folder), process_index=0, process_count=1)
    message = str(caught.value)
    assert "\n" not in message and manifest in message and "permission denied" in message


def test_pipeline_from_a_bucket_resumes_exactly_like_the_local_run(healthy, demo, remote):
    local = pipeline.take(pipeline.make_train_iterator(_config(demo), process_index=0, process_count=1), 5)
    iterator = pipeline.make_train_iterator(_config(remote), process_index=0, process_count=1)
    _assert_batches_equal(local[:2], pipeline.take(iterator, 2))
    state = pipeline.iterator_state(iterator)
    iterator.close()
    resumed = pipeline.make_train_iterator(_config(remote), process_index=0, process_count=1, state=state)
    _assert_batches_equal(local[2:], pipeline.take(resumed, 3))
    resumed.close()


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> pathlib.Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for label in ("beach", "forest"):
        (root / label).mkdir()
        for index in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / label / f"{index}.png")
    return root


def test_prepare_to_a_bucket_publishes_the_local_dataset_manifest_last(healthy, class_folders, tmp_path,
                                                                       monkeypatch, capsys):
    from geoalign_jax import prepare
    from geoalign_jax.data import bucket_output

    command = ["folders", "--root", str(class_folders), "--name", "aid", "--split", "train", "--no-progress",
               "--workers", "1"]
    assert prepare.main([*command, "--out", str(tmp_path / "local")]) == 0
    out = healthy.url("prepared", "aid")
    assert prepare.main([*command, "--out", out]) == 0
    local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
    remote_files = sorted(p.rsplit("/", 1)[1] for p in healthy.fs.ls(out[len("gs://"):]))
    assert remote_files == local_files
    for name in local_files:
        if name != "manifest.json":
            assert healthy.fs.cat(f"{out[len('gs://'):]}/{name}") == (tmp_path / "local" / name).read_bytes()
    assert sources.read_manifest(out)["splits"] == sources.read_manifest(tmp_path / "local")["splits"]
    assert sources.RecordSource.from_dir(out, "train")[5]["image"] == \
        sources.RecordSource.from_dir(tmp_path / "local", "train")[5]["image"]
    assert capsys.readouterr().out.rstrip().endswith("(manifest.json last)")

    assert prepare.main([*command, "--out", out]) == 1  # a dataset is there: refused before converting
    assert f"{out} already holds a dataset" in capsys.readouterr().err

    uploads = []
    real_fs = bucket_output._bucket_fs()

    class FailingSecondUpload:
        def __getattr__(self, name):
            return getattr(real_fs, name)

        def put_file(self, local, remote):
            uploads.append(remote)
            if len(uploads) == 2:
                raise OSError(f"Forbidden: {remote}")
            return real_fs.put_file(local, remote)

    monkeypatch.setattr(bucket_output, "_bucket_fs", lambda: FailingSecondUpload())
    assert prepare.main([*command, "--out", out, "--overwrite"]) == 1
    assert "holds no manifest.json, so no trainer reads it" in capsys.readouterr().err
    with pytest.raises(sources.SourceError, match="no manifest.json"):  # the old one went before the shards
        sources.shard_paths(out, "train")
    with pytest.raises(sources.SourceError, match=r"may mix two datasets"):  # and a glob of its shards too
        sources.shard_paths(out + "/*.array_record", "train")
    monkeypatch.undo()
    assert prepare.main([*command, "--out", out, "--overwrite"]) == 0
    assert len(sources.RecordSource.from_dir(out, "train")) == 6
    assert len(sources.shard_paths(out + "/*.array_record", "train")) == 1  # the marker went with success
    stray = f"{out[len('gs://'):]}/aid-train-00000-of-00002.array_record"  # an old shard an overwrite left
    healthy.fs.pipe_file(stray, b"old")
    with pytest.raises(sources.SourceError, match=r"does not list .*aid-train-00000-of-00002\.array_record"):
        sources.shard_paths(out + "/*.array_record", "train")
    healthy.fs.rm_file(stray)

    # `prepare fingerprints gs://...`: a lost sidecar is written again into the bucket, as locally
    sidecar = f"{out[len('gs://'):]}/aid-train-00000-of-00001.hashes.npy"
    healthy.fs.rm_file(sidecar)
    from geoalign_jax.eval import overlap  # what the overlap check tells the user to run, then running it

    assert overlap.sidecar_command(sources.shard_paths(out, "train")) == \
        f"python -m geoalign_jax.prepare fingerprints '{out}'"
    assert prepare.main(["fingerprints", out, "--no-progress", "--workers", "1"]) == 0
    assert "1 sidecars written" in capsys.readouterr().out
    assert healthy.fs.cat(sidecar) == (tmp_path / "local" / "aid-train-00000-of-00001.hashes.npy").read_bytes()
    assert sources.read_manifest(out)["image_hashes"] == sources.read_manifest(tmp_path / "local")["image_hashes"]
    assert prepare.main(["fingerprints", out + "/*.array_record", "--no-progress", "--workers", "1"]) == 0
    assert "1 already there" in capsys.readouterr().out


def test_prepare_to_a_bucket_names_a_refused_write_and_survives_a_marker_it_cannot_delete(
        healthy, class_folders, monkeypatch, capsys):
    from geoalign_jax import prepare
    from geoalign_jax.data import bucket_output

    command = ["folders", "--root", str(class_folders), "--name", "aid", "--split", "train", "--no-progress",
               "--workers", "1", "--out", healthy.url("prepared", "refused")]
    real_fs = bucket_output._bucket_fs()
    refused = []

    class Refusing:
        def __getattr__(self, name):
            return getattr(real_fs, name)

        def pipe_file(self, remote, data):
            raise OSError(f"Forbidden: {remote}")

        def rm_file(self, remote):
            if remote.endswith(".prepare-unfinished"):
                refused.append(remote)
                raise OSError(f"Forbidden: {remote}")
            return real_fs.rm_file(remote)

    monkeypatch.setattr(bucket_output, "_bucket_fs", lambda: Refusing())
    assert prepare.main(command) == 1  # the marker is the first write: nothing reached the bucket
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: writing {command[-1]}/.prepare-unfinished failed (Forbidden") and "\n" not in error
    assert not healthy.fs.exists(command[-1][len("gs://"):] + "/manifest.json")

    monkeypatch.setattr(Refusing, "pipe_file", lambda self, remote, data: real_fs.pipe_file(remote, data))
    assert prepare.main(command) == 0 and refused  # published; the marker it could not delete is named
    assert "warning: could not delete" in capsys.readouterr().err
    assert len(sources.RecordSource.from_dir(command[-1], "train")) == 6
    assert len(sources.shard_paths(command[-1] + "/*.array_record", "train")) == 1  # a marker beside a manifest


def test_prepare_segmentation_refuses_a_bucket_rather_than_writing_a_local_gs_folder(tmp_path, monkeypatch, capsys):
    from geoalign_jax import prepare

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text("road\nwater\n")
    assert prepare.main(["segmentation", "--images", "images", "--masks", "masks", "--classes", "classes.txt",
                         "--out", "gs://b/seg"]) == 1
    assert "--out gs://b/seg: a segmentation folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt", "images", "masks"]


def test_storage_errors_are_told_apart():
    from gcsfs.retry import HttpError

    kinds = {
        "missing": [FileNotFoundError("gs://b/x"), RuntimeError("NOT_FOUND: No such object: b/x")],
        "denied": [OSError("Forbidden: b/x\nno access"), RuntimeError("PERMISSION_DENIED: caller lacks access"),
                   HttpError({"code": 403, "message": "nope"})],
        "transient": [RuntimeError("UNAVAILABLE: Retry policy exhausted"), HttpError({"code": 503, "message": "x"}),
                      TimeoutError("read"), RuntimeError("DEADLINE_EXCEEDED")],
        "other": [RuntimeError("Invalid Riegeli/records file: chunk hash mismatch at byte 5003"),
                  ValueError("bad")],
    }
    for kind, errors in kinds.items():
        for error in errors:
            assert filesystem.error_kind(error) == kind, error


def test_a_record_read_failing_transiently_is_retried_counted_then_stops_the_run_naming_it(healthy, remote,
                                                                                            monkeypatch):
    """What ArrayRecord's own retries give up on: retried here and counted; when it keeps failing, an error naming
    the record, never an `UnreadableRecord` that the pipeline would skip."""
    source = sources.RecordSource.from_dir(remote, "train", raw=True, unreadable="mark")
    good = source[3]
    failures = {"left": 2}
    inner = source._source

    class Flaky:
        def __len__(self):
            return len(inner)

        def __getitem__(self, index):
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("UNAVAILABLE: Retry policy exhausted in Read(): injected")
            return inner[index]

    monkeypatch.setattr(filesystem, "FIRST_BACKOFF_S", 0.0)
    monkeypatch.setattr(source, "_source", Flaky())
    before = filesystem.RETRIES["record"]
    assert source[3] == good and filesystem.RETRIES["record"] - before == 2
    failures["left"] = 10 ** 6
    with pytest.raises(sources.RecordReadError, match=r"/demo-train-\d{5}-of-\d{5}\.array_record record 3: cannot "
                                                      r"be read .*the storage failed after 4 attempts"):
        source[3]
    assert filesystem.RETRIES["record"] - before == 2 + filesystem.MAX_ATTEMPTS - 1


def test_a_fresh_bucket_client_connects_only_to_the_loopback_emulator(healthy, monkeypatch):
    """No credential lookup on the GCE metadata server (169.254.169.254) or anywhere else: the emulator is all."""
    import socket

    import fsspec

    seen = []
    real_connect = socket.socket.connect

    def connect(self, address):
        seen.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    client = fsspec.filesystem("gs", skip_instance_cache=True)  # credentials are looked up for a new client
    assert client.ls(healthy.name, refresh=True)
    assert seen and {address[0] for address in seen} == {"127.0.0.1"}, seen


def test_opening_a_shard_that_fails_transiently_is_retried_and_counted(healthy, remote, monkeypatch):
    """A failed gs:// open does not raise (the reader is not ok and close() says why); it must still be retried."""
    from array_record.python import array_record_module

    real_reader = array_record_module.ArrayRecordReader
    opens = []

    class OutageThenReal:
        def __init__(self, path, *args):
            opens.append(path)
            self._real = None if len(opens) <= 2 else real_reader(path, *args)

        def ok(self):
            return self._real is not None and self._real.ok()

        def close(self):
            if self._real is None:
                raise RuntimeError("UNAVAILABLE: injected outage")
            self._real.close()

        def num_records(self):
            return self._real.num_records()

    shard = sources.shard_paths(remote, "train")[0]
    expected = sources.check_shard(shard)
    monkeypatch.setattr(filesystem, "FIRST_BACKOFF_S", 0.0)
    monkeypatch.setattr(array_record_module, "ArrayRecordReader", OutageThenReal)
    before = filesystem.RETRIES["metadata"]
    assert sources.check_shard(shard) == expected and len(opens) == 3
    assert filesystem.RETRIES["metadata"] - before == 2


def test_renaming_a_folder_in_a_bucket_survives_a_retried_delete(healthy, tmp_path, monkeypatch):
    """A damaged checkpoint step is set aside by renaming its folder (copy, then delete every object); a delete
    whose first try landed and whose retry finds the object gone must not fail the rename."""
    import fsspec

    (tmp_path / "step" / "params").mkdir(parents=True)
    (tmp_path / "step" / "params" / "manifest.ocdbt").write_bytes(b"m")
    (tmp_path / "step" / "digest.json").write_text("{}")
    source = healthy.upload(tmp_path / "step", "ckpt", "2")
    filesystem.path(source)  # configure the emulator endpoint
    bucket = fsspec.filesystem("gs")
    original = bucket.rm_file

    def delete_then_report_missing(name, *args, **kwargs):
        original(name, *args, **kwargs)
        raise FileNotFoundError(name)  # what a retried DELETE of a deleted object answers

    monkeypatch.setattr(bucket, "rm_file", delete_then_report_missing)
    filesystem.rename_folder(source, healthy.url("ckpt", "2.damaged"))
    bucket.invalidate_cache()
    moved = sorted(name.rsplit("2.damaged/", 1)[1] for name in bucket.find(healthy.url("ckpt", "2.damaged")))
    assert moved == ["digest.json", "params/manifest.ocdbt"]
    assert bucket.find(source) == []
