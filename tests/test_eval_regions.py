"""Region classification: box geometry checked with a transparent fake backend, then the real DOTA sample."""
from __future__ import annotations

import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from geoalign_jax.data import prepare_detection, prepare_formats
from geoalign_jax.data.image_ops import normalise
from geoalign_jax.eval import datasets, runner, regions
from geoalign_jax.models import clip

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class ColourEmbedder:
    """Image embedding = mean normalised colour; patch tokens = mean colour of each 4x4 pixel patch;
    a prompt embeds as the normalised colour it names. Region classification with this backend is
    exact iff crops and RoI boxes land on the right pixels of the right image."""

    image_size = 32

    def embed_images(self, images, *, pad_to=None):
        return images.mean(axis=(1, 2))

    def embed_images_with_patches(self, images, *, pad_to=None):
        n = images.shape[0]
        patches = images.reshape(n, 8, 4, 8, 4, 3).mean(axis=(2, 4))
        return self.embed_images(images), patches

    def embed_texts(self, texts):
        out = []
        for text in texts:
            (colour,) = [c for c in COLOURS if c in text]
            out.append(normalise(np.full((1, 1, 3), COLOURS[colour], np.uint8))[0, 0])
        return np.stack(out)


def _quadrant_image(layout: tuple[str, str, str, str], width: int = 120, height: int = 60) -> Image.Image:
    """Colours of the top-left, top-right, bottom-left, bottom-right quadrants of a wide image."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    for (x, y), colour in zip([(0, 0), (half_w, 0), (0, half_h), (half_w, half_h)], layout):
        image.paste(COLOURS[colour], (x, y, x + half_w, y + half_h))
    return image


@pytest.fixture(scope="module")
def quadrant_records(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("quadrants")
    boxes = [[5, 5, 50, 25], [70, 5, 115, 25], [5, 35, 50, 55], [70, 35, 115, 55]]
    layouts = [("red", "green", "blue", "yellow"), ("yellow", "blue", "green", "red"), ("red", "green", "blue", "yellow")]
    lines = []
    for index, layout in enumerate(layouts):
        _quadrant_image(layout).save(root / f"scene{index}.png")
        regions_ = [{"box": box, "category": colour} for box, colour in zip(boxes, layout)]
        regions_.append({"box": [0, 0, 120, 60], "caption": "the whole scene"})  # no category: skipped
        lines.append(json.dumps({"image": f"scene{index}.png", "split": "test", "regions": regions_}))
    (root / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    prepare_formats.prepare_jsonl(root / "scenes.jsonl", root / "records", name="scenes", progress=False)
    return root / "records"


def test_crop_and_roi_classify_every_box_of_every_image(quadrant_records):
    # batch_size 2 over 3 images: the RoI path crosses a batch boundary and pads the map batch.
    report = runner.run_tasks(None, None, [f"regions:scenes={quadrant_records},templates=single"],
                               embedder=ColourEmbedder(), batch_size=2, progress=False)
    metrics = report.metrics
    for method in ("crop", "roi"):
        assert metrics[f"regions/scenes/{method}/num_samples"] == 12
        assert metrics[f"regions/scenes/{method}/top1"] == 100.0, method
    assert metrics["regions/scenes/skipped/regions_without_category"] == 3
    assert report.details["regions/scenes"]["class_ids"] == ["blue", "green", "red", "yellow"]


def test_region_loaders_refuse_an_image_whose_size_differs_from_its_record(quadrant_records):
    """Boxes are normalised by the record's size, so an image of another size must fail, naming the record."""
    data = datasets.load_regions(quadrant_records)
    assert [data.images.expected_size(i) for i in range(len(data.regions))] == data.sizes == [(120, 60)] * 3
    buffer = io.BytesIO()
    _quadrant_image(("red", "green", "blue", "yellow")).save(buffer, format="PNG")
    wrong = datasets.RecordImages([{"image": buffer.getvalue()}], [0], ["scenes[test][0]"], [(60, 120)])
    message = r"scenes\[test\]\[0\]: image is 120x60 but the record says 60x120"
    with pytest.raises(ValueError, match=message):
        regions.crop_loader(wrong, [[((5.0, 5.0, 50.0, 25.0), 0)]], 32)(0)
    with pytest.raises(ValueError, match=message):
        regions.whole_image_loader(wrong, 32)(0)
    right = datasets.RecordImages(wrong.source, [0], ["scenes[test][0]"], [(120, 60)])
    assert regions.whole_image_loader(right, 32)(0).shape == (1, 32, 32, 3)


