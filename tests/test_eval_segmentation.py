"""Open-vocabulary segmentation (SegEarth-OV's protocol): the JAX implementation against a straightforward
PyTorch one on the open_clip export of the same weights (tools/segearth_torch.py), the metrics against a
confusion matrix computed by hand, and the segmentation folder's reader and converter on bad input."""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from geoalign_jax.data import prepare_segmentation as prep
from geoalign_jax.data import segmentation_presets as presets
from geoalign_jax.eval import datasets, prompts, runner, seg_data, seg_metrics, segmentation
from geoalign_jax.models import clip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from segearth_torch import TorchSegEarth  # noqa: E402

CONFIG = clip.get_model_config("tiny")  # 32 px, patch 8
CLASSES = (("background",), ("road", "street", "parking lot"), ("tree", "forest"), ("water",), ("building", "roof"))
# Sizes chosen to reach every branch: windows of the model's size, a window narrower than the crop (position
# embedding interpolated), one whose side is not a multiple of the patch (padded and cut back), no resize.
SIZES = ((90, 70), (20, 50), (19, 45), (33, 41))
OPTIONS = dict(crop=32, stride=16, resize=(60, 60), threshold=0.25, background=0, window_batch=3)


def _images(seed: int = 0) -> list[np.ndarray]:
    """Smooth colour fields with edges (random noise would make every logit a near tie)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in SIZES:
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.uniform(0, 255, 3)
        field = np.stack([np.sin(yy / rng.uniform(3, 9) + c) * 90 + np.cos(xx / rng.uniform(3, 9)) * 60 + base[c]
                          for c in range(3)], axis=-1)
        field[: height // 2, : width // 3] = rng.uniform(0, 255, 3)
        images.append(np.clip(field, 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from geoalign_jax.convert.open_clip import export_open_clip

    params = clip.init_params(CONFIG, jax.random.key(3))
    folder = tmp_path_factory.mktemp("segearth_export")
    export_open_clip(CONFIG, params, folder)
    return params, folder


@pytest.fixture(scope="module")
def torch_predictions(model):
    _, folder = model
    reference = TorchSegEarth(str(folder), CLASSES, prompts.get_templates("openai_imagenet"),
                              **{k: v for k, v in OPTIONS.items() if k != "window_batch"})
    return [reference.predict(image) for image in _images()]


def _segment(model, monkeypatch, images):
    from geoalign_jax.eval import embed

    params, _ = model
    monkeypatch.setattr(segmentation, "_OUTPUT_ELEMENTS", 7 * 9 * 5)  # output resized in blocks of a few rows
    embedder = embed.JaxEmbedder(CONFIG, params, batch_size=8, matmul_precision="highest")
    queries, query_class = segmentation.class_queries(embedder.embed_texts, CLASSES,
                                                      prompts.get_templates("openai_imagenet"))
    segmenter = segmentation.SegEarthSegmenter(CONFIG, params, queries, query_class,
                                               segmentation.SegEarthOptions(**OPTIONS), matmul_precision="highest")
    return segmenter.predict(images), segmenter


def test_predictions_equal_the_pytorch_reference(model, torch_predictions, monkeypatch):
    ours, segmenter = _segment(model, monkeypatch, _images())
    windows = sum(segmentation.window_count(h, w, segmentation.SegEarthOptions(**OPTIONS)) for h, w in SIZES)
    assert segmenter.windows_run == windows == 18  # 6 batches of 3: windows of consecutive images share batches
    assert segmenter.compiled_shapes == {(32, 32), (24, 32), (25, 32)}  # one compiled function per window shape
    for expected, actual in zip(torch_predictions, ours):
        assert actual.shape == expected.shape
        assert np.mean(actual == expected) >= 0.999
    pixels = np.concatenate([p.ravel() for p in torch_predictions])
    assert len(np.unique(pixels)) >= 3  # the comparison means something: several classes are predicted


def _write_pairs(folder: pathlib.Path, images, masks, suffix=".png") -> None:
    (folder / "img").mkdir(parents=True)
    (folder / "ann").mkdir()
    for index, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(folder / "img" / f"tile_{index}{suffix}")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "ann" / f"tile_{index}.png")


def test_task_miou_equals_the_reference_miou(model, torch_predictions, tmp_path, monkeypatch):
    """The whole task (prepare, reader, label reduction, metrics over the split) on masks where the
    reference is right on some pixels; mIoU recomputed here from the reference's predictions."""
    params, _ = model
    rng = np.random.default_rng(1)
    masks = []
    for prediction in torch_predictions:
        labels = np.where(rng.random(prediction.shape) < 0.6, prediction, rng.integers(0, 5, prediction.shape))
        raw = labels + 1  # reduce_zero_label: raw 0 is ignored, 1..5 are the classes
        raw[rng.random(prediction.shape) < 0.1] = 0
        masks.append(raw)
    _write_pairs(tmp_path / "raw", _images(), masks)
    (tmp_path / "classes.txt").write_text("".join(",".join(names) + "\n" for names in CLASSES))
    from geoalign_jax.prepare import main as prepare_main

    assert prepare_main(["segmentation", "--images", str(tmp_path / "raw" / "img"), "--masks",
                         str(tmp_path / "raw" / "ann"), "--classes", str(tmp_path / "classes.txt"), "--out",
                         str(tmp_path / "seg"), "--split", "val", "--reduce-zero-label"]) == 0
    monkeypatch.setattr(segmentation, "_OUTPUT_ELEMENTS", 7 * 9 * 5)
    options = ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in OPTIONS.items())
    from geoalign_jax.eval import embed

    embedder = embed.JaxEmbedder(CONFIG, params, batch_size=8, matmul_precision="highest")
    results = runner.evaluate(CONFIG, params, [f"segmentation:toy={tmp_path / 'seg'},{options}"],
                               embedder=embedder, progress=False, results_path=tmp_path / "out" / "results.json")
    intersections, unions = np.zeros(5), np.zeros(5)
    for prediction, raw in zip(torch_predictions, masks):
        valid = raw > 0
        truth = raw - 1
        for c in range(5):
            p, t = (prediction == c) & valid, (truth == c) & valid
            intersections[c] += np.sum(p & t)
            unions[c] += np.sum(p | t)
    reference_miou = np.mean(intersections[unions > 0] / unions[unions > 0]) * 100
    assert abs(results["segmentation/toy/mIoU"] - reference_miou) <= 0.05
    assert results["segmentation/toy/num_pixels"] == sum(np.sum(m > 0) for m in masks)
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())
    protocol = recorded["provenance"]["tasks"]["segmentation/toy"]["protocol"]
    assert protocol["options"]["threshold"] == 0.25 and protocol["options"]["cls_token_lambda"] == -0.3
    assert protocol["reduce_zero_label"] is True and len(protocol["templates"]) == 80


