"""What a run's workdir survives (README "What a run survives"): a damaged checkpoint step is set aside and the
run resumes from the newest intact one; evaluate / export read the same step and take --step; one trainer per
workdir (a lock on disks, a lease on gs://); refusals of the CLI are one line with exit status 2."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

import bad_files
import train_fixtures
from train_fixtures import tiny_config
from geoalign_jax import checkpoint_steps
from geoalign_jax.params_checkpoint import load_params
from geoalign_jax.train import loop


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    return train_fixtures.make_data(tmp_path_factory.mktemp("train_data"), num_train=16)


def _largest_file(step_dir):
    return max((path for path in (step_dir / "params").rglob("*") if path.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_step_is_set_aside_and_the_run_resumes_from_the_newest_intact_one(scenes, tmp_path, caplog, capsys):
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    config = tiny_config(scenes, **{"train.num_steps": 2, "checkpoint.every_steps": 1})
    loop.run(config, workdir, progress=False)
    assert (checkpoints / "2" / checkpoint_steps.DIGEST_FILE).is_file()
    # Silent corruption: same size, other bytes (orbax alone might read zeros back as weights).
    bad_files.zero_block(_largest_file(checkpoints / "2"), size=64)
    with pytest.raises(checkpoint_steps.DamagedStepError, match=r"content digest mismatch"):
        checkpoint_steps.verify_digest(checkpoints / "2")

    caplog.set_level(logging.INFO)
    resumed = loop.run(tiny_config(scenes, **{"train.num_steps": 3, "checkpoint.every_steps": 1}), workdir, progress=False)
    assert (resumed.resumed_from, resumed.step) == (1, 3)
    assert (checkpoints / "2.damaged").is_dir() and sorted(checkpoint_steps.finished_steps(checkpoints)) == [2, 3]
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint step 2" in lines[0] and "moved to 2.damaged" in lines[0]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # each step once; the old step 2 set aside
    assert json.loads((workdir / "metrics.jsonl.after_1").read_text())["step"] == 2

    # Read-only readers: a truncated step without digest (orbax's own error) is skipped, left in place.
    (checkpoints / "3" / checkpoint_steps.DIGEST_FILE).unlink()
    bad_files.truncate(_largest_file(checkpoints / "3"))
    caplog.clear()
    from geoalign_jax.eval import __main__ as eval_cli

    # evaluate --checkpoint WORKDIR (no --step): results.json's "weights" names the step it read
    eval_args = eval_cli.build_parser().parse_args(["--checkpoint", str(workdir), "--tasks", "t", "--out", "o"])
    assert eval_cli.load_weights(eval_args)[2] == f"checkpoint {workdir} step 2"
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 3" in m and "skipped (left in place)" in m for m in messages)
    assert any(m.startswith("reading checkpoint step 2 of ") for m in messages) and (checkpoints / "3").is_dir()
    from geoalign_jax.convert import __main__ as convert_cli

    capsys.readouterr()
    code = convert_cli.main(["export", "--params", str(workdir), "--step", "3", "--format", "open_clip",
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "3 does not read back" in err, err
    with pytest.raises(FileNotFoundError, match=r"no finished step 7 \(steps: \[2, 3\]\)"):
        load_params(workdir, step=7)
    # The intact step exports; the weights file gets the umask's permissions, as the JSON beside it.
    from geoalign_jax.convert.weight_files import current_umask

    assert convert_cli.main(["export", "--params", str(workdir), "--step", "2", "--format", "open_clip",
                             "--out", str(tmp_path / "out")]) == 0
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~current_umask()} and len(modes) == 2, modes
    checkpoint_steps.set_aside(checkpoints / "2")
    checkpoint_steps.set_aside(checkpoints / "3")
    assert sorted(p.name for p in checkpoints.glob("2.damaged*")) == ["2.damaged", "2.damaged.2"]
    with pytest.raises(FileNotFoundError, match="without any finished checkpoint"):
        load_params(workdir)


def test_digests_of_earlier_versions_and_of_a_bucket_are_checked_on_a_local_step(tmp_path):
    """A digest.json written before ISA-L (zlib's CRC-32, no "checksums" key) and one of a gs:// step (the
    objects' CRC32C and MD5, copied down with the step) still check the files."""
    import base64
    import hashlib
    import zlib

    import google_crc32c

    step = tmp_path / "7"
    (step / "params").mkdir(parents=True)
    (step / "params" / "a").write_bytes(bytes(range(256)) * 300)
    (step / "b").write_bytes(b"metadata")
    files = {name: [(step / name).stat().st_size, [f"{zlib.crc32((step / name).read_bytes()):08x}"]]
             for name in ("params/a", "b")}
    digest = step / checkpoint_steps.DIGEST_FILE
    digest.write_text(json.dumps({"format": "geoalign-step-digest", "version": 1, "segment_bytes": 64 << 20,
                                  "files": files}))
    assert checkpoint_steps.verify_digest(step)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731 - as GCS lists them
    objects = {name: [size, b64(google_crc32c.Checksum((step / name).read_bytes()).digest()),
                      b64(hashlib.md5((step / name).read_bytes()).digest())] for name, (size, _) in files.items()}
    digest.write_text(json.dumps({"format": "geoalign-step-digest", "version": 1, "segment_bytes": 64 << 20,
                                  "checksums": checkpoint_steps.OBJECT_CHECKSUMS, "files": objects}))
    assert checkpoint_steps.verify_digest(step)
    bad_files.zero_block(step / "params" / "a", size=64)
    with pytest.raises(checkpoint_steps.DamagedStepError, match=r"params/a changed since it was saved"):
        checkpoint_steps.verify_digest(step)


def test_every_process_skips_a_step_that_one_process_cannot_read():
    # The agreement itself is parallel.multihost.agree_on_failure, run by two real processes in
    # tests/test_train_multihost.py (a step only process 0's digest check rejects is skipped by both).
    tried, damaged = [], []

    def read(step):
        tried.append(step)
        if step > 4:
            raise OSError(f"step {step}\nmany\nlines")
        return f"state {step}"

    found = checkpoint_steps.newest_intact([2, 6, 4, 8], read, on_damaged=lambda step, why: damaged.append((step, why)))
    assert found == (4, "state 4") and tried == [8, 6, 4]
    assert damaged == [(8, "OSError: step 8 many lines"), (6, "OSError: step 6 many lines")]
    # one process's failure decides for all: the agreed reason makes every process skip step 4 too
    found = checkpoint_steps.newest_intact([4, 2], lambda step: step, on_damaged=lambda *_: None,
                                           agree=lambda own: "failed on process 1" if not tried.append(0) and len(tried) == 4 else own)
    assert found == (2, 2)


def test_one_workdir_one_run_on_a_disk(tmp_path):
    from geoalign_jax.train import workdir_lock

    workdir = tmp_path / "w"
    held = workdir_lock.acquire(workdir)
    assert not held.lost()  # a flock cannot be taken over
    with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"in use by another trainer \(host \S+, pid {os.getpid()}, "
                                                            r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; .*run.lock\)"):
        workdir_lock.acquire(workdir)
    held.release()
    # kill -9 of the holder leaves nothing that blocks the next start
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from geoalign_jax.train import workdir_lock as w; "
         "w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(workdir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(train_fixtures.REPO_ROOT)})
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"pid {child.pid},"):
            workdir_lock.acquire(workdir)
    finally:
        child.kill()
        child.wait()
    workdir_lock.acquire(workdir).release()

    # gs://: the lease, tested on the GCS emulator in gcs_workdir_cases.py


