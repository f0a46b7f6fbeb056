"""A trainer workdir in a bucket (gs://, the emulator on 127.0.0.1, see gcs_fixtures.py): checkpoints (orbax
through tensorstore's GCS driver), their digests, config.json, metrics.jsonl and the workdir lease all live
there; a damaged step is set aside and the rerun resumes with the losses of an uninterrupted run; a second
trainer is refused by the lease; export reads the newest intact step from the bucket.

Run by tests/test_gcs_workdir.py in a process of its own (with its own emulator): see there why.
"""
from __future__ import annotations

import json
import logging

import pytest

import train_fixtures
from gcs_fixtures import gcs, healthy  # noqa: F401 - fixtures
from train_fixtures import assert_bitwise_equal, tiny_config
from geoalign_jax import checkpoint_steps
from geoalign_jax.params_checkpoint import load_params
from geoalign_jax.train import loop, metrics, workdir_lock


def test_a_gs_workdir_trains_is_leased_heals_and_resumes_like_an_uninterrupted_run(healthy, tmp_path, caplog, capsys):
    scenes = train_fixtures.make_data(tmp_path / "data", num_train=16)
    config = lambda steps: tiny_config(scenes, **{"train.num_steps": steps, "checkpoint.every_steps": 1})  # noqa: E731
    workdir = healthy.url("runs", "gs_workdir")
    fs = healthy.fs
    first = loop.run(config(2), workdir, progress=False)
    assert (first.status, first.step) == ("finished", 2)
    names = set(fs.find(f"{healthy.name}/runs/gs_workdir"))
    for name in ("config.json", "metrics.jsonl", "checkpoints/model_config.json", "checkpoints/2/digest.json"):
        assert f"{healthy.name}/runs/gs_workdir/{name}" in names, name
    assert any("/runs/gs_workdir/tb/" in name for name in names)  # TensorBoard wrote its event file there
    assert not any(name.endswith(workdir_lock.LEASE_FILE) for name in names)  # released at the end
    digest = json.loads(fs.cat(f"{healthy.name}/runs/gs_workdir/checkpoints/2/digest.json"))
    assert digest["checksums"] == checkpoint_steps.OBJECT_CHECKSUMS and len(digest["files"]) > 5

    # A trainer that holds the lease (here: this process) refuses a second one, before it touches the workdir.
    held = workdir_lock.acquire(workdir)
    with pytest.raises(workdir_lock.WorkdirBusyError, match=r"in use by another trainer \(host .*lease gs://"):
        loop.run(config(3), workdir, progress=False)
    held.release()

    # Silent damage of step 2 in the bucket (same size, other bytes): the digest (the server's checksums)
    # notices it, the rerun sets the step aside and resumes from step 1.
    target = max((name for name in names if "/checkpoints/2/params/" in name), key=lambda name: fs.size(name))
    fs.pipe(target, bytes(fs.size(target)))
    fs.invalidate_cache()
    with pytest.raises(checkpoint_steps.DamagedStepError, match="content digest mismatch"):
        checkpoint_steps.verify_digest(f"{workdir}/checkpoints/2")
    caplog.set_level(logging.INFO)
    resumed = loop.run(config(3), workdir, progress=False)
    assert (resumed.resumed_from, resumed.step) == (1, 3)
    assert any("checkpoint step 2" in r.getMessage() and "moved to 2.damaged" in r.getMessage() for r in caplog.records)
    assert checkpoint_steps.finished_steps(f"{workdir}/checkpoints") == [3, 2]
    assert fs.isdir(f"{healthy.name}/runs/gs_workdir/checkpoints/2.damaged")
    uninterrupted = loop.run(config(3), tmp_path / "local", progress=False)
    assert_bitwise_equal(uninterrupted.state.params, resumed.state.params)
    records = [json.loads(line) for line in fs.cat(f"{healthy.name}/runs/gs_workdir/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # each step once; the old step 2 set aside

    # Export reads the newest intact step from the bucket; --ema on checkpoints without EMA weights: one line.
    _, params = load_params(workdir)
    assert_bitwise_equal(jax_params(resumed.state.params), params)
    from geoalign_jax.convert import __main__ as convert_cli

    capsys.readouterr()
    assert convert_cli.main(["export", "--params", workdir, "--ema", "--format", "open_clip",
                             "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hold no EMA weights" in err and "train.ema_decay was not set" in err, err
    assert convert_cli.main(["export", "--params", f"{workdir}/checkpoints/3", "--ema", "--format", "open_clip",
                             "--out", str(tmp_path / "out")]) == 2  # one step named: its own line, no "damaged"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no EMA weights" in err and "does not read back" not in err, err


@pytest.mark.parametrize("during", ["step", "evaluation"])
def test_a_trainer_whose_lease_was_taken_over_stops_without_saving_or_logging_into_the_workdir(
        healthy, tmp_path, monkeypatch, during):
    """At step 2 (after the step, or while step 2's evaluation runs) another trainer takes the lease over (as it
    would a stale one) and writes its metrics.jsonl; this run's next heartbeat finds it: the run stops at step 2
    (a log, evaluation and save step) with status "lease_lost", writes no evaluation metrics, saves no step after
    the loss and leaves the other owner's lease, metrics.jsonl and TensorBoard alone."""
    import time

    scenes = train_fixtures.make_data(tmp_path / "data", num_train=16)
    workdir, fs = healthy.url("runs", f"lease_lost_{during}"), healthy.fs
    base, url = f"{healthy.name}/runs/lease_lost_{during}", f"{workdir}/{workdir_lock.LEASE_FILE}"
    held = []

    def acquire_for_run(where):  # the run's own lease, kept for the test
        held.append(workdir_lock.acquire(where))
        return held[-1]

    monkeypatch.setattr(workdir_lock, "acquire_for_run", acquire_for_run)
    theirs, seen = [], {}
    other_metrics = b'{"step": 0, "by": "the other trainer"}\n'

    def take_over(step):
        if step != 2:
            return
        theirs.append(workdir_lock.Lease(workdir_lock.GcsLeaseStore(url), url,
                                         clock=lambda: time.time() + 10_000).acquire())  # ours looks stale
        fs.pipe(f"{base}/{metrics.METRICS_FILE}", other_metrics)
        fs.invalidate_cache()
        seen.update(fs.find(base, detail=True))
        assert not held[0].heartbeat()  # the heartbeat thread's next beat, now

    def evaluate(setup, state, step, *args):  # stands in for the evaluation, during which the takeover comes
        take_over(step)
        return {"fake/top1": 1.0}

    monkeypatch.setattr(loop, "_evaluate", evaluate)
    monkeypatch.setattr(metrics, "BUCKET_UPLOAD_S", 0.0)  # every write uploads: one after the loss would show
    config = tiny_config(scenes, **{"train.num_steps": 4, "checkpoint.every_steps": 1,
                                    "eval.every_steps": 2 if during == "evaluation" else 0})
    if during == "evaluation":  # a task is required with eval.every_steps; the stand-in never reads it
        config.eval.tasks = (f"retrieval:seen={scenes},split=train,limit=2",)
        config.eval.allow_train_split = True
    result = loop.run(config, workdir, progress=False, on_step=take_over if during == "step" else None)
    assert (result.status, result.step) == ("lease_lost", 2) and held[0].lost()
    fs.invalidate_cache()
    assert checkpoint_steps.finished_steps(f"{workdir}/checkpoints") == [1]
    after = fs.find(base, detail=True)
    changed = sorted(name.removeprefix(f"{base}/") for name, info in after.items()
                     if info.get("generation") != seen.get(name, {}).get("generation"))
    # since the loss only step 1's save (begun before it: its async write, its digest) may have gone on
    assert all(name.startswith("checkpoints/1") for name in changed), changed
    assert set(seen) <= set(after)  # nothing deleted
    assert fs.cat(f"{base}/{metrics.METRICS_FILE}") == other_metrics
    assert json.loads(workdir_lock.GcsLeaseStore(url).read()[0])["owner"] == theirs[0].holder["owner"]
    theirs[0].release()


def jax_params(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_the_workdir_lease_on_a_bucket_refuses_a_second_owner_and_is_taken_over_when_stale(healthy, caplog):
    """The lease object itself on the emulator, with GCS's generation preconditions (tools/gcs_emulator.py)."""
    url = healthy.url("runs", "leased", workdir_lock.LEASE_FILE)
    now = [1000.0]
    lease = lambda: workdir_lock.Lease(workdir_lock.GcsLeaseStore(url), url, stale_s=600, clock=lambda: now[0])  # noqa: E731
    first = lease().acquire()
    now[0] += 500
    with pytest.raises(workdir_lock.WorkdirBusyError, match=r"pid \d+, .*lease gs://.*, heartbeat 500 s ago"):
        lease().acquire()
    assert first.heartbeat()
    now[0] += 599
    with pytest.raises(workdir_lock.WorkdirBusyError):
        lease().acquire()
    now[0] += 2
    caplog.set_level(logging.WARNING)
    second = lease().acquire()
    assert "taking over the stale lease gs://" in caplog.text and not first.heartbeat()
    first.release()  # it lost the lease: releasing leaves the new owner's object alone
    assert json.loads(workdir_lock.GcsLeaseStore(url).read()[0])["owner"] == second.holder["owner"]
    second.release()
    assert workdir_lock.GcsLeaseStore(url).read() is None


def test_trainers_racing_for_a_lease_on_a_bucket_exactly_one_wins(healthy):
    """Four trainers start at once (on a fresh workdir, then on a stale lease): GCS's generation preconditions
    (the emulator's, tools/gcs_emulator.py) let exactly one of them take the lease each time."""
    import concurrent.futures
    import threading

    url = healthy.url("runs", "raced", workdir_lock.LEASE_FILE)
    now = [1000.0]

    def race() -> list[workdir_lock.Lease]:
        leases = [workdir_lock.Lease(workdir_lock.GcsLeaseStore(url), url, stale_s=600, clock=lambda: now[0])
                  for _ in range(4)]
        start = threading.Barrier(len(leases))

        def take(lease):
            start.wait()
            try:
                return lease.acquire()
            except workdir_lock.WorkdirBusyError:
                return None

        with concurrent.futures.ThreadPoolExecutor(len(leases)) as pool:
            return [lease for lease in pool.map(take, leases) if lease is not None]

    first = race()
    assert len(first) == 1
    now[0] += 601  # its heartbeat stopped (a killed trainer): stale
    second = race()
    assert len(second) == 1 and second[0].holder["owner"] != first[0].holder["owner"]
    assert json.loads(workdir_lock.GcsLeaseStore(url).read()[0])["owner"] == second[0].holder["owner"]
    assert not first[0].heartbeat()
    second[0].release()


def test_a_bucket_digest_of_objects_without_md5_checks_crc32c_and_says_so(healthy, caplog):
    """A composite object (a parallel composite upload) has no MD5 in GCS: the digest falls back to size and
    CRC32C, which still finds changed bytes, and says in one warning that it did."""
    step = healthy.url("runs", "composite", "checkpoints", "4")
    fs, base = healthy.fs, step.removeprefix("gs://")
    fs.pipe({f"{base}/params/a": bytes(range(256)) * 40, f"{base}/b": b"metadata"})
    fs.invalidate_cache()
    files = checkpoint_steps.compute_digest(step)
    assert all(size and crc32c and md5 for size, crc32c, md5 in files.values()), files  # the emulator gives both
    files["params/a"][2] = None  # as GCS lists a composite object
    fs.pipe(f"{base}/{checkpoint_steps.DIGEST_FILE}", json.dumps(
        {"format": "geoalign-step-digest", "version": 1, "checksums": checkpoint_steps.OBJECT_CHECKSUMS,
         "segment_bytes": checkpoint_steps.SEGMENT_BYTES, "files": files}).encode())
    fs.invalidate_cache()
    caplog.set_level(logging.WARNING)
    assert checkpoint_steps.verify_digest(step)
    assert "1 of 2 object(s) have no MD5 (composite objects?), e.g. params/a: checked by size and CRC32C" in caplog.text
    fs.pipe(f"{base}/params/a", bytes(256 * 40))  # same size, other bytes
    fs.invalidate_cache()
    with pytest.raises(checkpoint_steps.DamagedStepError, match="params/a changed since it was saved"):
        checkpoint_steps.verify_digest(step)


def test_tensorboard_in_a_bucket_uploads_nothing_after_close(healthy):
    """tensorboardX's own gs:// writer uploads its event file again when it is garbage-collected, which its atexit
    hook delays to the interpreter's exit (a 120 s hang and a traceback when the bucket no longer answers)."""
    from geoalign_jax.train import metrics

    writer = metrics.MetricsWriter(healthy.url("runs", "tb_close"), total_steps=1, initial_step=0, progress=False)
    writer.write(1, {"loss": 1.0})
    event_writer = writer._tb.file_writer.event_writer._ev_writer._py_recordio_writer  # (the close drops it)
    writer.close()
    fs, events = healthy.fs, f"{healthy.name}/runs/tb_close/{metrics.TENSORBOARD_DIR}"
    fs.invalidate_cache()
    [event_file] = fs.find(events)
    assert fs.size(event_file) > 0
    fs.rm(event_file)
    fs.invalidate_cache()
    event_writer.close()  # what the atexit hook and the garbage collection at the exit do
    fs.invalidate_cache()
    assert fs.find(events) == []