def test_metrics_against_a_hand_computed_confusion_matrix():
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    predictions = np.array([[0, 1, 1, 1], [2, 0, 3, 0]])
    # rows true, columns predicted (class 3 only ever predicted on an ignored pixel)
    expected = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    confusion = seg_metrics.confusion_matrix(predictions, labels, 4, 255)
    np.testing.assert_array_equal(confusion, expected)
    scores = seg_metrics.segmentation_metrics(confusion, ["a", "b", "c", "d"])
    iou = [1 / 4, 2 / 4, 1 / 2]  # class 3: no label, no prediction -> undefined, left out of the mean
    assert scores["mIoU"] == pytest.approx(np.mean(iou) * 100)
    assert scores["mAcc"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1 / 2]) * 100)
    assert scores["aAcc"] == pytest.approx(4 / 7 * 100)
    assert np.isnan(scores["IoU/d"]) and scores["IoU/b"] == pytest.approx(50.0)
    assert scores["num_pixels"] == 7
    with pytest.raises(ValueError, match="label values must be in 0..3"):
        seg_metrics.confusion_matrix(np.zeros(2), np.array([0, 7]), 4, 255)


def test_templates_are_open_clips_openai_imagenet_set():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert prompts.get_templates("openai_imagenet") == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


@pytest.mark.parametrize("old, grid", [(14, (13, 13)), (14, (13, 14)), (14, (7, 12)), (4, (3, 4))])
def test_window_position_embedding_is_segearths_interpolation(old, grid):
    """Windows of another size take SegEarth-OV's interpolate_pos_encoding (torch bicubic, no antialiasing,
    scale (g + 0.1) / old), which differs from open_clip's resize that the tower uses otherwise."""
    import torch
    import torch.nn.functional as F

    from geoalign_jax.models import posemb

    table = np.random.default_rng(0).normal(size=(1 + old * old, 5)).astype(np.float32)
    source = torch.from_numpy(table[1:]).reshape(1, old, old, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(source, scale_factor=((grid[0] + 0.1) / old, (grid[1] + 0.1) / old), mode="bicubic")
    ours = np.asarray(posemb.resize_image_posemb_segearth(table, grid))
    np.testing.assert_allclose(ours[1:], expected.permute(0, 2, 3, 1).reshape(-1, 5).numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours[0], table[0])
    assert np.abs(ours - np.asarray(posemb.resize_image_posemb(table, grid))).max() > 1e-2


def test_geometry_follows_mmcv_and_segearth():
    assert segmentation.rescaled_size(1024, 1024, (448, 448)) == (448, 448)
    assert segmentation.rescaled_size(512, 1024, (448, 448)) == (224, 448)  # long side to 448, aspect kept
    assert segmentation.rescaled_size(100, 150, (448, 448)) == (299, 448)  # upscaled too, sides rounded half up
    assert segmentation.window_starts(448, 224, 112) == [0, 112, 224]
    assert segmentation.window_starts(300, 224, 112) == [0, 76]  # last window moved back inside
    assert segmentation.window_starts(100, 224, 112) == [0]


def test_presets_cite_segearth_configs_and_are_consistent():
    assert set(presets.PRESETS) == {"openearthmap", "loveda", "isaid", "potsdam", "vaihingen", "uavid", "udd5", "vdd"}
    for preset in presets.PRESETS.values():
        assert 0 <= preset.background_index < len(preset.classes)
        assert preset.config_file.startswith("configs/cfg_") and preset.class_file.startswith("configs/cls_")
    assert presets.get_preset("potsdam").background_index == 5 and presets.get_preset("potsdam").reduce_zero_label
    assert presets.get_preset("loveda").threshold == 0.3 and presets.get_preset("loveda").classes[1] == (
        "building", "roof", "house")


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def test_prepare_skips_and_names_bad_pairs(tmp_path):
    images = [np.full((12, 16, 3), 100, np.uint8) for _ in range(5)]
    masks = [np.zeros((12, 16)), np.zeros((12, 16)), np.zeros((10, 16)), np.full((12, 16), 7), np.zeros((12, 16))]
    _write_pairs(tmp_path, images, masks)
    (tmp_path / "ann" / "tile_1.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "ann" / "tile_4.png")  # RGB mask
    (tmp_path / "ann" / "orphan.png").write_bytes((tmp_path / "ann" / "tile_0.png").read_bytes())
    summary = prep.prepare_segmentation(tmp_path / "img", tmp_path / "ann", tmp_path / "out",
                                        classes=[["a"], ["b"]], split="val")
    assert summary.written == 1
    assert dict(summary.skipped) == {"unreadable or multi-channel mask": 2, "mask size differs from image": 1,
                                     "unknown label values": 1, "mask without image": 1}
    assert any("tile_3.png (7)" in name for name in summary.examples["unknown label values"])
    text = summary.format()
    assert "tile_2.png" in text and "orphan.png" in text
    with pytest.raises(prep.SegmentationPrepareError, match="split 'val' exists"):
        prep.prepare_segmentation(tmp_path / "img", tmp_path / "ann", tmp_path / "out", classes=[["a"], ["b"]],
                                  split="val")
    with pytest.raises(prep.SegmentationPrepareError, match="ignore-index 1 is also a class"):
        prep.prepare_segmentation(tmp_path / "img", tmp_path / "ann", tmp_path / "o2", classes=[["a"], ["b"]],
                                  ignore_index=1)


def test_class_file_errors_name_the_line(tmp_path):
    (tmp_path / "c.txt").write_text("road\n\ntree\n")
    with pytest.raises(presets.ClassFileError, match="line 2"):
        presets.read_class_file(tmp_path / "c.txt")
    (tmp_path / "c.txt").write_text("road,,lane\n")
    with pytest.raises(presets.ClassFileError, match="line 1 'road,,lane' has an empty class name"):
        presets.read_class_file(tmp_path / "c.txt")


def test_reader_rejects_bad_folders_with_one_clear_line(tmp_path):
    _write_pairs(tmp_path / "raw", [np.full((12, 16, 3), 9, np.uint8)], [np.ones((12, 16))])
    prep.prepare_segmentation(tmp_path / "raw" / "img", tmp_path / "raw" / "ann", tmp_path / "seg",
                              classes=[["a"], ["b"]], split="val")
    with pytest.raises(datasets.EvalDataError, match="not a segmentation folder"):
        seg_data.load_segmentation(tmp_path / "raw")
    with pytest.raises(datasets.EvalDataError, match="no split 'test'"):
        seg_data.load_segmentation(tmp_path / "seg", split="test")
    data = seg_data.load_segmentation(tmp_path / "seg")
    assert data.split == "val" and data.pair(0)[1].max() == 1
    Image.fromarray(np.full((12, 16), 5, np.uint8)).save(tmp_path / "seg" / "val" / "masks" / "tile_0.png")
    with pytest.raises(datasets.EvalDataError, match=r"tile_0.png: label values \[5\]"):
        data.pair(0)
    Image.fromarray(np.ones((11, 16), np.uint8)).save(tmp_path / "seg" / "val" / "masks" / "tile_0.png")
    with pytest.raises(datasets.EvalDataError, match="mask is 16x11, its image 16x12"):
        data.pair(0)
    manifest = json.loads((tmp_path / "seg" / prep.MANIFEST).read_text())
    for field, value, message in (("version", 9, "version 9"), ("ignore_index", 1, "ignore_index"),
                                  ("classes", [["a"], []], "classes")):
        (tmp_path / "seg" / prep.MANIFEST).write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(datasets.EvalDataError, match=message):
            seg_data.load_segmentation(tmp_path / "seg")
    bad_entry = {**manifest, "splits": {"val": {"images": [{"image": "../x.png", "mask": "m.png", "width": 1,
                                                            "height": 1}]}}}
    (tmp_path / "seg" / prep.MANIFEST).write_text(json.dumps(bad_entry))
    with pytest.raises(datasets.EvalDataError, match="leaves the folder"):
        seg_data.load_segmentation(tmp_path / "seg")


def test_task_options_are_checked_when_parsed(tmp_path):
    spec = runner.parse_task(f"segmentation:loveda={tmp_path},split=val,threshold=0.3,resize=none")
    assert dict(spec.options) == {"threshold": "0.3", "resize": "none"} and spec.split == "val"
    for bad, message in (("crop=abc", "option crop: expected int"), ("stride=300", "need 1 <= stride <= crop"),
                         ("colour=red", "unknown option 'colour'"), ("dense=first", "dense must be"),
                         ("templates=none", "unknown templates"), ("resize=1x2x3", "resize must be")):
        with pytest.raises(runner.TaskError, match=message):
            runner.parse_task(f"segmentation:x={tmp_path},{bad}")


def test_cli_refuses_segmentation_on_the_open_clip_backend(model, tmp_path, capsys):
    from geoalign_jax.evaluate import main

    _, folder = model
    with pytest.raises(SystemExit):
        main(["--open-clip", str(folder), "--backend", "open_clip", "--tasks", f"segmentation:x={tmp_path}",
              "--out", str(tmp_path / "o")])
    assert "segmentation tasks need the JAX backend" in capsys.readouterr().err


def test_trainer_config_accepts_segmentation_tasks_and_guards_their_split(tmp_path):
    from geoalign_jax.train import config as train_config

    _write_pairs(tmp_path / "raw", [np.full((12, 16, 3), 9, np.uint8)], [np.ones((12, 16))])
    for split in ("val", "train"):
        prep.prepare_segmentation(tmp_path / "raw" / "img", tmp_path / "raw" / "ann", tmp_path / "seg",
                                  classes=[["a"], ["b"]], split=split)
    task = f"segmentation:toy={tmp_path / 'seg'},threshold=0.2"
    assert train_config._check_eval_tasks((task,), allow_train_split=False) == ["segmentation/toy"]
    with pytest.raises(ValueError, match="split 'train' is a training split"):
        train_config._check_eval_tasks((task + ",split=train",), allow_train_split=False)


def test_reduce_zero_label_flag_overrides_a_preset_either_way():
    """`--no-reduce-zero-label` switches LoveDA's preset value off; no flag keeps the preset's value."""
    import argparse

    from geoalign_jax.data import prepare_segmentation

    parser = argparse.ArgumentParser()
    prepare_segmentation.add_arguments(parser)
    required = ["--images", "i", "--masks", "m", "--out", "o", "--preset", "loveda"]
    assert parser.parse_args(required).reduce_zero_label is None
    assert parser.parse_args(required + ["--reduce-zero-label"]).reduce_zero_label is True
    assert parser.parse_args(required + ["--no-reduce-zero-label"]).reduce_zero_label is False
