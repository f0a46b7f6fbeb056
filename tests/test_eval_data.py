"""Evaluation inputs: preprocessing equal to open_clip's eval transform, loaders over the converters'
records of the real samples, class-name tables, and task parsing errors."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
from PIL import Image

import data_fixtures
from geoalign_jax.data import prepare_formats
from geoalign_jax.eval import classnames, datasets, runner, preprocess, prompts

records = data_fixtures.records  # the module-scoped fixture (real AID + RSICD samples as records)


@pytest.mark.parametrize("size", [(150, 150), (224, 160), (97, 301)])
def test_preprocessing_equals_open_clip_eval_transform(shared_data, size):
    transform = open_clip.image_transform(64, is_train=False)
    source = Image.open(next((shared_data / "aid_sample" / "Airport").iterdir())).convert("RGB").resize(size)
    ours = preprocess.preprocess_pil(source, 64)
    theirs = transform(source).numpy().transpose(1, 2, 0)
    assert ours.shape == theirs.shape == (64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_crop_box_widens_to_pixels_and_rejects_outside_boxes():
    image = Image.new("RGB", (40, 30))
    assert preprocess.crop_box(image, (2.5, 3.2, 10.1, 12.0)).size == (9, 9)   # x 2..11, y 3..12
    assert preprocess.crop_box(image, (-5, -5, 100, 100)).size == (40, 30)
    with pytest.raises(ValueError, match="no pixels inside the 40x30 image"):
        preprocess.crop_box(image, (50, 5, 60, 10))
    with pytest.raises(ValueError, match="cannot decode image broken.jpg"):
        preprocess.decode_image(b"\xff\xd8\xff not a jpeg", where="broken.jpg")


def test_eval_names_classes_with_the_converters_rule():
    """One naming rule for manifests (converters) and prompts (eval tables), not two copies that can drift."""
    assert classnames.readable_class_name is prepare_formats.readable_class_name
    assert classnames.prompt_names_for(["storage-tanks", "BareLand"]) == ["storage tanks", "bare land"]


def test_aid_class_table_matches_the_sample_folders(shared_data):
    folders = sorted(p.name for p in (shared_data / "aid_sample").iterdir() if p.is_dir())
    assert classnames.dataset_class_identifiers("AID") == folders
    sizes = {name: len(classnames.dataset_class_names(name)) for name in classnames.DATASET_CLASSES}
    assert sizes == {"ucm": 21, "aid": 30, "resisc45": 45, "eurosat": 10, "whu_rs19": 19, "rsscn7": 7,
                     "patternnet": 38, "fmow": 62, "millionaid": 51, "rsicb256": 35}
    assert classnames.prompt_names_for(["DenseResidential", "sea_lake", "SeaLake"], "eurosat")[1:] == \
        ["lake or sea", "lake or sea"]
    assert classnames.readable_class_name("footballField") == "football field"
    assert prompts.get_templates("farslip") == ("a satellite photo of {}.", "a satellite image of {}")
    with pytest.raises(ValueError, match="'imagenet'"):
        prompts.get_templates("imagenet")


def test_zero_shot_sets_from_records_and_from_folders_agree(shared_data, records):
    from_records = datasets.load_classification(records["aid"], dataset="aid")
    from_folders = datasets.load_classification(shared_data / "aid_sample", dataset="aid")
    assert from_records.class_ids == from_folders.class_ids == classnames.dataset_class_identifiers("aid")
    assert from_records.class_names[:3] == ["airport", "bare land", "baseball field"]
    np.testing.assert_array_equal(from_records.labels, from_folders.labels)
    assert np.bincount(from_records.labels).tolist() == [4] * 30
    # The same image behind index 5 in both.
    assert from_records.images.image_bytes(5) == from_folders.images.image_bytes(5)
    limited = datasets.load_classification(records["aid"], limit=31)
    assert sorted(set(limited.labels.tolist())) == list(range(30))  # round-robin covers every class


def test_retrieval_set_keeps_every_caption(shared_data, records):
    raw = json.loads((shared_data / "rsicd_sample" / "dataset_rsicd.json").read_text())
    val = [entry for entry in raw["images"] if entry["split"] == "val"]
    data = datasets.load_retrieval(records["rsicd"], split="val")
    assert data.captions == [[s["raw"] for s in entry["sentences"]] for entry in val]
    assert len(set(data.image_keys)) == len(val)
    with pytest.raises(datasets.EvalDataError, match=r"split 'test' not in the manifest \(splits: \['train', 'val'\]\)"):
        datasets.load_retrieval(records["rsicd"], split="test")


@pytest.mark.parametrize("text, message", [
    ("zeroshot/aid=/x", "expected KIND:NAME=PATH"),
    ("ranking:aid=/x", "unknown kind 'ranking'"),
    ("zeroshot:aid", "missing '=PATH'"),
    ("zeroshot:aid=/x,protocol=standard", "unknown option 'protocol' for zeroshot"),
    ("retrieval:rsicd=/x,protocol=coco", "unknown retrieval protocol 'coco'"),
    ("zeroshot:aid=/x,limit=many", "limit must be an integer"),
    ("regions:dota=/x,methods=crop+mask", "methods must be among"),
    ("zeroshot:aid=/x,templates=imagenet", "unknown templates 'imagenet'"),
])
def test_bad_task_strings_are_rejected_naming_the_task(text, message):
    with pytest.raises(runner.TaskError, match=message) as error:
        runner.parse_task(text)
    assert text.split(",")[0].split("=")[0] in str(error.value) or "task name" in str(error.value)


def test_task_string_options_are_parsed():
    spec = runner.parse_task("retrieval:rsicd=/data/rsicd,split=test,limit=50,protocol=both")
    assert (spec.kind, spec.name, spec.path, spec.split, spec.limit) == ("retrieval", "rsicd", "/data/rsicd", "test", 50)
    assert spec.protocols == ("standard", "skyscript")
    assert runner.parse_task("regions:dota=/d,methods=roi").methods == ("roi",)


def test_missing_or_unusable_data_paths_are_named(tmp_path):
    with pytest.raises(datasets.EvalDataError, match="zero-shot data not found: .*nowhere"):
        datasets.load_classification(tmp_path / "nowhere")
    (tmp_path / "flat.jpg").write_bytes(b"")
    with pytest.raises(datasets.EvalDataError, match="neither a record folder"):
        datasets.load_classification(tmp_path)
    with pytest.raises(datasets.EvalDataError, match="retrieval data must be a record folder"):
        datasets.load_retrieval(tmp_path)


def test_a_broken_image_stops_the_evaluation_naming_the_file(tmp_path):
    for name in ("Beach", "Forest"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (20, 20), (200, 180, 120)).save(tmp_path / name / "ok.png")
    (tmp_path / "Forest" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "Forest" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode image .*Forest/broken\.jpg"):
        runner.run_tasks(None, None, [f"zeroshot:scenes={tmp_path}"], embedder=data_fixtures.MeanEmbedder(), batch_size=2,
                          progress=False)
    (tmp_path / "Forest" / "broken.jpg").unlink()
    metrics = runner.evaluate(None, None, [f"zeroshot:scenes={tmp_path}"], embedder=data_fixtures.MeanEmbedder(), batch_size=2,
                               progress=False)
    assert metrics["zeroshot/scenes/num_samples"] == 2
    assert metrics["zeroshot/scenes/skipped/not_an_image_file"] == 1
