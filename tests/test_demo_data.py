"""The synthetic demo dataset (tools/make_demo_data.py): deterministic, and its texts describe its pixels."""
from __future__ import annotations

import io
import pathlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_fixtures import load_demo_module
from geoalign_jax import tokenizer
from geoalign_jax.data import sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


demo = load_demo_module()
SMALL = dict(num_train=12, num_val=4, num_per_class=2, image_size=64)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The same seed twice (once through the CLI), and another seed."""
    runs = {name: tmp_path_factory.mktemp(name) for name in ("first", "again", "other")}
    demo.make_demo_data(runs["first"], seed=0, **SMALL)
    assert demo.main(["--out", str(runs["again"]), "--seed", "0", "--num-train", "12", "--num-val", "4",
                      "--num-per-class", "2", "--image-size", "64"]) == 0
    demo.make_demo_data(runs["other"], seed=1, **SMALL)
    return runs


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(directory: pathlib.Path, split: str) -> list[dict]:
    source = sources.RecordSource.from_dir(directory, split)
    return [source[i] for i in range(len(source))]


def _pixels(record: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"), np.float32)


def _dominant_land_cover(pixels: np.ndarray) -> str:
    """Nearest palette colour per pixel over all land covers and object colours; the most common land cover."""
    names, colours = [], []
    for cover, palette in demo.LAND_COVER_PALETTE.items():
        names += [cover] * len(palette)
        colours += list(palette)
    for colour in demo.COLOURS.values():
        names.append("object")
        colours.append(colour)
    distance = np.linalg.norm(pixels.reshape(-1, 1, 3) - np.asarray(colours, np.float32)[None], axis=-1)
    votes = Counter(names[i] for i in distance.argmin(-1))
    votes.pop("object", None)
    return votes.most_common(1)[0][0]


def test_same_seed_gives_byte_identical_shards(demo_runs):
    first, again, other = (_files(demo_runs[name]) for name in ("first", "again", "other"))
    assert any(name.endswith(".array_record") for name in first)
    shard_stems = ("scenes/demo-train-00000-of-00002", "scenes/demo-train-00001-of-00002",
                   "scenes/demo-val-00000-of-00002", "scenes/demo-val-00001-of-00002",
                   "landcover/demo_landcover-test-00000-of-00001")
    assert set(first) == {"scenes/manifest.json", "landcover/manifest.json",
                          *(stem + suffix for stem in shard_stems for suffix in (".array_record", ".hashes.npy"))}
    assert first == again
    shards = [name for name in first if name.endswith(".array_record")]
    assert all(first[name] != other[name] for name in shards)


def test_captions_describe_the_pixels(demo_runs):
    scenes_dir = demo_runs["first"] / "scenes"
    manifest = sources.read_manifest(scenes_dir)
    assert manifest["splits"]["train"]["count"] == 12 and manifest["splits"]["val"]["count"] == 4
    captioned = 0
    for record in _records(scenes_dir, "train") + _records(scenes_dir, "val"):
        scene = demo.parse_caption(record["captions"][0])
        pixels = _pixels(record)
        assert _dominant_land_cover(pixels) == scene.land_cover == record["class_name"]
        assert record["label"] == demo.LAND_COVERS.index(scene.land_cover)
        # one region per drawn object: as many of each category as the caption counts
        counts = Counter(region["category"] for region in record["regions"])
        assert counts == {group.category: group.count for group in scene.groups}
        colour_of = {group.category: group.colour for group in scene.groups}
        for region in record["regions"]:
            x1, y1, x2, y2 = (int(round(v)) for v in region["box"])
            inside = pixels[y1:y2, x1:x2].reshape(-1, 3)
            target = np.asarray(demo.COLOURS[colour_of[region["category"]]], np.float32)
            share = np.mean(np.linalg.norm(inside - target, axis=-1) < 40)
            assert share >= 0.2, (record["id"], region)
            if region["caption"] is not None:
                group = next(g for g in scene.groups if g.category == region["category"])
                assert region["caption"] == demo.region_caption(group)
                captioned += 1
    assert captioned > 0  # the caption check above ran at all (about half the regions carry one)


def test_long_text_is_long_and_names_every_object(demo_runs):
    for record in _records(demo_runs["first"] / "scenes", "train"):
        long_text = record["long_caption"]
        assert tokenizer.count_tokens(long_text) > 77
        scene = demo.parse_caption(record["captions"][0])
        for group in scene.groups:
            assert f"In the {group.position} of the image there" in long_text
            assert long_text.count(f"{group.category} there is {group.colour}, {group.size}") == group.count


def test_each_hard_negative_changes_exactly_one_fact(demo_runs):
    for record in _records(demo_runs["first"] / "scenes", "train"):
        scene = demo.parse_caption(record["captions"][0])
        assert len(record["hard_negatives"]) == 4
        facts = []
        for negative in record["hard_negatives"]:
            changed = demo.changed_facts(scene, demo.parse_caption(negative))
            assert len(changed) == 1, (record["captions"][0], negative, changed)
            facts += changed
        assert sorted(facts) == sorted(demo.HARD_NEGATIVE_FACTS)


def test_land_cover_split_for_zero_shot(demo_runs):
    landcover_dir = demo_runs["first"] / "landcover"
    manifest = sources.read_manifest(landcover_dir)
    assert manifest["class_names"] == list(demo.LAND_COVERS)
    records = _records(landcover_dir, "test")
    assert Counter(r["class_name"] for r in records) == {cover: 2 for cover in demo.LAND_COVERS}
    for record in records:
        assert demo.LAND_COVERS[record["label"]] == record["class_name"] == _dominant_land_cover(_pixels(record))


def test_parse_caption_refuses_other_text():
    with pytest.raises(ValueError, match="not a demo caption"):
        demo.parse_caption("a photo of a cat.")
    scene = demo.sample_scene(np.random.default_rng(5))
    assert demo.parse_caption(demo.caption(scene)) == scene


def test_smallest_image_size_renders_every_category(tmp_path):
    """32 px (the documented minimum, the tiny model's input) draws even the smallest objects."""
    written = demo.make_demo_data(tmp_path, num_train=120, num_val=0, num_per_class=0, image_size=32, seed=3)
    records = _records(pathlib.Path(written["scenes"]), "train")
    assert len(records) == 120
    categories = {region["category"] for record in records for region in record["regions"]}
    assert categories == set(demo.CATEGORIES)
