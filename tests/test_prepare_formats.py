"""Dataset converters on fixtures built here (every kind of bad input) and on the real RS samples."""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from geoalign_jax.data import prepare_detection, prepare_formats, record_builder, records, skip_accounting, sources
from geoalign_jax.data.skip_accounting import ConversionError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
QUIET = {"progress": False}


def _save_image(path: pathlib.Path, size=(16, 12), color=(40, 120, 200), fmt=None) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = (rng.integers(0, 255, (size[1], size[0], 3)) // 2 + np.array(color) // 2).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _truncated_jpeg(path: pathlib.Path) -> pathlib.Path:
    _save_image(path, size=(64, 64), fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact (PIL opens it), pixel data cut
    return path


def _records(out_dir, split) -> list[dict]:
    source = sources.RecordSource.from_dir(out_dir, split)
    return [source[i] for i in range(len(source))]


def _decode_pixels(record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))


# ---------------------------------------------------------------------------------------------------------
# Shared rules


def test_clip_box_rule():
    assert record_builder.clip_box([2, 3, 8, 9], 10, 10, 0.5) == ([2.0, 3.0, 8.0, 9.0], None)
    assert record_builder.clip_box([-2, 0, 8, 10], 10, 10, 0.5) == ([0.0, 0.0, 8.0, 10.0], None)  # 80% inside: clipped
    assert record_builder.clip_box([6, 0, 14, 10], 10, 10, 0.5) == ([6.0, 0.0, 10.0, 10.0], None)  # exactly 50%: kept
    assert record_builder.clip_box([6, 0, 16, 10], 10, 10, 0.5) == (None, skip_accounting.BOX_OUTSIDE_IMAGE)  # 40%: dropped
    assert record_builder.clip_box([6, 0, 16, 10], 10, 10, 0.4)[1] is None
    assert record_builder.clip_box([11, 0, 14, 10], 10, 10, 0.5) == (None, skip_accounting.BOX_OUTSIDE_IMAGE)
    assert record_builder.clip_box([5, 5, 5, 8], 10, 10, 0.5) == (None, skip_accounting.DEGENERATE_BOX)
    assert record_builder.clip_box([5, 5, 3, 8], 10, 10, 0.5) == (None, skip_accounting.DEGENERATE_BOX)
    assert record_builder.clip_box([0, 0, float("inf"), 8], 10, 10, 0.5) == (None, skip_accounting.DEGENERATE_BOX)


@pytest.mark.parametrize("folder, readable", [
    ("DenseResidential", "dense residential"), ("sparse_residential", "sparse residential"),
    ("storage-tanks", "storage tanks"), ("SeaLake", "sea lake"), ("Forest", "forest"),
    ("baseball_diamond", "baseball diamond"), ("UCMerced", "uc merced"),
])
def test_readable_class_name(folder, readable):
    assert prepare_formats.readable_class_name(folder) == readable


# ---------------------------------------------------------------------------------------------------------
# Karpathy JSON


def _karpathy_fixture(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    images = tmp_path / "images"
    for name in ("a.jpg", "b.png", "c.jpg", "e.jpg"):
        _save_image(images / name, fmt="JPEG" if name.endswith("jpg") else "PNG")
    _truncated_jpeg(images / "broken.jpg")
    sentences = lambda *texts: [{"raw": t, "tokens": t.split()} for t in texts]  # noqa: E731
    data = {"dataset": "toy", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": sentences("a road", "a river"), "label": "Port"},
        {"filename": "b.png", "split": "test", "sentences": sentences("a bridge", "   "), "label": "bridge"},
        {"filename": "broken.jpg", "split": "train", "sentences": sentences("a farm"), "label": "Port"},
        {"filename": "missing.jpg", "split": "train", "sentences": sentences("a lake"), "label": "Port"},
        {"filename": "c.jpg", "split": "train", "sentences": sentences("", " "), "label": "Port"},
        {"filename": "e.jpg", "split": "restval", "sentences": sentences("a field"), "label": "bridge"},
        {"split": "train", "sentences": []},
    ]}
    json_path = tmp_path / "dataset_toy.json"
    json_path.write_text(json.dumps(data))
    return json_path, images


def test_karpathy_fixture_skips_and_reports_every_bad_input(tmp_path):
    json_path, images = _karpathy_fixture(tmp_path)
    out = tmp_path / "out"
    summary = prepare_formats.prepare_karpathy(json_path, images, out, split_map={"restval": "train"},
                                          max_bad_fraction=1.0, num_shards=2, **QUIET)
    assert summary.written == {"train": 2, "test": 1}
    assert summary.skipped == {"broken image": 1, "missing image": 1, "no captions": 1, "empty caption": 3,
                               "malformed annotation": 1}
    assert summary.skipped_examples["broken image"] == ["broken.jpg"]
    assert summary.skipped_examples["missing image"] == ["missing.jpg"]
    assert summary.skipped_examples["no captions"] == ["c.jpg"]
    assert summary.skipped_examples["malformed annotation"] == ["dataset_toy.json:images[6]"]
    # inputs: 7 entries, 4 dropped; annotations: captions of the 4 images that loaded (a, b, c, e), 3 blank
    assert (summary.records_seen, summary.records_skipped) == (7, 4)
    assert (summary.annotations_seen, summary.annotations_skipped) == (7, 3)
    manifest = sources.read_manifest(out)
    assert manifest["skipped"] == summary.skipped and manifest["name"] == "toy"
    # shards are sized from the 5 train inputs (3 per shard); 3 were skipped, so 1 shard is enough
    assert manifest["splits"]["train"] == {"count": 2, "shards": ["toy-train-00000-of-00001.array_record"]}
    assert manifest["class_names"] == ["port", "bridge"] and manifest["raw_class_names"] == ["Port", "bridge"]
    train = _records(out, "train")
    assert [r["id"] for r in train] == ["a.jpg", "e.jpg"]  # JSON order, renamed split
    assert train[0]["captions"] == ["a road", "a river"] and train[0]["label"] == 0 and train[0]["class_name"] == "port"
    test = _records(out, "test")
    assert test[0]["captions"] == ["a bridge"] and test[0]["label"] == 1
    # stored bytes are the source file's bytes, untouched
    assert test[0]["image"] == (images / "b.png").read_bytes()
    assert (test[0]["width"], test[0]["height"]) == (16, 12)


def test_karpathy_fails_past_bad_fraction_and_writes_nothing(tmp_path):
    json_path, images = _karpathy_fixture(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="inputs skipped") as error:
        prepare_formats.prepare_karpathy(json_path, images, out, max_bad_fraction=0.05, **QUIET)
    assert error.value.summary.skipped["missing image"] == 1
    assert "missing.jpg" in str(error.value) and "broken.jpg" in str(error.value)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.array_record")) \
        and not list(out.glob(".tmp*"))


@pytest.mark.parametrize("name, expected", [("rsitmd", 4743), ("ucm", 2100), ("sydney", 613)])
def test_real_caption_jsons_without_images_fail_as_unknown_files(shared_data, tmp_path, name, expected):
    json_path = shared_data / "captions" / f"dataset_{name}.json"
    with pytest.raises(ConversionError, match="every input was skipped") as error:
        prepare_formats.prepare_karpathy(json_path, tmp_path / "no_images", tmp_path / "out", workers=2, **QUIET)
    summary = error.value.summary
    assert summary.skipped == {"missing image": expected} and summary.records_seen == expected
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_real_rsicd_sample(shared_data, tmp_path):
    folder = shared_data / "rsicd_sample"
    data = json.loads((folder / "dataset_rsicd.json").read_text())
    out = tmp_path / "rsicd"
    summary = prepare_formats.prepare_karpathy(folder / "dataset_rsicd.json", folder / "images", out, workers=2,
                                          num_shards=2, **QUIET)
    per_split = collections.Counter(entry["split"] for entry in data["images"])
    assert summary.written == dict(per_split)
    manifest = sources.read_manifest(out)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == dict(per_split)
    assert manifest["splits"]["train"]["shards"] == [f"rsicd-train-0000{i}-of-00002.array_record" for i in (0, 1)]
    labels = sorted({entry["label"] for entry in data["images"]})
    written_captions = 0
    for split in per_split:
        expected = {e["filename"]: e for e in data["images"] if e["split"] == split}
        got = _records(out, split)
        assert [r["id"] for r in got] == list(expected)
        for record in got:
            entry = expected[record["id"]]
            assert record["captions"] == [s["raw"].strip() for s in entry["sentences"] if s["raw"].strip()]
            assert record["label"] == labels.index(entry["label"])
            assert record["image"] == (folder / "images" / record["id"]).read_bytes()
            assert (record["width"], record["height"]) == Image.open(folder / "images" / record["id"]).size
            written_captions += len(record["captions"])
    assert written_captions == sum(1 for e in data["images"] for s in e["sentences"] if s["raw"].strip())


# ---------------------------------------------------------------------------------------------------------
# Class folders


def test_real_aid_folders(shared_data, tmp_path):
    root = shared_data / "aid_sample"
    out = tmp_path / "aid"
    summary = prepare_formats.prepare_folders(root, out, name="aid", workers=2, num_shards=3, **QUIET)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(folders) == 30 and summary.written == {"test": 120}
    got = _records(out, "test")
    assert len(got) == 120
    for record in got:
        folder, file_name = record["id"].split("/")
        assert record["label"] == folders.index(folder)
        assert record["class_name"] == prepare_formats.readable_class_name(folder)
        assert record["image"] == (root / folder / file_name).read_bytes()
    assert collections.Counter(r["label"] for r in got) == {i: 4 for i in range(30)}
    manifest = sources.read_manifest(out)
    assert manifest["raw_class_names"] == folders
    assert manifest["class_names"][folders.index("DenseResidential")] == "dense residential"


def test_folders_reencode_tiff_losslessly_and_skip_non_images(tmp_path):
    root = tmp_path / "ucm"
    tif = _save_image(root / "sparse_residential" / "sr01.tif", size=(10, 7), fmt="TIFF")
    _save_image(root / "DenseResidential" / "dr01.png", fmt="PNG")
    (root / "DenseResidential" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored: not in a class folder")
    out = tmp_path / "out"
    summary = prepare_formats.prepare_folders(root, out, name="ucm", split="eval", max_bad_fraction=0.5, **QUIET)
    assert summary.skipped == {"not an image file": 1}
    assert summary.skipped_examples["not an image file"] == ["DenseResidential/notes.txt"]
    got = {r["id"]: r for r in _records(out, "eval")}
    record = got["sparse_residential/sr01.tif"]
    assert records.image_format(record["image"]) == "png"
    np.testing.assert_array_equal(_decode_pixels(record), np.asarray(Image.open(tif).convert("RGB")))
    assert (record["label"], record["class_name"]) == (1, "sparse residential")
    assert got["DenseResidential/dr01.png"]["label"] == 0
    with pytest.raises(ConversionError, match="no class folders"):
        prepare_formats.prepare_folders(tmp_path / "ucm" / "DenseResidential", tmp_path / "o2", name="x", **QUIET)


# ---------------------------------------------------------------------------------------------------------
# DOTA


def _valid_dota_objects(label_file: pathlib.Path) -> list[tuple[list[float], str]]:
    """Independent reading of a DOTA label file: lines with 8 numbers + category (+ difficulty)."""
    objects = []
    for line in label_file.read_text().splitlines():
        fields = line.split()
        if len(fields) in (9, 10):
            try:
                objects.append(([float(v) for v in fields[:8]], fields[8]))
            except ValueError:
                pass
    return objects


def test_real_dota_sample(shared_data, tmp_path):
    folder = shared_data / "dota_sample"
    out = tmp_path / "dota"
    summary = prepare_detection.prepare_dota(folder / "images", folder / "labelTxt", out, workers=2, **QUIET)
    assert summary.written == {"train": 2} and summary.skipped == {}
    got = {r["id"]: r for r in _records(out, "train")}
    assert set(got) == {"P0706", "P1888"}
    categories = sources.read_manifest(out)["category_names"]
    for stem, record in got.items():
        objects = _valid_dota_objects(folder / "labelTxt" / f"{stem}.txt")
        width, height = Image.open(folder / "images" / f"{stem}.png").size
        assert (record["width"], record["height"]) == (width, height)
        assert len(record["regions"]) == len(objects)
        for region, (polygon, category) in zip(record["regions"], objects):
            x1, y1, x2, y2 = region["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert x1 == max(0, min(polygon[0::2])) and y2 == min(height, max(polygon[1::2]))
            assert region["category"] == category and categories[region["category_id"]] == category
    assert sum(len(r["regions"]) for r in got.values()) == 600


def test_dota_fixture_headers_malformed_lines_and_clipping(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labelTxt"
    _save_image(images / "A.png", size=(100, 80), fmt="PNG")
    _save_image(images / "B.png", size=(50, 50), fmt="PNG")
    _save_image(images / "C.png", size=(50, 50), fmt="PNG")  # no label file
    labels.mkdir()
    (labels / "A.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.5\n"
        "10 10 30 10 30 20 10 20 plane 0\n"          # fine
        "90 70 110 70 110 90 90 90 ship 1\n"         # 25% inside -> box outside image
        "95 10 104 10 104 20 95 20 ship 0\n"         # 5/9 inside -> clipped to x2=100
        "10 10 30 10 ship\n"                          # malformed
        "200 200 210 200 210 210 200 210 plane 0\n"  # fully outside
        "5 5 5 5 5 5 5 5 plane 0\n")                 # degenerate
    (labels / "B.txt").write_text("1 1 9 1 9 9 1 9 harbor\n")  # no header, no difficulty
    (labels / "D.txt").write_text("1 1 9 1 9 9 1 9 harbor 0\n")  # no image
    out = tmp_path / "out"
    summary = prepare_detection.prepare_dota(images, labels, out, split="val", max_bad_fraction=0.7, **QUIET)
    assert summary.skipped == {"box outside image": 2, "malformed line": 1, "degenerate box": 1,
                               "missing image": 1, "no label file": 1}
    assert summary.skipped_examples["malformed line"] == ["A.txt:6"]
    assert summary.skipped_examples["no label file"] == ["C.png"]
    got = {r["id"]: r for r in _records(out, "val")}
    assert [(r["box"], r["category"]) for r in got["A"]["regions"]] == [
        ([10.0, 10.0, 30.0, 20.0], "plane"), ([95.0, 10.0, 100.0, 20.0], "ship")]
    assert got["B"]["regions"][0]["box"] == [1.0, 1.0, 9.0, 9.0]
    assert sources.read_manifest(out)["category_names"] == ["harbor", "plane", "ship"]
    summary = prepare_detection.prepare_dota(images, labels, tmp_path / "o2", skip_difficult=True, max_bad_fraction=0.7,
                                      categories=["plane", "ship", "harbor"], **QUIET)
    got = {r["id"]: r for r in _records(tmp_path / "o2", "train")}
    assert [r["category_id"] for r in got["A"]["regions"]] == [0, 1]
    assert summary.skipped["box outside image"] == 1  # the difficult object is left out, not counted bad


# ---------------------------------------------------------------------------------------------------------
# JSONL


def _jsonl_fixture(tmp_path: pathlib.Path) -> pathlib.Path:
    _save_image(tmp_path / "imgs" / "one.jpg", size=(40, 30), fmt="JPEG")
    _save_image(tmp_path / "imgs" / "two.png", size=(20, 20), fmt="PNG")
    _save_image(tmp_path / "imgs" / "three.png", size=(20, 20), fmt="PNG")
    lines = [
        json.dumps({"image": "imgs/one.jpg", "split": "train", "id": "scene-1", "caption": "an airport",
                    "captions": ["two planes"], "long_caption": "A long view of an airport with two planes.",
                    "hard_negatives": ["three planes", ""],
                    "regions": [{"box": [1, 2, 10, 12], "category": "plane", "caption": "a white plane"},
                                {"box": [30, 20, 50, 40], "category": "plane"},     # 25% inside: dropped
                                {"box": [35, 0, 44, 10], "category": "car"},       # 5/9 inside: clipped
                                {"box": [5, 5, 2, 9], "caption": "bad box"},       # degenerate
                                {"box": [1, 1, 4, 4]}]}),                            # no text
        "{not json",
        json.dumps({"split": "train", "caption": "no image field"}),
        json.dumps({"image": "imgs/two.png", "caption": "x", "colour": "red"}),
        "",
        json.dumps({"image": "imgs/two.png", "split": "val", "captions": ["a pond", "  "]}),
        json.dumps({"image": "imgs/missing.png", "caption": "a ghost"}),
        json.dumps({"image": "imgs/three.png", "caption": " "}),
        json.dumps({"image": "imgs/two.png", "split": "val", "caption": "same id again"}),
        json.dumps({"image": "imgs/three.png", "id": "t", "regions": [{"box": [1, 1, 5, "x"], "category": "a"}]}),
        json.dumps({"image": "imgs/three.png", "id": "u", "captions": ["ok", 3]}),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_fixture(tmp_path):
    path = _jsonl_fixture(tmp_path)
    out = tmp_path / "out"
    summary = prepare_formats.prepare_jsonl(path, out, name="corpus", max_bad_fraction=1.0, **QUIET)
    assert summary.written == {"train": 1, "val": 1}
    assert summary.skipped == {"malformed line": 5, "missing image": 1, "no text": 1, "duplicate id": 1,
                               "empty caption": 3, "box outside image": 1, "degenerate box": 1,
                               "region without text": 1}
    malformed = summary.skipped_examples["malformed line"]
    assert [m.split(" ")[0] for m in malformed] == ["corpus.jsonl:2", "corpus.jsonl:3", "corpus.jsonl:4",
                                                     "corpus.jsonl:10", "corpus.jsonl:11"]
    assert "bad JSON" in malformed[0] and "missing 'image'" in malformed[1] and "colour" in malformed[2]
    assert "regions[0].box" in malformed[3] and "'captions' must be a list of strings" in malformed[4]
    assert summary.skipped_examples["duplicate id"] == ["corpus.jsonl:9"]
    assert summary.skipped_examples["missing image"] == ["corpus.jsonl:7 (imgs/missing.png)"]
    (scene,) = _records(out, "train")
    assert scene["id"] == "scene-1" and scene["captions"] == ["two planes", "an airport"]
    assert scene["long_caption"] == "A long view of an airport with two planes."
    assert scene["hard_negatives"] == ["three planes"]
    categories = sources.read_manifest(out)["category_names"]
    assert categories == ["car", "plane"]  # the malformed line 10 contributes nothing
    assert [(r["box"], r["category"], r["caption"]) for r in scene["regions"]] == [
        ([1.0, 2.0, 10.0, 12.0], "plane", "a white plane"), ([35.0, 0.0, 40.0, 10.0], "car", None)]
    assert [categories[r["category_id"]] for r in scene["regions"]] == ["plane", "car"]
    (pond,) = _records(out, "val")
    assert pond["id"] == "imgs/two.png" and pond["captions"] == ["a pond"]


def test_jsonl_bad_fraction_default_fails(tmp_path):
    path = _jsonl_fixture(tmp_path)
    with pytest.raises(ConversionError, match=r"inputs skipped.*annotations skipped"):
        prepare_formats.prepare_jsonl(path, tmp_path / "out", name="corpus", **QUIET)


def test_output_is_identical_for_any_worker_count_and_overwrite_rules(tmp_path):
    path = _jsonl_fixture(tmp_path)
    one, two = tmp_path / "w1", tmp_path / "w2"
    prepare_formats.prepare_jsonl(path, one, name="c", workers=1, records_per_shard=1, max_bad_fraction=1.0, **QUIET)
    prepare_formats.prepare_jsonl(path, two, name="c", workers=2, records_per_shard=1, max_bad_fraction=1.0, **QUIET)
    shards = sorted(p.name for p in one.glob("*.array_record"))
    assert shards == ["c-train-00000-of-00001.array_record", "c-val-00000-of-00001.array_record"]
    assert shards == sorted(p.name for p in two.glob("*.array_record"))
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    for name in ["manifest.json"] + [n.replace(".array_record", ".hashes.npy") for n in shards]:  # fingerprints,
        assert (one / name).read_bytes() == (two / name).read_bytes()  # token histograms: same for any worker count
    with pytest.raises(ConversionError, match="overwrite"):
        prepare_formats.prepare_jsonl(path, one, name="c", max_bad_fraction=1.0, **QUIET)
    prepare_formats.prepare_jsonl(path, one, name="d", overwrite=True, max_bad_fraction=1.0, **QUIET)
    assert sorted(p.name for p in one.glob("*.array_record")) == [
        "d-train-00000-of-00001.array_record", "d-val-00000-of-00001.array_record"]  # old shards removed
    with pytest.raises(ConversionError, match="not both"):
        prepare_formats.prepare_jsonl(path, tmp_path / "w3", name="c", num_shards=2, records_per_shard=1, **QUIET)


# ---------------------------------------------------------------------------------------------------------
# COCO


def test_coco_fixture(tmp_path):
    images = tmp_path / "JPEGImages"
    _save_image(images / "00001.jpg", size=(60, 40), fmt="JPEG")
    _save_image(images / "00002.jpg", size=(30, 30), fmt="JPEG")
    _save_image(images / "00003.jpg", size=(30, 30), fmt="JPEG")
    train = {
        "images": [{"id": 1, "file_name": "00001.jpg", "width": 60, "height": 40},
                   {"id": 2, "file_name": "00002.jpg", "width": 30, "height": 30},
                   {"id": 3, "file_name": "00003.jpg", "width": 31, "height": 30}],
        "categories": [{"id": 7, "name": "vehicle"}, {"id": 2, "name": "airplane"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [5, 5, 10, 8]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [55, 0, 10, 10]},  # half inside: clipped
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [58, 30, 10, 10]},  # 20% inside: dropped
            {"id": 4, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},    # unknown category
            {"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 1, 0, 5]},     # degenerate
            {"id": 6, "image_id": 42, "category_id": 2, "bbox": [1, 1, 5, 5]},    # unknown image id
            {"id": 7, "image_id": 1, "caption": "an airport apron"},
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(train))
    out = tmp_path / "out"
    summary = prepare_detection.prepare_coco({"train": tmp_path / "train.json"}, images, out, name="dior",
                                      max_bad_fraction=1.0, **QUIET)
    assert summary.written == {"train": 2}
    assert summary.skipped == {"box outside image": 1, "unknown category": 1, "degenerate box": 1,
                               "unknown image id": 1, "image size differs from annotation": 1}
    assert summary.skipped_examples["unknown image id"] == ["train.json:annotations[5]"]
    assert summary.skipped_examples["image size differs from annotation"] == ["00003.jpg"]
    got = {r["id"]: r for r in _records(out, "train")}
    manifest = sources.read_manifest(out)
    assert manifest["category_names"] == ["airplane", "vehicle"] and manifest["coco_category_ids"] == [2, 7]
    assert [(r["box"], r["category"], r["category_id"]) for r in got["00001.jpg"]["regions"]] == [
        ([5.0, 5.0, 15.0, 13.0], "airplane", 0), ([55.0, 0.0, 60.0, 10.0], "vehicle", 1)]
    assert got["00001.jpg"]["captions"] == ["an airport apron"]
    assert got["00002.jpg"]["regions"] == []  # images without annotations are kept


# ---------------------------------------------------------------------------------------------------------
# CLIs


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    json_path, images = _karpathy_fixture(tmp_path)
    cli = _load_tool("convert_karpathy")
    argv = ["--json", str(json_path), "--images", str(images), "--out", str(tmp_path / "o"), "--workers", "1",
            "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "missing image: 1 (e.g. missing.jpg)" in err and "NOTHING written" in err
    assert cli.main(argv + ["--max-bad-fraction", "0.9", "--split-map", "restval=train"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 records in 1 shards" in out and "broken image: 1 (e.g. broken.jpg)" in out
    assert cli.main(argv + ["--split-map", "restval"]) == 1
    assert "--split-map expects KEY=VALUE" in capsys.readouterr().err


# Each tool's input options as the README's command lines use them; every tool also takes the shared options.
TOOL_OPTIONS = {
    "convert_karpathy": ("--json", "--images", "--split-map"),
    "convert_coco": ("--ann", "--images", "--name"),
    "convert_dota": ("--images", "--labels", "--split", "--skip-difficult"),
    "convert_jsonl": ("--jsonl", "--name"),
    "convert_folders": ("--root", "--name"),
    "convert_tfds": ("--dataset", "--splits", "--data-dir"),
}
SHARED_TOOL_OPTIONS = ("--out", "--max-bad-fraction", "--min-box-visible", "--workers", "--num-shards",
                       "--records-per-shard", "--overwrite", "--no-progress")


@pytest.mark.parametrize("name", sorted(TOOL_OPTIONS))
def test_every_tool_documents_its_inputs_and_the_shared_options(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_tool(name).main(["--help"])
    assert exit_info.value.code == 0
    options = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    assert set(TOOL_OPTIONS[name] + SHARED_TOOL_OPTIONS) <= options


# ---------------------------------------------------------------------------------------------------------
# TFDS


def test_map_tfds_example_on_plain_dicts():
    from geoalign_jax.data.sources import map_tfds_example

    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    example = {"image": pixels, "meta": {"captions": np.array([b"a farm", b"a road"], dtype=object)},
               "label": np.int64(1), "file": b"x/1.jpg"}
    mapping = {"image": "image", "captions": "meta.captions", "label": "label", "id": "file"}
    mapped = map_tfds_example(example, mapping, class_names=["Forest", "SeaLake"])
    assert mapped["captions"] == ["a farm", "a road"] and mapped["id"] == "x/1.jpg"
    assert (mapped["label"], mapped["class_name"]) == (1, "SeaLake")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mapped["image"]))), pixels)
    encoded = map_tfds_example({"image": b"\x89PNG\r\n\x1a\nrest"}, {"image": "image"})
    assert encoded["image"] == b"\x89PNG\r\n\x1a\nrest" and encoded["label"] == -1
    with pytest.raises(KeyError, match="meta.text"):
        map_tfds_example(example, {"image": "image", "captions": "meta.text"})
    with pytest.raises(ValueError, match="neither encoded bytes"):
        map_tfds_example({"image": np.zeros((2, 2), np.float32)}, {"image": "image"})


def test_tfds_array_record_dataset_converts(tmp_path):
    import tensorflow_datasets as tfds  # here, not at the top: importing it costs seconds

    def png(seed: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((6, 8, 3), seed * 40, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    class GeoalignTinyRs(tfds.core.GeneratorBasedBuilder):
        """Image bytes as a plain Tensor feature: building tfds.features.Image would need TensorFlow."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["DenseResidential", "forest"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "test": self._generate_examples(1)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image_bytes": png(i), "caption": f"caption {i}" if i != 2 else "", "label": i % 2}

    data_dir = tmp_path / "tfds"
    GeoalignTinyRs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    out = tmp_path / "out"
    summary = prepare_formats.prepare_tfds("geoalign_tiny_rs", ["train", "test"], out, data_dir=data_dir,
                                      mapping={"image": "image_bytes", "captions": "caption"},
                                      max_bad_fraction=0.5, **QUIET)
    assert summary.written == {"train": 3, "test": 1} and summary.skipped == {"empty caption": 1}
    got = _records(out, "train")
    assert [r["id"] for r in got] == ["train/00000000", "train/00000001", "train/00000002"]
    assert [r["captions"] for r in got] == [["caption 0"], ["caption 1"], []]
    assert [(r["label"], r["class_name"]) for r in got] == [(0, "dense residential"), (1, "forest"),
                                                             (0, "dense residential")]
    assert got[1]["image"] == png(1)
    assert sources.read_manifest(out)["raw_class_names"] == ["DenseResidential", "forest"]
    with pytest.raises(sources.SourceError, match="not found"):
        sources.tfds_source("geoalign_no_such_set", "train", data_dir=data_dir)
    with pytest.raises(ConversionError, match=r"no feature for the mapping \['captions=text'\]"):
        prepare_formats.prepare_tfds("geoalign_tiny_rs", ["train"], tmp_path / "o2", data_dir=data_dir,
                                mapping={"image": "image_bytes", "captions": "text"}, **QUIET)


# ---------------------------------------------------------------------------------------------------------
# Split names, category names, safe overwrite, the shared writer call


def _small_jsonl(tmp_path: pathlib.Path, lines: list[dict], name: str = "small.jsonl") -> pathlib.Path:
    _save_image(tmp_path / "imgs" / "a.png", size=(20, 20), fmt="PNG")
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_split_names_with_dashes_are_refused_and_dashed_dataset_names_read_back(tmp_path):
    dashed_split = _small_jsonl(tmp_path, [{"image": "imgs/a.png", "split": "val-hard", "caption": "a field"}])
    with pytest.raises(ConversionError, match=r"split name 'val-hard' cannot be used.*no '-'"):
        prepare_formats.prepare_jsonl(dashed_split, tmp_path / "refused", name="d", **QUIET)
    assert not list((tmp_path / "refused").glob("*.array_record"))
    plain = _small_jsonl(tmp_path, [{"image": "imgs/a.png", "split": "val_hard", "caption": "a field"},
                                    {"image": "imgs/a.png", "id": "b", "caption": "a road"}], name="plain.jsonl")
    prepare_formats.prepare_jsonl(plain, tmp_path / "out", name="my-data", num_shards=1, **QUIET)
    pattern = str(tmp_path / "out" / "*.array_record")
    assert sources.RecordSource(sources.shard_paths(pattern, "val_hard"))[0]["captions"] == ["a field"]
    assert len(sources.RecordSource(sources.shard_paths(pattern, "train"))) == 1


def test_jsonl_category_names_are_stripped_like_the_records(tmp_path):
    path = _small_jsonl(tmp_path, [{"image": "imgs/a.png", "caption": "boats", "regions": [
        {"box": [1, 1, 8, 8], "category": " ship"}, {"box": [2, 2, 9, 9], "category": "ship "},
        {"box": [3, 3, 9, 9], "category": "harbor"}, {"box": [4, 4, 9, 9], "category": "  ", "caption": "water"}]}])
    prepare_formats.prepare_jsonl(path, tmp_path / "out", name="d", **QUIET)
    manifest = sources.read_manifest(tmp_path / "out")
    assert manifest["category_names"] == ["harbor", "ship"]
    (record,) = _records(tmp_path / "out", "train")
    assert [(r["category"], r["category_id"]) for r in record["regions"]] == [
        ("ship", 1), ("ship", 1), ("harbor", 0), (None, -1)]


def test_failed_overwrite_keeps_the_old_dataset_and_success_removes_unlisted_shards(tmp_path):
    good = _small_jsonl(tmp_path, [{"image": "imgs/a.png", "id": f"a{i}", "caption": f"field {i}"} for i in range(3)])
    out = tmp_path / "out"
    prepare_formats.prepare_jsonl(good, out, name="d", records_per_shard=1, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([n for n in before if n.endswith(".array_record")]) == 3
    bad = _small_jsonl(tmp_path, [{"image": "imgs/missing.png", "caption": "a ghost"}], name="bad.jsonl")
    with pytest.raises(ConversionError, match="nothing written"):
        prepare_formats.prepare_jsonl(bad, out, name="d", overwrite=True, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset intact, no leftovers
    assert [r["id"] for r in _records(out, "train")] == ["a0", "a1", "a2"]
    # a successful overwrite with fewer shards: the same-named shard is replaced, the others are removed
    prepare_formats.prepare_jsonl(good, out, name="d", num_shards=1, overwrite=True, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["d-train-00000-of-00001.array_record",
                                                     "d-train-00000-of-00001.hashes.npy", "manifest.json"]
    assert [r["id"] for r in _records(out, "train")] == ["a0", "a1", "a2"]
    # a shard glob is held to the folder's manifest: an old shard left there (a failed overwrite) is named
    assert sources.shard_paths(str(out / "d-*.array_record"), "train") == [
        str(out / "d-train-00000-of-00001.array_record")]
    # killed after the new manifest was in place but before the marker went: a good folder, its glob is read
    (out / ".prepare-unfinished").write_bytes(b"")
    assert sources.shard_paths(str(out / "d-*.array_record"), "train") == [
        str(out / "d-train-00000-of-00001.array_record")]
    (out / "d-train-00002-of-00003.array_record").write_bytes(before["d-train-00002-of-00003.array_record"])
    with pytest.raises(sources.SourceError, match=r"manifest.json does not list .*d-train-00002-of-00003"):
        sources.shard_paths(str(out / "d-*.array_record"), "train")
    bare = tmp_path / "bare"  # shards copied without a manifest are read as they are
    bare.mkdir()
    (bare / "d-train-00002-of-00003.array_record").write_bytes(before["d-train-00002-of-00003.array_record"])
    assert len(sources.RecordSource.from_dir(str(bare / "*.array_record"), "train")) == 1


def test_write_takes_a_lazy_task_stream_with_expected_counts(tmp_path):
    image = _save_image(tmp_path / "imgs" / "a.png", size=(20, 20), fmt="PNG")
    consumed = []

    def tasks():
        for index in range(3):
            consumed.append(index)
            yield record_builder.ImageTask(split="train", id=f"t{index}", source="lazy", name=f"t{index}",
                                    image_path=str(image), captions=(f"caption {index}",))

    stream = tasks()
    summary = prepare_formats._write(stream, tmp_path / "out", name="lazy", created_by="test", log=skip_accounting.SkipLog(),
                                manifest_extra={}, expected_counts={"train": 3}, records_per_shard=2, **QUIET)
    assert consumed == [0, 1, 2] and summary.written == {"train": 3}
    assert summary.shards == {"train": ["lazy-train-00000-of-00002.array_record",
                                        "lazy-train-00001-of-00002.array_record"]}
    valid = _small_jsonl(tmp_path, [{"image": "imgs/a.png", "caption": "a field"}])
    with pytest.raises(TypeError, match="worker"):
        prepare_formats.prepare_jsonl(valid, tmp_path / "o", name="x", worker=2)  # a misspelt option is refused


def test_an_image_folder_that_does_not_exist_is_one_line_naming_it(tmp_path, capsys):
    """Not one "missing image" skip per record: the folder itself is named, before anything is read or made."""
    from geoalign_jax.prepare import main as prepare_main

    json_path, _ = _karpathy_fixture(tmp_path)
    out = tmp_path / "o"
    assert prepare_main(["karpathy", "--json", str(json_path), "--images", str(tmp_path / "nowhere"),
                         "--out", str(out), "--workers", "1", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --images {tmp_path / 'nowhere'}: no such folder"
    assert not out.exists()
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "caption": "a field"}\n')
    assert prepare_main(["jsonl", "--jsonl", str(tmp_path / "pairs.jsonl"), "--name", "p", "--image-root",
                         str(tmp_path / "gone"),
                         "--out", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --image-root {tmp_path / 'gone'}: no such folder"
    assert not out.exists()
