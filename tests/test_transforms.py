"""Box-aware augmentation geometry and the per-example training transform (geoalign_jax.data.transforms)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from geoalign_jax import batch_contract, tokenizer
from geoalign_jax.data import image_ops, records, transforms
from geoalign_jax.data.image_ops import Crop


# ------------------------------------------------------------------------------------------------------------
# Geometry


@st.composite
def scenes(draw):
    """An image size, integer boxes, an integer crop, a flip and an output size."""
    width = draw(st.integers(6, 72))
    height = draw(st.integers(6, 72))
    boxes = []
    for _ in range(draw(st.integers(1, 6))):
        x1 = draw(st.integers(0, width - 1))
        y1 = draw(st.integers(0, height - 1))
        x2 = draw(st.integers(x1 + 1, width))
        y2 = draw(st.integers(y1 + 1, height))
        boxes.append((x1, y1, x2, y2))
    crop_w = draw(st.integers(1, width))
    crop_h = draw(st.integers(1, height))
    crop = Crop(draw(st.integers(0, width - crop_w)), draw(st.integers(0, height - crop_h)), crop_w, crop_h)
    out_size = (draw(st.integers(4, 64)), draw(st.integers(4, 64)))
    return width, height, np.asarray(boxes, np.float64), crop, draw(st.booleans()), out_size


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_augmented_boxes_cover_the_same_pixels(scene):
    """Paint box i with label i+1, crop/resize/flip the label image (nearest) and the boxes with the same
    parameters: a kept box covers every pixel of its label (1 px tolerance) and, when nothing is painted over it,
    is tight around them; a dropped box has really (mostly) left the crop."""
    width, height, boxes, crop, flip, out_size = scene
    labels = np.zeros((height, width), np.uint8)
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        labels[y1:y2, x1:x2] = index + 1
    out = np.asarray(image_ops.crop_resize(Image.fromarray(labels), crop, out_size, flip, resample=Image.NEAREST))
    assert out.shape == (out_size[1], out_size[0])
    fraction, min_px = 0.25, 2.0
    view_boxes, keep = image_ops.transform_boxes(
        boxes, crop, flip, out_size, min_visible_fraction=fraction, min_size_px=min_px
    )
    out_w, out_h = out_size
    tol_x, tol_y = 1.0 / out_w, 1.0 / out_h
    assert np.all((view_boxes >= 0) & (view_boxes <= 1))
    for index, box in enumerate(boxes):
        rows, cols = np.nonzero(out == index + 1)
        centres_x, centres_y = (cols + 0.5) / out_w, (rows + 0.5) / out_h
        occluded = any(
            _intersects(box, later) for later in boxes[index + 1 :]
        )
        if keep[index]:
            x1, y1, x2, y2 = view_boxes[index]
            assert x2 > x1 and y2 > y1
            inside = (centres_x >= x1 - tol_x) & (centres_x <= x2 + tol_x) & (centres_y >= y1 - tol_y) & (
                centres_y <= y2 + tol_y
            )
            assert inside.all(), f"box {index}: {np.count_nonzero(~inside)} of {inside.size} label pixels outside"
            if not occluded:
                assert len(cols) > 0, f"kept box {index} has no visible pixels"
                # tight: the label pixels reach the box edges (within one output pixel + half a source pixel)
                slack_x = tol_x + 0.5 / crop.width * 2
                slack_y = tol_y + 0.5 / crop.height * 2
                assert centres_x.min() <= x1 + slack_x + tol_x / 2 and centres_x.max() >= x2 - slack_x - tol_x / 2
                assert centres_y.min() <= y1 + slack_y + tol_y / 2 and centres_y.max() >= y2 - slack_y - tol_y / 2
        else:
            # Dropped: what is left of it in the view is a small part of the box, or a sliver under min_px.
            area_out = (box[2] - box[0]) * (box[3] - box[1]) * (out_w / crop.width) * (out_h / crop.height)
            if len(cols) == 0:
                continue
            extent_x, extent_y = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
            small_part = len(cols) <= fraction * area_out + 2 * (extent_x + extent_y) + 4
            sliver = min(extent_x, extent_y) <= min_px + 1
            assert small_part or sliver, (
                f"dropped box {index} still shows {len(cols)} px ({extent_x}x{extent_y}) of {area_out:.1f}"
            )


def _intersects(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_transform_boxes_moves_clips_flips_and_drops():
    crop = Crop(10, 20, 40, 20)  # x in [10, 50), y in [20, 40)
    boxes = np.array([
        [20, 25, 30, 35],  # inside
        [0, 0, 5, 5],  # outside the crop
        [45, 22, 65, 38],  # 5 of 20 px wide inside: 25% visible, kept at the threshold
        [48, 22, 70, 38],  # 2 of 22 px inside: dropped
    ], np.float64)
    view, keep = image_ops.transform_boxes(boxes, crop, False, (80, 40))
    np.testing.assert_array_equal(keep, [True, False, True, False])
    np.testing.assert_allclose(view[0], [0.25, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(view[2], [35 / 40, 0.1, 1.0, 0.9])
    flipped, keep_flipped = image_ops.transform_boxes(boxes, crop, True, (80, 40))
    np.testing.assert_array_equal(keep_flipped, keep)
    np.testing.assert_allclose(flipped[0], [0.5, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(flipped[2], [0.0, 0.1, 5 / 40, 0.9])
    # a box that stays whole but shrinks under 2 output pixels is dropped
    _, keep_tiny = image_ops.transform_boxes(np.array([[20, 25, 21, 35]]), crop, False, (40, 20))
    assert not keep_tiny[0]


def test_sample_resized_crop_stays_inside_with_the_asked_area():
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (640, 120), (33, 500)]:
        fractions = []
        for _ in range(200):
            crop = image_ops.sample_resized_crop(rng, width, height, (0.3, 0.7), (3 / 4, 4 / 3))
            assert 0 <= crop.x0 and crop.x0 + crop.width <= width
            assert 0 <= crop.y0 and crop.y0 + crop.height <= height
            assert crop.width >= 1 and crop.height >= 1
            fractions.append(crop.width * crop.height / (width * height))
        if width == height:  # no fallback needed for a square image
            assert 0.28 <= min(fractions) and max(fractions) <= 0.72
    with pytest.raises(ValueError, match="crop scale"):
        image_ops.sample_resized_crop(rng, 10, 10, (0.0, 1.0), (1.0, 1.0))


def test_local_crop_box_points_at_the_same_pixels_in_the_global_view():
    """A coordinate image (R = x, G = y): the centre pixel of a local crop equals the global view's pixel at the
    centre of the local crop's box, flipped or not."""
    width, height = 200, 150
    ys, xs = np.mgrid[0:height, 0:width]
    coords = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    image = Image.fromarray(coords)
    rng = np.random.default_rng(1)
    for flip in (False, True):
        view = image_ops.sample_resized_crop(rng, width, height, (0.5, 1.0), (3 / 4, 4 / 3))
        global_view = np.asarray(image_ops.crop_resize(image, view, (100, 100), flip, resample=Image.NEAREST))
        for _ in range(5):
            local = image_ops.sample_crop_within(rng, view, (0.3, 0.7), (3 / 4, 4 / 3))
            assert view.x0 <= local.x0 and local.x0 + local.width <= view.x0 + view.width + 1e-9
            box = image_ops.crop_box_in_view(local, view, flip)
            local_image = np.asarray(image_ops.crop_resize(image, local, (50, 50), flip, resample=Image.NEAREST))
            centre_in_global = global_view[int((box[1] + box[3]) / 2 * 100), int((box[0] + box[2]) / 2 * 100)]
            np.testing.assert_allclose(local_image[25, 25, :2], centre_in_global[:2], atol=2)