class _FlakyLeaseStore:
    """A lease object with generation preconditions whose first heartbeat fails (an unreachable bucket) and
    whose second is stored but answered as a failed precondition (a retried upload whose first try landed)."""

    def __init__(self):
        self.text, self.generation, self.replaced = None, 0, 0

    def read(self):
        return None if self.text is None else (self.text, self.generation)

    def create(self, text):
        self.text, self.generation = text, 1
        return 1

    def replace(self, text, generation):
        self.replaced += 1
        if self.replaced == 1:
            raise ConnectionError("bucket unreachable")
        assert generation == self.generation
        self.text, self.generation = text, self.generation + 1
        return None if self.replaced == 2 else self.generation

    def delete(self, generation):
        if generation == self.generation:
            self.text = None


def test_a_lease_heartbeat_survives_a_failed_write_and_a_lost_answer(caplog):
    from geoalign_jax.train import workdir_lock

    store = _FlakyLeaseStore()
    lease = workdir_lock.Lease(store, "gs://b/w/run.lease").acquire()
    caplog.set_level(logging.WARNING)
    lease.start_heartbeat(every_s=0.01)
    for _ in range(500):
        if store.replaced >= 3:
            break
        time.sleep(0.01)
    lease.release()
    assert store.replaced >= 3 and store.text is None, (store.replaced, store.text)  # beat on, released its own
    assert "the heartbeat failed (ConnectionError: bucket unreachable); next try" in caplog.text
    assert "lost the lease" not in caplog.text


class _LeaseObject:
    """One object with GCS's generation preconditions, in memory (workdir_lock.LeaseStore)."""

    def __init__(self):
        self.text, self.generation = None, 0

    def read(self):
        return None if self.text is None else (self.text, self.generation)

    def create(self, text):
        return None if self.text is not None else self._store(text)

    def replace(self, text, generation):
        return None if self.text is None or generation != self.generation else self._store(text)

    def _store(self, text):
        self.text, self.generation = text, self.generation + 1
        return self.generation

    def delete(self, generation):
        if generation == self.generation:
            self.text = None


