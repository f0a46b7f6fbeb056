"""Training and evaluation read from gs:// (the emulator on 127.0.0.1, see gcs_fixtures.py): two trainer
steps give bit-identical parameters to the same steps from local disk, and evaluation tasks and the overlap
check against training shards in a bucket give the local numbers."""
from __future__ import annotations

import pytest

import data_fixtures
import train_fixtures
from data_fixtures import records  # noqa: F401 - fixture
from gcs_fixtures import gcs, healthy  # noqa: F401 - fixtures
from train_fixtures import assert_bitwise_equal, tiny_config
from geoalign_jax.eval import overlap, runner


def test_two_training_steps_from_a_bucket_equal_the_local_steps(healthy, tmp_path):
    train_fixtures.use_compilation_cache(tmp_path / "jax_cache")
    from geoalign_jax.train import loop

    local = train_fixtures.make_data(tmp_path / "data", num_train=16)
    remote = healthy.upload(local, "train", "scenes")
    overrides = {"train.num_steps": 2, "checkpoint.every_steps": 2}
    from_disk = loop.run(tiny_config(local, **overrides), tmp_path / "disk", progress=False)
    from_bucket = loop.run(tiny_config(remote, **overrides), tmp_path / "bucket", progress=False)
    assert (from_bucket.status, from_bucket.step) == ("finished", 2)
    assert_bitwise_equal(from_disk.state.params, from_bucket.state.params)


def test_evaluation_and_overlap_check_from_a_bucket_give_the_local_numbers(healthy, records):
    remote = healthy.upload(records["rsicd"], "eval", "rsicd")
    # The val split stands in for training data here: every evaluated image is then a known exact copy.
    kwargs = dict(embedder=data_fixtures.MeanEmbedder(), progress=False, train_split="val")
    local = runner.run_tasks(None, None, [f"retrieval:rsicd={records['rsicd']},split=val"],
                              train_data=str(records["rsicd"]), **kwargs)
    bucket = runner.run_tasks(None, None, [f"retrieval:rsicd={remote},split=val"], train_data=remote, **kwargs)
    assert bucket.metrics == local.metrics
    assert bucket.metrics["retrieval/rsicd/overlap/exact"] == bucket.metrics["retrieval/rsicd/standard/num_images"]
    train = overlap.TrainImages.from_data(remote, "val")
    assert train.from_sidecars == len(train.shard_paths) > 0  # the converters' sidecars, read from the bucket
    assert train.summary()["locations"] == [remote]


def test_a_missing_evaluation_folder_in_a_bucket_is_named(healthy, tmp_path, capsys):
    from geoalign_jax.eval.__main__ import main

    missing = healthy.url("eval", "no-such-set")
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--tasks", f"retrieval:x={missing}", "--no_progress", "--out", str(tmp_path)])
    assert f"data path not found: {missing}" in capsys.readouterr().err
