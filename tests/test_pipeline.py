"""The grain training pipeline (geoalign_jax.data.pipeline) on demo data made in a temporary folder."""
from __future__ import annotations

import io
import json
import pathlib
import re
import shutil

import msgpack
import numpy as np
import pytest
from PIL import Image

from data_fixtures import assert_batches_equal as _assert_batches_equal, load_demo_module, small_data_config as _config
from geoalign_jax import batch_contract, tokenizer
from geoalign_jax.data import pipeline, records, sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN = 32


demo = load_demo_module()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("pipeline-demo")
    result = demo.make_demo_data(out, num_train=NUM_TRAIN, num_val=4, num_per_class=0, image_size=64, seed=0)
    return pathlib.Path(result["scenes"])


@pytest.fixture(scope="session")
def corrupt_glob(demo_dir, tmp_path_factory) -> str:
    """The demo shards plus a shard (sorted first) of three bad records: not msgpack, format version 2, and a
    valid record whose PNG is cut off (only decoding the image finds that)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    folder = tmp_path_factory.mktemp("with-corrupt")
    for shard in sources.shard_paths(demo_dir, "train"):
        shutil.copy(shard, folder)
    good = sources.RecordSource.from_dir(demo_dir, "train")[0]
    newer = dict(good, version=2)
    newer["image"] = good["image"]
    truncated = dict(good, id="truncated-png")
    truncated["image"] = good["image"][: len(good["image"]) // 3]
    writer = ArrayRecordWriter(str(folder / "aaa-train-00000-of-00001.array_record"), "group_size:1")
    writer.write(b"\x00not a msgpack record at all\xff\xfe")
    writer.write(msgpack.packb(newer, use_bin_type=True))
    writer.write(records.encode_record({k: v for k, v in truncated.items() if k not in ("format", "version")}))
    writer.close()
    return str(folder / "*.array_record")


def test_batch_has_the_contract_shapes_with_everything_on(demo_dir):
    config = _config(demo_dir, image_size=64, num_hard_negatives=4, max_regions=4, region_crop_size=16,
                     region_view_crop_size=16, num_local_crops=2, local_crop_size=32, long_context_length=248)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    batches = pipeline.take(iterator, 3)
    spec = pipeline.batch_spec(config)
    assert set(spec) == {
        "image", "text", "long_text", "hard_negatives", "hard_negative_mask", "region_boxes", "region_mask",
        "region_text", "region_category", "region_crops", "region_view_crops", "local_crops", "local_crop_boxes",
        "decode_errors", "long_text_mask"}
    for batch in batches:
        assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()} == spec
        assert batch["decode_errors"] == 0
        # texts: SOT first; padding rows are all zero exactly where the mask is off
        assert (batch["text"][:, 0] == tokenizer.SOT_TOKEN_ID).all()
        assert (batch["long_text"][:, 0] == tokenizer.SOT_TOKEN_ID).all()
        assert batch["long_text_mask"].all()  # every demo record has a real long description
        assert batch["hard_negative_mask"].all()  # every demo image has 4 hard negatives
        assert (batch["region_text"].any(-1) == batch["region_mask"]).all()
        assert (batch["region_crops"].any((-1, -2, -3)) == batch["region_mask"]).all()
        assert (batch["region_view_crops"].any((-1, -2, -3)) == batch["region_mask"]).all()
        boxes = batch["region_boxes"][batch["region_mask"]]
        assert len(boxes) > 0 and (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert not batch["region_boxes"][~batch["region_mask"]].any()
        assert (batch["region_category"][~batch["region_mask"]] == -1).all()
        local = batch["local_crop_boxes"]
        assert (local >= 0).all() and (local <= 1).all() and (local[..., 2:] > local[..., :2]).all()
        # CLIP-normalised pixels: within the range that uint8 inputs map to
        low = (0 - np.array(batch_contract.OPENAI_MEAN)) / np.array(batch_contract.OPENAI_STD)
        high = (1 - np.array(batch_contract.OPENAI_MEAN)) / np.array(batch_contract.OPENAI_STD)
        assert (batch["image"] >= low - 1e-4).all() and (batch["image"] <= high + 1e-4).all()
    iterator.close()


def _unnormalise(image: np.ndarray) -> np.ndarray:
    return (image * np.array(batch_contract.OPENAI_STD) + np.array(batch_contract.OPENAI_MEAN)) * 255.0


def _colour_fraction(pixels: np.ndarray, colour: str) -> float:
    distance = np.linalg.norm(pixels.reshape(-1, 3) - np.array(demo.COLOURS[colour]), axis=-1)
    return float(np.mean(distance < 60))


def test_augmented_region_boxes_frame_the_named_object(demo_dir):
    """End to end: in the augmented (cropped, flipped) view, the pixels inside each captioned region's box show
    the colour its caption names, much more than the image as a whole; so do both region crops."""
    config = _config(demo_dir, image_size=64, max_regions=4, region_crop_size=24, region_view_crop_size=24,
                     hflip_prob=0.5, random_resized_crop_scale=(0.5, 1.0))
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    checked = 0
    for batch in pipeline.take(iterator, 4):
        for b in range(config.batch_size):
            image = _unnormalise(batch["image"][b])
            for r in np.flatnonzero(batch["region_mask"][b]):
                if batch["region_category"][b, r] != -1:
                    continue  # category prompts name no colour
                words = tokenizer.decode(batch["region_text"][b, r])
                colour = next(c for c in demo.COLOURS if re.search(rf"\b{c}\b", words))
                x1, y1, x2, y2 = batch["region_boxes"][b, r] * 64
                inside = image[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
                assert _colour_fraction(inside, colour) >= 0.15, (words, batch["region_boxes"][b, r])
                assert _colour_fraction(inside, colour) > 2 * _colour_fraction(image, colour)
                for key in ("region_crops", "region_view_crops"):
                    assert _colour_fraction(_unnormalise(batch[key][b, r]), colour) >= 0.15, key
                checked += 1
    iterator.close()
    assert checked >= 10


def test_per_host_batch_size_must_divide():
    with pytest.raises(ValueError, match="batch_size 6 .* not divisible by process_count 4"):
        pipeline.per_host_batch_size(6, 4)
    assert pipeline.per_host_batch_size(6, 3) == 2


def test_process_slices_are_disjoint_and_cover_the_data(demo_dir):
    source = sources.RecordSource.from_dir(demo_dir, "train")
    all_ids = sorted(source[i]["id"] for i in range(len(source)))
    assert len(all_ids) == NUM_TRAIN
    for process_count in (1, 2, 3):
        config = _config(demo_dir, num_epochs=1, seed=3)
        slices = []
        for process_index in range(process_count):
            dataset = pipeline.make_record_dataset(config, process_index=process_index, process_count=process_count)
            slices.append([records.decode_record(raw)["id"] for _, raw in dataset])
        seen = [record_id for ids in slices for record_id in ids]
        assert sorted(seen) == all_ids, f"{process_count} processes: not each record exactly once"
        sizes = [len(ids) for ids in slices]
        assert max(sizes) - min(sizes) <= 1
        if process_count > 1:  # shuffled, not a contiguous block per host
            assert slices[0] != sorted(slices[0])
    # repeating forever (training): two epochs' worth over 2 hosts holds every record exactly twice
    config = _config(demo_dir, num_epochs=None, seed=3)
    seen = []
    for process_index in range(2):
        dataset = pipeline.make_record_dataset(config, process_index=process_index, process_count=2)
        seen += [records.decode_record(dataset[i][1])["id"] for i in range(NUM_TRAIN)]
    assert sorted(seen) == sorted(all_ids * 2)


def test_same_seed_same_stream_other_seed_other_stream(demo_dir):
    first = pipeline.take(pipeline.make_train_iterator(_config(demo_dir, seed=1), process_index=0, process_count=1), 2)
    again = pipeline.take(pipeline.make_train_iterator(_config(demo_dir, seed=1), process_index=0, process_count=1), 2)
    other = pipeline.take(pipeline.make_train_iterator(_config(demo_dir, seed=2), process_index=0, process_count=1), 2)
    _assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["text"], other[0]["text"])


@pytest.fixture(scope="session")
def identical_dir(tmp_path_factory) -> pathlib.Path:
    """64 records of one and the same painted image and caption: only the augmentation tells them apart."""
    from geoalign_jax.data import prepare_formats

    root = tmp_path_factory.mktemp("identical")
    (root / "imgs").mkdir()
    rows, cols = np.mgrid[0:48, 0:48] // 8
    painted = np.stack([cols * 40, rows * 40, (cols + rows) * 20], -1).astype(np.uint8)
    Image.fromarray(painted).save(root / "imgs" / "same.png")
    lines = [{"image": "imgs/same.png", "id": f"copy-{i}", "caption": "the same scene"} for i in range(64)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare_formats.prepare_jsonl(root / "corpus.jsonl", root / "records", name="identical", progress=False)
    return root / "records"


def _changed(config, **changes):
    changed = config.copy_and_resolve_references()
    for key, value in changes.items():
        setattr(changed, key, value)
    return changed


def _global_examples(config, process_count: int, num_examples: int) -> dict[int, dict[str, np.ndarray]]:
    """The first ``num_examples`` examples of the global stream, read by ``process_count`` simulated hosts and
    keyed by global position (host ``p``'s k-th example is position ``p + k * process_count``)."""
    per_host = num_examples // process_count
    examples = {}
    for process_index in range(process_count):
        iterator = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count)
        batches = pipeline.take(iterator, per_host // pipeline.per_host_batch_size(config.batch_size, process_count))
        iterator.close()
        rows = [{key: value[row] for key, value in batch.items() if key != pipeline.DECODE_ERRORS_KEY}
                for batch in batches for row in range(len(batch["image"]))]
        for k, example in enumerate(rows):
            examples[process_index + k * process_count] = example
    assert sorted(examples) == list(range(num_examples))
    return examples


def test_hosts_draw_different_augmentations_of_identical_records(identical_dir):
    """Two hosts over 64 copies of one image: at every batch position the hosts' pixels differ (the k-th
    example of each host must not share its random draws), as they differ between positions on one host."""
    config = _config(identical_dir, batch_size=8, random_resized_crop_scale=(0.3, 1.0))
    hosts = []
    for process_index in range(2):
        iterator = pipeline.make_train_iterator(config, process_index=process_index, process_count=2)
        hosts.append(np.concatenate([batch["image"] for batch in pipeline.take(iterator, 3)]))
        iterator.close()
    assert hosts[0].shape == (12, 32, 32, 3)
    for position in range(len(hosts[0])):
        assert not np.array_equal(hosts[0][position], hosts[1][position]), f"batch row {position}: same pixels"
    distinct = {image.tobytes() for host in hosts for image in host}
    assert len(distinct) == 24, f"only {len(distinct)} distinct augmentations among 24 examples"


def test_a_record_gets_the_same_augmentation_for_any_host_worker_or_thread_count(demo_dir):
    """Every key of the example at each global position is identical with 1, 2 and 4 simulated hosts, with 1 or
    3 read threads, and with 2 grain worker processes."""
    config = _config(demo_dir, batch_size=4, max_regions=2, region_view_crop_size=16, num_hard_negatives=2,
                     long_context_length=0)
    reference = _global_examples(config, 1, 16)
    variants = {"2 hosts": (_changed(config, read_threads=1), 2), "4 hosts": (_changed(config, read_threads=3), 4)}
    for name, (variant, process_count) in variants.items():
        for position, example in _global_examples(variant, process_count, 16).items():
            for key, value in reference[position].items():
                np.testing.assert_array_equal(example[key], value, err_msg=f"{name}: position {position} key {key}")
    # 2 workers: worker w reads host positions w, w + 2, ... and batches them itself; batches come round-robin
    workers = _changed(config, worker_count=2, worker_buffer_size=1, read_threads=1)
    iterator = pipeline.make_train_iterator(workers, process_index=0, process_count=1)
    batches = pipeline.take(iterator, 4)
    iterator.close()
    for index, batch in enumerate(batches):
        worker, worker_batch = index % 2, index // 2
        for row in range(config.batch_size):
            position = worker + 2 * (worker_batch * config.batch_size + row)
            for key, value in reference[position].items():
                np.testing.assert_array_equal(batch[key][row], value, err_msg=f"2 workers: position {position} {key}")


def test_the_same_record_is_augmented_anew_every_epoch(identical_dir):
    """Unshuffled, record i sits at positions i and 64 + i: the two epochs draw different augmentations."""
    config = _config(identical_dir, batch_size=64, shuffle=False, num_epochs=2)
    first, second = (batch["image"] for batch in pipeline.make_train_dataset(config, process_index=0, process_count=1))
    assert all(not np.array_equal(a, b) for a, b in zip(first, second))


def test_resume_on_a_host_of_several_continues_the_stream(demo_dir):
    """Host 1 of 2, state taken in the first epoch's last batch and resumed across the epoch boundary."""
    config = _config(demo_dir, batch_size=4, num_hard_negatives=2, long_context_length=0)
    uninterrupted = pipeline.take(pipeline.make_train_iterator(config, process_index=1, process_count=2), 10)
    iterator = pipeline.make_train_iterator(config, process_index=1, process_count=2)
    pipeline.take(iterator, 7)  # 16 records per host per epoch, 2 per batch: batch 8 ends the epoch
    state = pipeline.iterator_state(iterator)
    iterator.close()
    resumed = pipeline.make_train_iterator(config, process_index=1, process_count=2, state=state)
    _assert_batches_equal(uninterrupted[7:], pipeline.take(resumed, 3))
    resumed.close()


def test_finite_epochs_end(demo_dir):
    config = _config(demo_dir, num_epochs=2, batch_size=5)
    batches = list(pipeline.make_train_dataset(config, process_index=0, process_count=1))
    assert len(batches) == (2 * NUM_TRAIN) // 5


def test_resume_from_saved_state_continues_the_stream(demo_dir, tmp_path):
    """State after 2 batches, restored into fresh iterators (JSON bytes, and orbax + grain's handler), gives
    exactly batches 3..6 of the uninterrupted run."""
    import grain
    import orbax.checkpoint as ocp

    config = _config(demo_dir, max_regions=2, num_hard_negatives=2, long_context_length=0)
    uninterrupted = pipeline.take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 6)

    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    _assert_batches_equal(uninterrupted[:2], pipeline.take(iterator, 2))
    state = pipeline.iterator_state(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    pipeline.take(iterator, 3)  # move on: the saved state must not depend on the live iterator

    resumed = pipeline.make_train_iterator(config, process_index=0, process_count=1, state=state)
    _assert_batches_equal(uninterrupted[2:], pipeline.take(resumed, 4))

    restored = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"iter": grain.checkpoint.CheckpointHandler()}) as mgr:
        mgr.restore(2, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(uninterrupted[2:], pipeline.take(restored, 4))

    with pytest.raises(ValueError, match="not from geoalign_jax.data.pipeline"):
        pipeline.restore_iterator_state(restored, {"next_index": 3})


def test_bad_records_are_skipped_counted_and_named(corrupt_glob, caplog):
    config = _config(corrupt_glob, shuffle=False, num_epochs=2)
    with caplog.at_level("WARNING", logger="geoalign_jax.data.pipeline"):
        batches = list(pipeline.make_train_dataset(config, process_index=0, process_count=1))
    per_epoch = NUM_TRAIN // config.batch_size
    assert len(batches) == 2 * per_epoch  # every good record used, no crash
    assert [int(b["decode_errors"]) for b in batches] == [3] * per_epoch + [6] * per_epoch
    messages = [r.getMessage() for r in caplog.records]
    shard = "aaa-train-00000-of-00001.array_record"
    for pattern in (rf"{shard} record 0: .*broken record", rf"{shard} record 1: .*version 2",
                    rf"id=truncated-png at .*{shard} record 2"):
        assert sum(bool(re.search(pattern, m)) for m in messages) == 2, pattern  # once per epoch, same place


def test_two_workers_resume_and_count_skips(corrupt_glob):
    """With 2 worker processes: the skip count is exact (summed over workers in the data), and a restored
    state continues with exactly the batches of the uninterrupted run."""
    config = _config(corrupt_glob, shuffle=False, worker_count=2, worker_buffer_size=1, read_threads=1)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    first = pipeline.take(iterator, 3)
    state = pipeline.iterator_state(iterator)
    uninterrupted = first + pipeline.take(iterator, 3)  # taking the state does not disturb the stream
    iterator.close()
    # worker 0 reads records 0, 2, 4, ...; worker 1 reads 1, 3, ...: the three bad records come first
    assert [int(b["decode_errors"]) for b in uninterrupted] == [2, 3, 3, 3, 3, 3]

    resumed = pipeline.make_train_iterator(config, process_index=0, process_count=1, state=state)
    _assert_batches_equal(uninterrupted[3:], pipeline.take(resumed, 3))
    resumed.close()


def test_demo_image_decodes_like_the_source(demo_dir):
    """The global view without augmentation is the record's image resized + normalised (no silent shift)."""
    config = _config(demo_dir, random_resized_crop=False, hflip_prob=0.0, shuffle=False, image_size=64)
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    record = sources.RecordSource.from_dir(demo_dir, "train")[0]
    expected = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"), np.float32)
    np.testing.assert_allclose(_unnormalise(batch["image"][0]), expected, atol=0.05)


def test_real_dota_boxes_survive_the_pipeline(shared_data, tmp_path):
    """Real DOTA images (large PNGs, many oriented boxes as axis-aligned regions): without augmentation every
    emitted box is one of the record's boxes normalised; with augmentation boxes stay valid and crops exist."""
    from geoalign_jax.data import prepare_detection

    dota = shared_data / "dota_sample"
    prepare_detection.prepare_dota(dota / "images", dota / "labelTxt", tmp_path / "dota", progress=False)
    source = sources.RecordSource.from_dir(tmp_path / "dota", "train")
    boxes_by_size = {}
    for index in range(len(source)):
        record = source[index]
        scale = np.array([record["width"], record["height"]] * 2, np.float64)
        boxes_by_size[(record["width"], record["height"])] = np.array([r["box"] for r in record["regions"]]) / scale

    plain = _config(tmp_path / "dota", batch_size=2, image_size=64, max_regions=8, random_resized_crop=False,
                    hflip_prob=0.0, min_box_size_px=0.0, shuffle=False)
    batch = next(pipeline.make_train_iterator(plain, process_index=0, process_count=1))
    for b, record_boxes in enumerate(boxes_by_size.values()):
        kept = batch["region_boxes"][b][batch["region_mask"][b]]
        assert len(kept) == min(8, len(record_boxes))
        for box in kept:
            assert np.abs(record_boxes - box).max(axis=1).min() < 1e-5

    augmented = _config(tmp_path / "dota", batch_size=2, image_size=64, max_regions=8, region_crop_size=16)
    for batch in pipeline.take(pipeline.make_train_iterator(augmented, process_index=0, process_count=1), 3):
        mask = batch["region_mask"]
        assert mask.any() and batch["decode_errors"] == 0
        boxes = batch["region_boxes"][mask]
        assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (batch["region_category"][mask] >= 0).all()  # DOTA regions are categories, not free text
        assert (batch["region_crops"].any((-1, -2, -3)) == mask).all()


def _category_dataset(root: pathlib.Path, name: str, categories: list[str]) -> None:
    from geoalign_jax.data import prepare_formats

    (root / "imgs").mkdir(parents=True)
    Image.new("RGB", (32, 32), (30, 90, 150)).save(root / "imgs" / "a.png")
    lines = [{"image": "imgs/a.png", "id": f"{name}-{i}", "caption": f"scene {i}",
              "regions": [{"box": [2, 2, 20, 20], "category": category}]} for i, category in enumerate(categories)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare_formats.prepare_jsonl(root / "corpus.jsonl", root / "records", name=name, progress=False)


def test_shards_of_datasets_with_separate_category_numberings_need_category_ids(tmp_path):
    _category_dataset(tmp_path / "one", "one", ["ship", "harbor"])      # harbor=0, ship=1
    _category_dataset(tmp_path / "two", "two", ["ship", "airplane"])    # airplane=0, ship=1
    _category_dataset(tmp_path / "three", "three", ["harbor", "ship"])  # same names as "one"
    mixed = _config(tmp_path / "[ot][nw][eo]" / "records" / "*.array_record", max_regions=2)
    with pytest.raises(ValueError, match=r"spans 2 datasets .*category_ids is empty.*category_names differ.*"
                                         r"Set data\.category_ids"):
        pipeline.open_train_source(mixed)
    mixed.category_ids = {"airplane": 0, "harbor": 1, "ship": 2}  # one numbering for both: allowed
    assert len(pipeline.open_train_source(mixed)) == 4
    without_regions = _config(mixed.train_shards, max_regions=0)  # category ids unused: allowed
    assert len(pipeline.open_train_source(without_regions)) == 4
    agreeing = _config(tmp_path / "[ot][nh][er]*" / "records" / "*.array_record", max_regions=2)
    assert len(pipeline.open_train_source(agreeing)) == 4  # "one" and "three" list the same category_names
    bare = tmp_path / "bare"
    bare.mkdir()
    for folder in ("one", "three"):  # shards copied without their manifests: nothing says what the ids mean
        for shard in (tmp_path / folder / "records").glob("*.array_record"):
            shutil.copy(shard, bare)
    with pytest.raises(ValueError, match=r"spans 2 datasets .*no manifest\.json beside"):
        pipeline.open_train_source(_config(bare / "*.array_record", max_regions=2))
    assert len(pipeline.open_train_source(_config(tmp_path / "one" / "records", max_regions=2))) == 2