def test_normalise_matches_clip_preprocessing():
    from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    expected = (pixels / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    out = image_ops.normalise(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_jpeg_draft_decodes_smaller_and_keeps_geometry():
    """A big JPEG decoded for a small output comes back reduced, with the scale that maps record boxes."""
    width, height = 800, 600
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 128)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    image, sx, sy = image_ops.decode_image(buffer.getvalue(), (width, height), min_scale=0.2)
    assert image.size == (200, 150) and (sx, sy) == (0.25, 0.25)
    full = image_ops.crop_resize(image, image_ops.full_crop(width, height).scaled(sx, sy), (64, 48))
    reference = Image.fromarray(pixels).resize((64, 48), Image.BICUBIC)
    assert np.abs(np.asarray(full, np.int16) - np.asarray(reference, np.int16)).mean() < 3
    with pytest.raises(ValueError, match="800x600 but the record says 640x480"):
        image_ops.decode_image(buffer.getvalue(), (640, 480))


# ------------------------------------------------------------------------------------------------------------
# The per-example transform


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(**overrides):
    example = records.make_record(
        id="r0", source="test", split="train", image=_png(100, 80), width=100, height=80,
        captions=["a caption", "another caption"], long_caption="a long description " * 100,
        hard_negatives=["negative one", "negative two", "negative three"],
        regions=[
            records.make_region([10, 10, 30, 30], category="ship", category_id=3),
            records.make_region([50, 20, 90, 60], category="tank", category_id=5, caption="a white tank"),
            records.make_region([60, 60, 70, 70], category="car", category_id=1),
        ],
    )
    example.update(overrides)
    return records.decode_record(records.encode_record(example))


def _no_aug_config(**overrides) -> transforms.TransformConfig:
    values = dict(image_size=32, random_resized_crop=False, hflip_prob=0.0, num_hard_negatives=4, max_regions=2,
                  region_crop_size=8, num_local_crops=2, local_crop_size=16, long_context_length=248)
    values.update(overrides)
    return transforms.TransformConfig(**values)


def test_example_texts_regions_and_padding():
    config = _no_aug_config()
    transform = transforms.TrainTransform(config)
    example = transform.random_map(_record(), np.random.default_rng(0))
    spec = transforms.output_spec(config)
    assert {k: (v.shape, v.dtype) for k, v in example.items()} == spec
    assert any((example["text"] == row).all() for row in tokenizer.tokenize(["a caption", "another caption"]))
    # 3 negatives padded to 4, in record order
    np.testing.assert_array_equal(example["hard_negative_mask"], [True, True, True, False])
    np.testing.assert_array_equal(example["hard_negatives"][:3], tokenizer.tokenize(["negative one", "negative two",
                                                                                     "negative three"]))
    assert not example["hard_negatives"][3].any()
    # 3 regions survive the (identity) view, 2 are kept at random; texts match the kept boxes
    assert example["region_mask"].tolist() == [True, True]
    by_box = {(10, 10, 30, 30): ("a satellite image of ship.", 3), (50, 20, 90, 60): ("a white tank", -1),
              (60, 60, 70, 70): ("a satellite image of car.", 1)}
    for box, text, category in zip(example["region_boxes"], example["region_text"], example["region_category"]):
        pixel_box = tuple(int(round(v)) for v in box * np.array([100, 80, 100, 80]))
        expected_text, expected_category = by_box[pixel_box]
        np.testing.assert_array_equal(text, tokenizer.tokenize(expected_text)[0])
        assert category == expected_category
    # long text is tokenised at the long context, truncated with EOT last
    assert example["long_text"][-1] == tokenizer.EOT_TOKEN_ID
    assert example["long_text_mask"] == np.bool_(True)  # a real long description
    # local crop boxes lie in the global view
    assert np.all((example["local_crop_boxes"] >= 0) & (example["local_crop_boxes"] <= 1))


def test_example_with_more_negatives_than_k_and_no_long_text():
    config = _no_aug_config(num_hard_negatives=2, max_regions=0, num_local_crops=0)
    example = transforms.TrainTransform(config).random_map(_record(long_caption=None), np.random.default_rng(3))
    assert example["hard_negative_mask"].all()
    pool = tokenizer.tokenize(["negative one", "negative two", "negative three"])
    picked = [int(np.flatnonzero((pool == row).all(axis=1))[0]) for row in example["hard_negatives"]]
    assert len(set(picked)) == 2
    # without a long description the chosen caption stands in for it, masked out of the long-text losses
    np.testing.assert_array_equal(example["long_text"][:77], example["text"])
    assert example["long_text_mask"].dtype == np.bool_ and not example["long_text_mask"]
    assert "region_boxes" not in example and "local_crops" not in example


def test_long_text_mask_is_in_the_contract_only_with_long_text():
    with_long = transforms.output_spec(_no_aug_config())
    assert with_long["long_text_mask"] == ((), np.dtype(np.bool_))
    assert "long_text_mask" not in transforms.output_spec(_no_aug_config(long_context_length=0))
    only_long = transforms.TrainTransform(_no_aug_config(max_regions=0, num_local_crops=0, num_hard_negatives=0))
    example = only_long.random_map(_record(captions=[]), np.random.default_rng(0))  # the long caption is all
    assert example["long_text_mask"]
    np.testing.assert_array_equal(example["long_text"], tokenizer.tokenize(["a long description " * 100], 248)[0])


def test_decode_image_names_the_record_and_checks_the_size_only_when_given():
    with pytest.raises(ValueError, match=r"cannot decode image shard-3 record 7"):
        image_ops.decode_image(b"\x89PNG not really", (4, 4), where="shard-3 record 7")
    cut = _png(100, 80)[:60]  # header intact, pixels cut: fails when decoding, still named
    with pytest.raises(ValueError, match=r"cannot decode image r0"):
        image_ops.decode_image(cut, (100, 80), where="r0")
    with pytest.raises(ValueError, match=r"^r0: image is 100x80 but the record says 80x100"):
        image_ops.decode_image(_png(100, 80), (80, 100), where="r0")
    image, sx, sy = image_ops.decode_image(_png(100, 80), None)
    assert image.size == (100, 80) and image.mode == "RGB" and (sx, sy) == (1.0, 1.0)


def test_category_id_mapping_overrides_record_ids():
    config = _no_aug_config(max_regions=3, category_ids=(("car", 7), ("ship", 0)), region_crop_size=0)
    example = transforms.TrainTransform(config).random_map(_record(), np.random.default_rng(0))
    categories = {tuple(np.round(b * [100, 80, 100, 80]).astype(int)): c
                  for b, c in zip(example["region_boxes"], example["region_category"])}
    assert categories == {(10, 10, 30, 30): 0, (50, 20, 90, 60): -1, (60, 60, 70, 70): 7}


def test_regions_outside_the_crop_are_dropped_and_padded():
    # a crop that sees only the left 40% of the image: the two right-hand regions leave it
    config = _no_aug_config(random_resized_crop=True, random_resized_crop_scale=(0.4, 0.4),
                            random_resized_crop_ratio=(0.5, 0.5), max_regions=3, region_view_crop_size=8)
    record = _record(width=100, height=80)
    example = None
    for seed in range(50):
        candidate = transforms.TrainTransform(config).random_map(record, np.random.default_rng(seed))
        if candidate["region_mask"].sum() == 1:
            example = candidate
            break
    assert example is not None, "no crop kept exactly one region in 50 draws"
    assert not example["region_text"][1:].any() and not example["region_boxes"][1:].any()
    assert (example["region_category"][1:] == -1).all()
    assert not example["region_crops"][1:].any()
    assert not example["region_view_crops"][1:].any() and example["region_view_crops"][0].any()


def test_record_without_text_gets_a_category_caption_or_is_refused():
    config = _no_aug_config(long_context_length=0)
    transform = transforms.TrainTransform(config)
    detection = _record(captions=[], long_caption=None)  # regions: ship, tank (captioned), car
    example = transform.random_map(detection, np.random.default_rng(0))
    np.testing.assert_array_equal(example["text"], tokenizer.tokenize("a satellite image of car, ship and tank.")[0])
    classified = _record(captions=[], long_caption=None, class_name="dense residential")
    example = transform.random_map(classified, np.random.default_rng(0))
    np.testing.assert_array_equal(example["text"], tokenizer.tokenize("a satellite image of dense residential.")[0])
    with pytest.raises(transforms.ExampleError, match="no caption, no long caption, no class name"):
        transform.random_map(_record(captions=[], long_caption=None, regions=[]), np.random.default_rng(0))


def test_transform_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_regions"):
        transforms.TransformConfig(max_regions=-1)
    with pytest.raises(ValueError, match="category_prompt"):
        transforms.TransformConfig(category_prompt="no placeholder")
    with pytest.raises(ValueError, match="local_crop_scale"):
        transforms.TransformConfig(local_crop_scale=(0.7, 0.3))
    with pytest.raises(ValueError, match="interpolation"):
        transforms.TransformConfig(interpolation="lanczos3")


# ------------------------------------------------------------------------------------------------------------
# Region crops: the consistency view (`region_view_crops`) and FarSLIP's CLS crops (`region_crops`)


def _painted_png(width: int, height: int, block: int) -> tuple[bytes, np.ndarray]:
    """Blocks of ``block`` pixels, each its own colour (no two blocks alike, left and right halves differ)."""
    rows, cols = np.mgrid[0:height, 0:width] // block
    pixels = np.stack([cols * 37 % 256, rows * 53 % 256, (cols * 11 + rows * 23 + 60) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), pixels


def _pixels(normalised: np.ndarray) -> np.ndarray:
    return (normalised * np.array(batch_contract.OPENAI_STD) + np.array(batch_contract.OPENAI_MEAN)) * 255.0


def test_visible_part_is_the_view_box_in_source_pixels():
    """visible_part clips like transform_boxes: mapped into the (flipped) view it is the box's view row."""
    view = Crop(10.0, 20.0, 40.0, 20.0)
    boxes = np.array([[20, 25, 30, 35], [45, 22, 65, 38], [0, 15, 15, 45]], np.float64)
    for flip in (False, True):
        view_boxes, _ = image_ops.transform_boxes(boxes, view, flip, (80, 40), min_visible_fraction=0.0)
        for box, expected in zip(boxes, view_boxes):
            part = image_ops.visible_part(box, view)
            np.testing.assert_allclose(image_ops.crop_box_in_view(part, view, flip), expected, atol=1e-6)
    assert image_ops.visible_part([45, 22, 65, 38], view) == Crop(45.0, 22.0, 5.0, 16.0)
    assert image_ops.visible_part([0, 0, 5, 5], view).width == 0.0


def test_region_view_crop_is_the_box_as_the_global_view_shows_it():
    """A painted image and one box that random crops cut: the consistency crop equals the global view's pixels
    at ``region_boxes`` (resampled, flipped with the view), while the CLS crop is the whole box of the original,
    unflipped. The mirrored view crop and the CLS crop are both far from it (the test can tell them apart)."""
    width, height, size, crop_size = 120, 96, 64, 32
    png, original = _painted_png(width, height, block=12)
    box = (18.0, 12.0, 102.0, 84.0)
    record = _record(image=png, width=width, height=height,
                     regions=[records.make_region(list(box), category="ship", category_id=3)])
    config = _no_aug_config(image_size=size, random_resized_crop=True, random_resized_crop_scale=(0.25, 0.5),
                            hflip_prob=0.5, max_regions=1, region_crop_size=crop_size,
                            region_view_crop_size=crop_size, num_local_crops=0, num_hard_negatives=0,
                            long_context_length=0)
    assert transforms.output_spec(config)["region_view_crops"] == ((1, crop_size, crop_size, 3), np.dtype(np.float32))
    transform = transforms.TrainTransform(config)
    cls_expected = np.asarray(image_ops.crop_resize(Image.fromarray(original), Crop(18, 12, 84, 72),
                                                     (crop_size, crop_size)), np.float64)
    checked = {False: 0, True: 0}
    errors, mirrored_errors, cls_errors = [], [], []
    for seed in range(60):
        example = transform.random_map(record, np.random.default_rng(seed))
        if not example["region_mask"][0]:
            continue
        view_box = example["region_boxes"][0]
        visible = (view_box[2] - view_box[0]) * (view_box[3] - view_box[1])
        if visible > 0.9:  # the whole view is the box: nothing cut, nothing to tell apart
            continue
        view = Image.fromarray(np.clip(np.round(_pixels(example["image"])), 0, 255).astype(np.uint8))
        expected = np.asarray(view.resize((crop_size, crop_size), Image.BICUBIC, box=tuple(view_box * size)),
                              np.float64)
        got = _pixels(example["region_view_crops"][0])
        errors.append(np.abs(got - expected).mean())
        mirrored_errors.append(np.abs(got - expected[:, ::-1]).mean())
        cls_errors.append(np.abs(got - _pixels(example["region_crops"][0])).mean())
        # the CLS crop is the original image at the whole box, whatever the view
        np.testing.assert_allclose(_pixels(example["region_crops"][0]), cls_expected, atol=0.01)
        # the view's own draws, replayed: crop first, then the flip (make_train_example's order)
        replay = np.random.default_rng(seed)
        image_ops.sample_resized_crop(replay, width, height, config.random_resized_crop_scale,
                                       config.random_resized_crop_ratio)
        checked[bool(replay.random() < config.hflip_prob)] += 1
    assert min(checked.values()) >= 3, f"need flipped and unflipped cut views, got {checked}"
    print(f"region_view_crops vs the global view's box: mean |diff| max {max(errors):.2f}/255 over {len(errors)} views "
          f"({checked[True]} flipped); mirrored min {min(mirrored_errors):.1f}; CLS crop min {min(cls_errors):.1f}")
    assert max(errors) < 3.0
    assert min(mirrored_errors) > 4 * max(errors)
    assert min(cls_errors) > 4 * max(errors)