def test_a_box_normalised_by_the_wrong_side_would_be_caught():
    # The wide image makes (x / height) leave the image: the check above depends on the right axis.
    boxes = regions.normalised_boxes(np.array([[70.0, 5.0, 115.0, 25.0]]), (120, 60))
    np.testing.assert_allclose(boxes, [[70 / 120, 5 / 60, 115 / 120, 25 / 60]])


@pytest.fixture(scope="module")
def dota_records(shared_data, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("eval_dota") / "dota"
    prepare_detection.prepare_dota(shared_data / "dota_sample" / "images", shared_data / "dota_sample" / "labelTxt", out,
                            progress=False)
    return out


def _dota_objects(shared_data) -> list[tuple[str, str, list[float]]]:
    objects = []
    for label_file in sorted((shared_data / "dota_sample" / "labelTxt").glob("*.txt")):
        for line in label_file.read_text().splitlines():
            fields = line.split()
            if len(fields) in (9, 10):
                xs, ys = [float(v) for v in fields[0:8:2]], [float(v) for v in fields[1:8:2]]
                objects.append((label_file.stem, fields[8], [min(xs), min(ys), max(xs), max(ys)]))
    return objects


def test_dota_crops_are_the_boxes_of_the_original_image(shared_data, dota_records):
    from geoalign_jax.eval import datasets

    data = datasets.load_regions(dota_records)
    objects = _dota_objects(shared_data)
    assert data.num_regions == len(objects)
    first_stem = sorted({stem for stem, _, _ in objects})[0]
    first_objects = [o for o in objects if o[0] == first_stem]
    crops = regions.crop_loader(data.images, data.regions, 32)(0)
    assert crops.shape == (len(first_objects), 32, 32, 3)
    original = Image.open(shared_data / "dota_sample" / "images" / f"{first_stem}.png").convert("RGB")
    for crop, (_, category, (x1, y1, x2, y2)) in list(zip(crops, first_objects))[:3]:
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(original.width, int(np.ceil(x2))), min(original.height, int(np.ceil(y2)))
        expected = normalise(original.crop((x1, y1, x2, y2)).resize((32, 32), Image.BICUBIC))
        np.testing.assert_allclose(crop, expected, atol=1e-6)


def test_dota_region_classification_with_the_tiny_model(shared_data, dota_records):
    config = clip.get_model_config("tiny")
    params = clip.init_params(config, jax.random.key(0))
    report = runner.run_tasks(config, params, [f"regions:dota={dota_records}"], batch_size=8, progress=False,
                               allow_train_split=True)  # the DOTA sample is converted as its only split, train
    objects = _dota_objects(shared_data)
    counts = {c: sum(1 for _, cat, _ in objects if cat == c) for c in {cat for _, cat, _ in objects}}
    for method in ("crop", "roi"):
        metrics = {k.split(f"regions/dota/{method}/")[1]: v for k, v in report.metrics.items()
                   if k.startswith(f"regions/dota/{method}/")}
        assert metrics["num_samples"] == len(objects)
        assert {k[len("class/"):] for k in metrics if k.startswith("class/")} == set(counts)
        # top-1 is the sample-weighted mean of the per-class accuracies.
        weighted = sum(metrics[f"class/{c}"] * n for c, n in counts.items()) / len(objects)
        assert metrics["top1"] == pytest.approx(weighted)
