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


def test_a_segmentation_folder_in_a_bucket_reads_like_the_local_one(healthy, tmp_path):
    import numpy as np
    from PIL import Image

    from geoalign_jax.data import prepare_segmentation
    from geoalign_jax.eval import datasets, provenance, seg_data
    from geoalign_jax.eval.task_spec import parse_task

    rng = np.random.default_rng(0)
    for folder in ("img", "ann"):
        (tmp_path / folder).mkdir()
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"t{index}.png")
        Image.fromarray(rng.integers(1, 3, (12, 16), dtype=np.uint8)).save(tmp_path / "ann" / f"t{index}.png")
    prepare_segmentation.prepare_segmentation(tmp_path / "img", tmp_path / "ann", tmp_path / "seg",
                                              classes=[["a"], ["b"]], split="val", reduce_zero_label=True)
    remote = healthy.upload(tmp_path / "seg", "eval", "seg")
    local, bucket = seg_data.load_segmentation(tmp_path / "seg"), seg_data.load_segmentation(remote)
    assert seg_data.is_segmentation_dir(remote) and not seg_data.is_segmentation_dir(healthy.url("eval"))
    assert runner.resolve_split(parse_task(f"segmentation:seg={remote}"))[:2] == ("val", "seg")
    assert bucket.images.where(1).startswith(remote + "/") and bucket.description.endswith(local.description[-40:])
    for index in range(2):
        for ours, theirs in zip(bucket.pair(index), local.pair(index)):
            np.testing.assert_array_equal(ours, theirs)
    digests = provenance.image_digests(local.images)
    assert provenance.image_digests(bucket.images) == digests
    assert provenance.segmentation_items(bucket, digests) == provenance.segmentation_items(local, digests)
    healthy.fs.rm(f"{healthy.name}/eval/seg/val/masks/t1.png")
    with pytest.raises(datasets.EvalDataError, match=r"gs://.*/t1.png: cannot read the mask"):
        bucket.pair(1)
