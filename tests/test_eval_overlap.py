"""Train/test overlap on the real samples: byte copies and JPEG re-encodes of training images are found
(and named), distinct images are not; the converters' fingerprint sidecars; leaving overlapping images out."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import data_fixtures
from geoalign_jax.data import prepare_formats, fingerprints, sources
from geoalign_jax.eval import datasets, runner, overlap, provenance
from geoalign_jax.evaluate import main

records = data_fixtures.records  # the real AID (split test) / RSICD (train, val) / DOTA (train) samples
QUIET = {"progress": False}


def _reencode(data: bytes, fmt: str = "JPEG", quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _all_shards(records) -> list[str]:
    return [*sources.shard_paths(records["aid"], "test"), *sources.shard_paths(records["rsicd"], "train"),
            *sources.shard_paths(records["rsicd"], "val"), *sources.shard_paths(records["dota"], "train")]


def test_converter_sidecars_hold_each_records_fingerprint(records):
    manifest = sources.read_manifest(records["aid"])
    shards = sources.shard_paths(records["aid"], "test")
    assert manifest["image_hashes"]["test"] == [fingerprints.sidecar_path(p).name for p in shards]
    source = sources.RecordSource(shards)
    rows = np.concatenate([fingerprints.read_sidecar(fingerprints.sidecar_path(p)) for p in shards])
    assert len(rows) == len(source) == 120
    for index in (0, 57, 119):
        digest, phash = fingerprints.fingerprint(source[index]["image"])  # decoded again, from the stored bytes
        assert bytes(rows[index]["sha256"]) == digest and int(rows[index]["phash"]) == phash


def test_hamming_index_returns_exactly_the_pairs_within_the_radius():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2**63, 3000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    queries = []
    for flips in range(12):  # near neighbours at every distance 0..11, on random bits
        for row in rng.choice(len(stored), 4, replace=False):
            mask = sum(1 << int(bit) for bit in rng.choice(64, flips, replace=False))
            queries.append(int(stored[row]) ^ mask)
    queries = np.asarray(queries + [int(v) for v in rng.integers(0, 2**63, 50)], np.uint64)
    query, index, distance = overlap.HammingIndex(stored, max_distance=8).query(queries, chunk=37)
    brute = fingerprints.hamming(queries[:, None], stored[None, :])
    expected = sorted(zip(*np.nonzero(brute <= 8)))
    assert sorted(zip(query.tolist(), index.tolist())) == [(int(q), int(i)) for q, i in expected]
    assert np.array_equal(distance, brute[query, index])
    assert len(expected) >= 9 * 4  # every planted neighbour within 8 bits is among them


def test_re_encoded_copies_stay_close_and_distinct_shared_images_stay_apart(records):
    """Every image of the shared samples (AID, RSICD, DOTA) re-encoded at JPEG quality 30..95 and as PNG is
    a near duplicate of itself (hash and all thumbnail tests), and of no other image; no two distinct images
    pass the thumbnail tests, whatever their hashes."""
    source = sources.RecordSource(_all_shards(records))
    images = [source[i]["image"] for i in range(len(source))]
    thumbs = [fingerprints.thumbnail_from_bytes(data) for data in images]
    hashes = np.asarray([fingerprints.perceptual_hash(thumb) for thumb in thumbs], np.uint64)
    index = overlap.HammingIndex(hashes)
    query, found, _ = index.query(hashes)
    assert sorted(zip(query.tolist(), found.tolist())) == [(i, i) for i in range(len(images))]
    criteria = overlap.NearDuplicateCriteria()
    for variant in ({"quality": 30}, {"quality": 50}, {"quality": 75}, {"quality": 95}, {"fmt": "PNG"}):
        copies = [fingerprints.thumbnail_from_bytes(_reencode(data, **variant)) for data in images]
        query, found, _ = index.query(np.asarray([fingerprints.perceptual_hash(t) for t in copies], np.uint64))
        assert sorted(zip(query.tolist(), found.tolist())) == [(i, i) for i in range(len(images))], variant
        assert all(criteria.compare(a, b)["confirmed"] for a, b in zip(thumbs, copies)), variant
    pixels = np.stack(thumbs).reshape(len(thumbs), -1).astype(np.int16)
    close = [(i, j) for i in range(len(pixels))
             for j in np.flatnonzero(np.abs(pixels[i] - pixels[i + 1:]).mean(1) <= 4) + i + 1]
    assert not [(i, j) for i, j in close if criteria.compare(thumbs[i], thumbs[j])["confirmed"]]


# The one pair of distinct images among 15,200 random square crops of the shared samples whose hashes (6 bits
# apart) and thumbnails (3.8 grey levels apart) both pass: low-texture crops of two RSICD images. Crop box
# (left, top, right, bottom) and transpose as the reviewer's crops drew them.
POND = ("rsicd_sample/images/pond_195.jpg", (60, 49, 137, 126), Image.Transpose.ROTATE_180)
MEADOW = ("rsicd_sample/images/meadow_137.jpg", (72, 72, 213, 213), None)


def _crop(shared_data, path, box, transpose) -> Image.Image:
    image = Image.open(shared_data / path).convert("RGB").crop(box)
    return image.transpose(transpose) if transpose is not None else image


def _encode(image: Image.Image, fmt: str = "PNG", quality: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if quality else {}))
    return buffer.getvalue()


def test_distinct_low_texture_images_with_close_hashes_and_thumbnails_are_not_overlap(shared_data, tmp_path):
    pond, meadow = _crop(shared_data, *POND), _crop(shared_data, *MEADOW)
    thumbs = [fingerprints.thumbnail_from_bytes(_encode(image)) for image in (pond, meadow)]
    assert fingerprints.hamming(*map(fingerprints.perceptual_hash, thumbs)) <= overlap.DEFAULT_MAX_DISTANCE
    compared = overlap.NearDuplicateCriteria().compare(*thumbs)
    assert compared["thumbnail_difference"] <= overlap.DEFAULT_MAX_THUMBNAIL_DIFFERENCE  # the first two tests pass
    assert not compared["flat"] and compared["thumbnail_correlation"] < 0.55 and not compared["confirmed"]

    # End to end: the meadow crop is a training image; evaluated are the pond crop and the meadow crop
    # re-encoded at JPEG quality 30 (a real copy, found).
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "meadow.png").write_bytes(_encode(meadow))
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "images/meadow.png", "caption": "a meadow"}))
    prepare_formats.prepare_jsonl(tmp_path / "train.jsonl", tmp_path / "train", name="crops", **QUIET)
    train = overlap.TrainImages.from_data(tmp_path / "train")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "pond.png").write_bytes(_encode(pond))
    (tmp_path / "eval" / "meadow_q30.jpg").write_bytes(_encode(meadow, "JPEG", 30))
    images = datasets.FolderImages([tmp_path / "eval" / "pond.png", tmp_path / "eval" / "meadow_q30.jpg"])
    found = overlap.check_images(images, provenance.image_digests(images), train)
    assert found.indices == [1] and found.matches[0]["thumbnail_correlation"] >= 0.9
    without_correlation = overlap.NearDuplicateCriteria(min_thumbnail_correlation=-1.0)
    assert overlap.check_images(images, provenance.image_digests(images), train,
                                criteria=without_correlation).indices == [0, 1]  # what the third test prevents


def test_flat_thumbnails_are_compared_by_their_grey_level_alone():
    """Below the flat threshold a thumbnail is rounding noise: two flat ones match when their grey levels
    do; a flat one never matches a textured one, however close their grey levels."""
    criteria = overlap.NearDuplicateCriteria()
    grey = np.full((32, 32), 100, np.uint8)
    assert criteria.compare(grey, grey + 2) == {"confirmed": True, "thumbnail_difference": 2.0,
                                                "thumbnail_correlation": None, "flat": True}
    assert not criteria.compare(grey, grey + 5)["confirmed"]
    rng = np.random.default_rng(0)
    noise = [(100 + rng.normal(0, 0.6, (32, 32))).round().astype(np.uint8) for _ in range(2)]
    assert criteria.compare(*noise)["flat"] and criteria.compare(*noise)["confirmed"]
    checker = grey + (np.indices((32, 32)).sum(0) % 2 * 2 * criteria.flat_thumbnail_std * 1.5).astype(np.uint8)
    textured = criteria.compare(grey, checker)
    assert textured["thumbnail_difference"] <= 4 and not textured["flat"]
    assert textured["thumbnail_correlation"] == 0.0 and not textured["confirmed"]


@pytest.fixture(scope="module")
def leaked(shared_data, records, tmp_path_factory):
    """A training corpus (JSONL) holding two RSICD val images, one as a byte copy and one re-encoded at
    JPEG quality 40, plus six AID images; and a class-folder eval set mixing copies and distinct images."""
    root = tmp_path_factory.mktemp("leaked")
    val = datasets.load_retrieval(records["rsicd"], split="val")
    copied, reencoded = val.images.image_bytes(2), _reencode(val.images.image_bytes(9), quality=40)
    (root / "images").mkdir()
    (root / "images" / "copied.jpg").write_bytes(copied)
    (root / "images" / "reencoded.jpg").write_bytes(reencoded)
    lines = [{"image": "images/copied.jpg", "id": "copied", "caption": "a leaked test image"},
             {"image": "images/reencoded.jpg", "id": "reencoded", "caption": "a re-encoded test image"}]
    for path in sorted((shared_data / "aid_sample" / "Beach").iterdir())[:3] + \
            sorted((shared_data / "aid_sample" / "Forest").iterdir())[:3]:
        shutil.copy(path, root / "images" / path.name)
        lines.append({"image": f"images/{path.name}", "caption": f"a scene {path.stem}"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    prepare_formats.prepare_jsonl(root / "train.jsonl", root / "train", name="corpus", num_shards=2, **QUIET)
    return {"train": root / "train", "val_positions": (2, 9), "root": root}


def test_copies_and_re_encodes_of_training_images_are_named(shared_data, records, leaked, tmp_path, monkeypatch):
    monkeypatch.chdir(leaked["train"].parent)
    train = overlap.TrainImages.from_data(leaked["train"].name)  # a relative path is recorded absolute
    assert len(train) == 8 and train.from_sidecars == 2
    assert train.summary()["locations"] == [str(leaked["train"])]
    results = runner.check_overlap([f"retrieval:rsicd={records['rsicd']},split=val",
                                     f"retrieval:rsicdtrain={records['rsicd']},split=train",
                                     f"zeroshot:aid={shared_data / 'aid_sample'}"], train)
    val = results["retrieval/rsicd"]
    assert (val.checked, val.exact, val.near_duplicates, val.indices) == (21, 1, 1, [2, 9])
    exact, near = val.matches
    assert exact["match"] == "exact" and "(id copied)" in exact["train"] and "[val][2]" in exact["eval"]
    assert near["match"] == "near_duplicate" and "(id reencoded)" in near["train"]
    assert 0 <= near["hash_distance"] <= 8 and 0 < near["thumbnail_difference"] <= 4
    assert near["thumbnail_correlation"] >= overlap.DEFAULT_MIN_THUMBNAIL_CORRELATION and not near["flat"]
    assert results["retrieval/rsicdtrain"].matches == []  # 99 distinct images
    aid = results["zeroshot/aid"]  # the class folders themselves: the six copied AID files, byte-identical
    assert (aid.exact, aid.near_duplicates) == (6, 0)
    assert sorted(m["eval"].split("/")[-1] for m in aid.matches) == \
        sorted(p.name for p in (leaked["root"] / "images").iterdir() if p.name not in ("copied.jpg", "reencoded.jpg"))


def test_missing_or_stale_sidecars_are_recomputed(leaked, tmp_path, caplog):
    shards = sources.shard_paths(leaked["train"], "train")
    expected = [fingerprints.read_sidecar(fingerprints.sidecar_path(p)) for p in shards]
    copies = []
    for path in shards:
        shutil.copy(path, tmp_path)
        copies.append(str(tmp_path / os.path.basename(path)))
    shutil.copy(fingerprints.sidecar_path(shards[0]), fingerprints.sidecar_path(copies[1]))  # same length, stale
    with caplog.at_level(logging.WARNING):
        train = overlap.TrainImages.from_shards(copies)
    assert "does not hash record" in caplog.text and "fingerprinted 8 training images by decoding" in caplog.text
    assert f"python -m geoalign_jax.prepare fingerprints '{tmp_path / '*.array_record'}'" in caplog.text
    assert train.from_sidecars == 0
    assert np.array_equal(train.rows, np.concatenate(expected))


def _shard_with_a_cut_off_image(records, path) -> None:
    """A shard without a sidecar (as another tool writes it): record 0 a good JPEG, record 1 cut off."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from geoalign_jax.data import records as records_lib

    good = datasets.load_retrieval(records["rsicd"], split="val").images.image_bytes(0)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for index, image in enumerate((good, good[: len(good) // 3])):
        writer.write(records_lib.encode_record(records_lib.make_record(
            id=f"r{index}", source="other", split="train", image=image, width=224, height=224, captions=["c"])))
    writer.close()


def test_shards_without_sidecars_are_decoded_in_parallel_and_an_unreadable_one_is_named(records, leaked,
                                                                                        tmp_path, monkeypatch):
    from geoalign_jax.data import parallel_map

    shards = sources.shard_paths(leaked["train"], "train")
    expected = [fingerprints.read_sidecar(fingerprints.sidecar_path(p)) for p in shards]
    copies = [shutil.copy(path, tmp_path) for path in shards]  # without their sidecars
    broken = str(tmp_path / "other-train-00000-of-00001.array_record")
    _shard_with_a_cut_off_image(records, broken)
    pools = []
    real_map = parallel_map.ordered_parallel_map
    monkeypatch.setattr(parallel_map, "ordered_parallel_map",
                        lambda function, items, workers, **kw: pools.append(workers) or real_map(
                            function, items, workers, **kw))
    found = list(fingerprints.compute_fingerprints([*copies, broken], workers=2, min_images_per_worker=1))
    assert pools == [2]  # two worker processes decoded the 10 images
    assert [path for path, _ in found] == [*copies, broken]
    for (_, rows), want in zip(found, expected):
        assert np.array_equal(rows, want)  # the same rows the converter wrote
    assert isinstance(found[2][1], fingerprints.ShardReadError)
    assert f"{broken} record 1: cannot decode its image" in str(found[2][1])
    assert list(fingerprints.compute_fingerprints(copies, workers=2)) and pools[-1] == 1  # 8 images: no pool


def test_an_undecodable_training_image_is_an_error_naming_its_shard_and_record(records, tmp_path, capsys):
    """A shard without a sidecar (written by another tool) holding a cut-off JPEG: one line naming the shard and
    record, from the library and from the CLI, not a PIL traceback."""
    path = tmp_path / "other-train-00000-of-00001.array_record"
    _shard_with_a_cut_off_image(records, path)
    with pytest.raises(overlap.OverlapError, match=rf"{path.name} record 1: cannot decode its image"):
        overlap.TrainImages.from_shards([path])
    code = main(["--model", "tiny", "--tasks", f"retrieval:rsicd={records['rsicd']},split=val", "--no_progress",
                 "--no_plots", "--out", str(tmp_path / "o"), "--train-data", str(path)])
    assert code == 2 and f"{path.name} record 1: cannot decode" in capsys.readouterr().err


def test_exclude_overlap_evaluates_without_the_copies_and_says_so(records, leaked):
    task = f"retrieval:rsicd={records['rsicd']},split=val"
    kept = runner.run_tasks(None, None, [task], embedder=data_fixtures.MeanEmbedder(), progress=False,
                             train_data=str(leaked["train"]))
    assert kept.metrics["retrieval/rsicd/standard/num_images"] == 21
    assert (kept.metrics["retrieval/rsicd/overlap/exact"], kept.metrics["retrieval/rsicd/overlap/near_duplicates"]) \
        == (1, 1)
    assert "INCLUDED" in kept.notes["retrieval/rsicd"][0]
    left_out = runner.run_tasks(None, None, [task], embedder=data_fixtures.MeanEmbedder(), progress=False,
                                 train_data=str(leaked["train"]), exclude_overlap=True)
    assert left_out.metrics["retrieval/rsicd/standard/num_images"] == 19
    assert left_out.metrics["retrieval/rsicd/overlap/excluded"] == 2
    assert "left out of these numbers" in left_out.notes["retrieval/rsicd"][0]
    entry = left_out.provenance["tasks"]["retrieval/rsicd"]
    assert entry["records"] == 19 and entry["overlap"]["excluded"] and len(entry["overlap"]["images"]) == 2
    data = datasets.load_retrieval(records["rsicd"], split="val")
    rest = overlap.without_images(data, list(leaked["val_positions"]))
    assert entry["content_sha256"] == provenance.content_hashes(
        "retrieval", rest, provenance.image_digests(rest.images))["content_sha256"]
    assert entry["content_sha256"] != kept.provenance["tasks"]["retrieval/rsicd"]["content_sha256"]


def test_cli_reports_and_excludes_the_overlap(records, leaked, tmp_path, capsys):
    args = ["--model", "tiny", "--tasks", f"retrieval:rsicd={records['rsicd']},split=val", "--no_progress",
            "--no_plots", "--batch_size", "16", "--train-data", str(leaked["train"])]
    assert main([*args, "--out", str(tmp_path / "o"), "--exclude-overlap"]) == 0
    printed = capsys.readouterr().out
    assert "! retrieval/rsicd: 2 of 21 images also in the training data (1 exact, 1 re-encoded): left out" in printed
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["run"]["exclude_overlap"] is True and results["run"]["train_data"] == [str(leaked["train"])]
    found = results["provenance"]["tasks"]["retrieval/rsicd"]["overlap"]
    assert (found["exact"], found["near_duplicates"], found["excluded"]) == (1, 1, True)
    criteria = found["criteria"]  # the thresholds the numbers were checked with
    assert (criteria["max_hash_distance"], criteria["max_thumbnail_difference"], criteria["min_thumbnail_correlation"],
            criteria["flat_thumbnail_std"]) == (8, 4.0, 0.7, 1.0)
    assert found["train_data"]["records"] == 8
    assert results["metrics"]["retrieval/rsicd/standard/num_images"] == 19
    with pytest.raises(SystemExit):
        main([*args[:-2], "--out", str(tmp_path / "p"), "--exclude-overlap"])
    assert "--exclude-overlap needs --train-data" in capsys.readouterr().err