def test_a_lease_taken_over_is_lost_its_release_leaves_the_new_owner_alone_and_the_cli_exits_3(caplog, capsys):
    from geoalign_jax.train import __main__ as train_cli
    from geoalign_jax.train import workdir_lock

    store, now, where = _LeaseObject(), [1000.0], "gs://b/w/run.lease"
    ours = workdir_lock.Lease(store, where, stale_s=600, clock=lambda: now[0]).acquire()
    assert ours.heartbeat() and not ours.lost()
    now[0] += 601  # our heartbeat stalled: the next trainer takes the stale lease over
    theirs = workdir_lock.Lease(store, where, stale_s=600, clock=lambda: now[0]).acquire()
    caplog.set_level(logging.ERROR)
    assert not ours.heartbeat() and ours.lost() and not theirs.lost()
    assert f"lost the lease {where} to another trainer" in caplog.text
    ours.release()
    assert json.loads(store.text)["owner"] == theirs.holder["owner"]
    capsys.readouterr()
    assert train_cli.ended("lease_lost", 7, "gs://b/w") == train_cli.LEASE_LOST_EXIT == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: workdir gs://b/w: stopped at step 7 without saving"), err
    assert "another trainer owns the workdir now" in err
    assert train_cli.ended("finished", 7, "gs://b/w") == 0 and train_cli.ended("preempted", 3, "w") == 0


def test_cli_refusals_are_one_line_with_exit_2(scenes, tmp_path):
    """A workdir another trainer holds; a bad recipe argument (the recipe's own message, not a traceback); a
    model override the recipe does not set is accepted, a mistyped one refused with the closest name."""
    from geoalign_jax.train import workdir_lock

    env = {**os.environ, "PYTHONPATH": str(train_fixtures.REPO_ROOT), "GEOALIGN_ALLOCATOR": "system"}
    env.pop("GEOALIGN_DEBUG", None)
    command = [sys.executable, "-m", "geoalign_jax.train", "--workdir", str(tmp_path / "w"), "--noprogress",
               "--config", "configs/demo.py", f"--config.data.train_shards={scenes}"]
    run = lambda *args: subprocess.run([*command, *args], cwd=train_fixtures.REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, env=env, timeout=300)
    held = workdir_lock.acquire(tmp_path / "w")
    try:  # overrides the demo recipe does not set: parsed and validated (build), then the workdir is refused
        busy = run("--config.model.overrides.init_logit_bias=-10", "--config.model.overrides.vision_layers=1")
    finally:
        held.release()
    recipe = subprocess.run(command[:-3] + ["--config", "configs/farslip.py:s9"], cwd=train_fixtures.REPO_ROOT,
                            capture_output=True, text=True, env=env, timeout=300)
    typo = run("--config.model.overrides.vision_widht=128")
    for result, words in ((busy, f"in use by another trainer (host {socket.gethostname()}, pid {os.getpid()}"),
                          (recipe, "--config=configs/farslip.py:s9: ValueError: farslip config: stage must be 's1' or 's2', got 's9'"),
                          (typo, 'bad command-line config: vision_widht: Did you mean "vision_width" instead of "vision_widht"?')):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_a_full_disk_is_one_line_naming_the_file_and_the_complete_step(tmp_path, capsys):
    import errno

    from geoalign_jax.train import cli_errors, workdir_lock

    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    try:  # as an async save reports it: the OSError under orbax's own error
        raise RuntimeError("save failed\n" * 50) from OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/6/x")
    except RuntimeError as error:
        full = error
    assert cli_errors.report(full, tmp_path, debug=False) == 1
    assert capsys.readouterr().err == (
        "error: no space left on device writing /w/checkpoints/6/x; the newest complete checkpoint is step 4 in "
        f"{tmp_path}/checkpoints (the same command resumes from it once there is space) (the traceback: --debug or "
        "GEOALIGN_DEBUG=1)\n")
    try:
        {}["x"]
    except KeyError as error:
        assert cli_errors.report(error, tmp_path, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: KeyError: 'x'\n")
    assert [cli_errors.exit_status(e) for e in (ValueError("v"), workdir_lock.WorkdirBusyError("b"), OSError("o"))] == [2, 2, 1]
    cli_errors.quiet_library_logs()  # the three harmless library lines the CLI leaves out
    noise = [logging.makeLogRecord({"name": "absl", "msg": "Metadata file does not exist: /w/checkpoints/2/x"}),
             logging.makeLogRecord({"name": "absl", "msg": "Saving checkpoint"})]
    assert [all(f.filter(r) for f in logging.getLogger("absl").filters) for r in noise] == [False, True]
    assert not logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.INFO)
    assert not logging.getLogger("tensorboardX.summary").isEnabledFor(logging.INFO)
