"""Deterministic synthetic aerial scenes: a demo dataset a tiny CLIP learns on a CPU in minutes.

Every caption is about what is drawn: a land-cover texture (water, forest, farmland, desert, city) and one or
two groups of objects (ten categories with distinct shapes: airplane, ship, storage tank, car, building, tree,
swimming pool, tennis court, roundabout, bridge) with a colour, a size, a count (1-4) and a position on a 3x3
grid. Each image gets

* a short caption, e.g. "an aerial image of farmland with two small red airplanes in the top left.";
* a long description (> 77 tokens) naming every object with its colour, size, pixel size and position;
* one region per object (its box; a category, and for about half of them a caption "a small red airplane");
* four hard negatives, each the caption with exactly one fact changed (count, colour, category, position).

A class-per-folder split of land-cover scenes is written as well, for zero-shot classification.

The images are written to a scratch folder with a JSONL file and prepared with the project's `prepare` formats
(``prepare_jsonl`` and ``prepare_folders``), so the demo exercises the same path as real data. Same seed ->
byte-identical shards. Default image size 64 px (the tiny model trains at 32-64 px).

    python tools/make_demo_data.py --out data/demo --num-train 1000 --num-val 200 --seed 0

Output: ``OUT/scenes`` (splits train, val; name "demo") and ``OUT/landcover`` (split test; name
"demo_landcover"; ``class_names`` in the manifest), each with its manifest.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax.data import prepare_formats  # noqa: E402

# Land covers, in label order (sorted, so that the folder format's label = index here too).
LAND_COVERS = ("city", "desert", "farmland", "forest", "water")
LAND_COVER_PHRASE = {"city": "a city", "desert": "desert", "farmland": "farmland", "forest": "forest", "water": "water"}
LAND_COVER_LONG = {
    "city": "a city with grey blocks separated by a grid of dark roads",
    "desert": "sandy desert with light dune ripples",
    "farmland": "farmland divided into long parallel fields of green and brown crops",
    "forest": "dense forest with dark green tree crowns",
    "water": "open water with small regular waves",
}
#: The colours each texture is painted with (also used to classify pixels back to a land cover in tests).
LAND_COVER_PALETTE = {
    "city": ((165, 165, 170), (80, 80, 85)),
    "desert": ((225, 195, 140), (200, 168, 112)),
    "farmland": ((110, 165, 55), (150, 105, 60), (150, 190, 80)),
    "forest": ((25, 85, 35), (15, 62, 25), (45, 110, 45)),
    "water": ((35, 75, 155), (60, 105, 185)),
}
CATEGORIES = (
    "airplane", "ship", "storage tank", "car", "building", "tree", "swimming pool", "tennis court", "roundabout",
    "bridge",
)
PLURAL = {category: category + "s" for category in CATEGORIES}
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (250, 225, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "orange": (245, 130, 20),
    "purple": (140, 40, 170),
}
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.14, "large": 0.22}  # object side / image side
MAX_COUNT = {"small": 4, "large": 2}  # what fits in a grid cell without overlaps
POSITIONS = (
    "top left", "top middle", "top right", "middle left", "center", "middle right", "bottom left", "bottom middle",
    "bottom right",
)
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
ORDINALS = ("first", "second", "third", "fourth")
HARD_NEGATIVE_FACTS = ("count", "colour", "category", "position")
NOISE = 8  # +- per-pixel texture noise


@dataclasses.dataclass(frozen=True)
class ObjectGroup:
    """Objects of one category, colour and size, around one grid position."""

    category: str
    colour: str
    size: str
    count: int
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows: the facts the captions state."""

    land_cover: str
    groups: tuple[ObjectGroup, ...]


@dataclasses.dataclass(frozen=True)
class DrawnObject:
    """One drawn object: which group it belongs to and its box [x1, y1, x2, y2] in pixels."""

    group: int
    box: tuple[float, float, float, float]


# ------------------------------------------------------------------------------------------------------------
# Scenes and texts


def sample_scene(rng: np.random.Generator, land_cover: str | None = None) -> Scene:
    """A random scene: one land cover, one or two groups with distinct categories and positions."""
    land_cover = land_cover or LAND_COVERS[int(rng.integers(len(LAND_COVERS)))]
    num_groups = int(rng.integers(1, 3))
    categories = rng.choice(len(CATEGORIES), size=num_groups, replace=False)
    positions = rng.choice(len(POSITIONS), size=num_groups, replace=False)
    groups = []
    for category, position in zip(categories, positions):
        size = SIZES[int(rng.integers(len(SIZES)))]
        groups.append(ObjectGroup(
            category=CATEGORIES[int(category)],
            colour=tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
            size=size,
            count=int(rng.integers(1, MAX_COUNT[size] + 1)),
            position=POSITIONS[int(position)],
        ))
    return Scene(land_cover, tuple(groups))


def _group_phrase(group: ObjectGroup) -> str:
    noun = group.category if group.count == 1 else PLURAL[group.category]
    return f"{COUNT_WORDS[group.count]} {group.size} {group.colour} {noun} in the {group.position}"


def caption(scene: Scene) -> str:
    """The short caption: land cover, then each group's count, size, colour, category and position."""
    groups = " and ".join(_group_phrase(group) for group in scene.groups)
    return f"an aerial image of {LAND_COVER_PHRASE[scene.land_cover]} with {groups}."


_GROUP_PATTERN = re.compile(
    rf"(?P<count>{'|'.join(COUNT_WORDS)}) (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) "
    rf"(?P<noun>{'|'.join(sorted(list(CATEGORIES) + list(PLURAL.values()), key=len, reverse=True))}) "
    rf"in the (?P<position>{'|'.join(sorted(POSITIONS, key=len, reverse=True))})"
)
_PHRASE_TO_LAND_COVER = {phrase: name for name, phrase in LAND_COVER_PHRASE.items()}


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption`` (for tests and for checking hard negatives): the facts a caption states."""
    match = re.fullmatch(r"an aerial image of (?P<cover>.+?) with (?P<groups>.+)\.", text)
    if match is None or match.group("cover") not in _PHRASE_TO_LAND_COVER:
        raise ValueError(f"not a demo caption: {text!r}")
    groups = []
    for part in match.group("groups").split(" and "):
        found = _GROUP_PATTERN.fullmatch(part)
        if found is None:
            raise ValueError(f"not a demo object phrase: {part!r} in {text!r}")
        noun = found.group("noun")
        category = noun if noun in CATEGORIES else next(c for c, p in PLURAL.items() if p == noun)
        groups.append(ObjectGroup(category, found.group("colour"), found.group("size"),
                                  COUNT_WORDS.index(found.group("count")), found.group("position")))
    return Scene(_PHRASE_TO_LAND_COVER[match.group("cover")], tuple(groups))


def changed_facts(scene: Scene, other: Scene) -> list[str]:
    """Which facts differ between two scenes with the same groups layout ('land_cover', 'count', ...)."""
    facts = ["land_cover"] if scene.land_cover != other.land_cover else []
    if len(scene.groups) != len(other.groups):
        return facts + ["groups"]
    for mine, theirs in zip(scene.groups, other.groups):
        for field, fact in (("count", "count"), ("colour", "colour"), ("category", "category"),
                            ("position", "position"), ("size", "size")):
            if getattr(mine, field) != getattr(theirs, field):
                facts.append(fact)
    return facts


def hard_negative_scenes(scene: Scene, rng: np.random.Generator) -> list[tuple[str, Scene]]:
    """One false scene per fact in HARD_NEGATIVE_FACTS, each changing that fact of one random group."""
    negatives = []
    for fact in HARD_NEGATIVE_FACTS:
        index = int(rng.integers(len(scene.groups)))
        group = scene.groups[index]
        others = [g for i, g in enumerate(scene.groups) if i != index]
        if fact == "count":
            choices = [c for c in range(1, 5) if c != group.count]
            new = dataclasses.replace(group, count=int(rng.choice(choices)))
        elif fact == "colour":
            choices = [c for c in COLOURS if c != group.colour]
            new = dataclasses.replace(group, colour=choices[int(rng.integers(len(choices)))])
        elif fact == "category":
            used = {g.category for g in scene.groups}
            choices = [c for c in CATEGORIES if c not in used]
            new = dataclasses.replace(group, category=choices[int(rng.integers(len(choices)))])
        else:
            used = {g.position for g in others} | {group.position}
            choices = [p for p in POSITIONS if p not in used]
            new = dataclasses.replace(group, position=choices[int(rng.integers(len(choices)))])
        groups = list(scene.groups)
        groups[index] = new
        negatives.append((fact, Scene(scene.land_cover, tuple(groups))))
    return negatives


def region_caption(group: ObjectGroup) -> str:
    return f"a {group.size} {group.colour} {group.category}"


def long_description(scene: Scene, objects: Sequence[DrawnObject], image_size: int) -> str:
    """Every object with its colour, size, pixel size and position, plus the land cover and the empty cells."""
    total = len(objects)
    sentences = [
        f"This {image_size} by {image_size} pixel aerial image shows {LAND_COVER_LONG[scene.land_cover]}.",
        f"It contains {COUNT_WORDS[total] if total < len(COUNT_WORDS) else total} object{'s' if total != 1 else ''}"
        f" in {COUNT_WORDS[len(scene.groups)]} group{'s' if len(scene.groups) != 1 else ''}.",
    ]
    for index, group in enumerate(scene.groups):
        verb = "is" if group.count == 1 else "are"
        sentences.append(f"In the {group.position} of the image there {verb} {_group_phrase(group).rsplit(' in the ', 1)[0]}.")
        members = [o for o in objects if o.group == index]
        for ordinal, drawn in zip(ORDINALS, members):
            x1, y1, x2, y2 = drawn.box
            sentences.append(
                f"The {ordinal} {group.category} there is {group.colour}, {group.size}, about {round(x2 - x1)} by "
                f"{round(y2 - y1)} pixels, with its centre at x {round((x1 + x2) / 2)} and y {round((y1 + y2) / 2)}."
            )
    empty = [p for p in POSITIONS if p not in {g.position for g in scene.groups}]
    sentences.append(
        f"The rest of the image, including the {', the '.join(empty)}, shows only {LAND_COVER_PHRASE[scene.land_cover]}."
    )
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------------------
# Rendering


def _texture(land_cover: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The land-cover background [size, size, 3] uint8: a pattern in the cover's palette plus mild noise."""
    palette = np.asarray(LAND_COVER_PALETTE[land_cover], dtype=np.int16)
    y, x = np.mgrid[0:size, 0:size]
    if land_cover == "water":
        phase = rng.uniform(0, 2 * np.pi)
        index = (((y + 1.5 * np.sin(x / 2.5 + phase)) % 6) < 2).astype(np.int64)
    elif land_cover == "forest":
        coarse = rng.integers(0, 3, size=(size // 4 + 2, size // 4 + 2))
        index = coarse[y // 4, x // 4]
    elif land_cover == "farmland":
        width = max(3, size // int(rng.integers(5, 9)))
        along = x if rng.random() < 0.5 else y
        order = rng.permutation(3)
        index = order[(along // width) % 3]
    elif land_cover == "desert":
        phase = rng.uniform(0, 2 * np.pi)
        index = (np.sin((x + 0.6 * y) / 2.0 + phase) > 0.6).astype(np.int64)
    else:  # city: blocks and a road grid
        spacing = max(6, size // int(rng.integers(4, 6)))
        offset = int(rng.integers(0, spacing))
        road = (((x + offset) % spacing) < 2) | (((y + offset) % spacing) < 2)
        index = road.astype(np.int64)
    pixels = palette[index] + rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _object_extent(category: str, side: int) -> tuple[int, int]:
    """(width, height) in pixels of an object of this category with nominal side ``side``."""
    if category == "ship":
        return side, max(2, side // 3)
    if category == "car":
        return max(3, (side * 2) // 3), max(2, side // 3)
    if category == "tennis court":
        return side, max(3, (side * 2) // 3)
    if category == "bridge":
        return side + side // 2, max(2, side // 4)
    return side, side


def _draw_object(draw: ImageDraw.ImageDraw, category: str, box: tuple[int, int, int, int], colour: tuple[int, int, int],
                 background: tuple[int, int, int]) -> None:
    """Draw one object filling ``box`` (x1, y1, x2, y2 exclusive) with the category's shape."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    last_x, last_y = x2 - 1, y2 - 1
    if category == "airplane":  # fuselage (vertical) + wings (horizontal, upper third) + tail
        cx = x1 + w // 2
        draw.rectangle([cx - max(1, w // 8), y1, cx + max(0, w // 8), last_y], fill=colour)
        wing_y = y1 + h // 3
        draw.rectangle([x1, wing_y, last_x, wing_y + max(1, h // 6)], fill=colour)
        draw.rectangle([x1 + w // 4, last_y - max(1, h // 8), last_x - w // 4, last_y], fill=colour)
    elif category in ("ship", "storage tank"):
        draw.ellipse([x1, y1, last_x, last_y], fill=colour)
    elif category in ("car", "bridge"):
        draw.rectangle([x1, y1, last_x, last_y], fill=colour)
    elif category == "building":  # roof with a darker core
        draw.rectangle([x1, y1, last_x, last_y], fill=colour)
        shade = tuple(int(c * 0.6) for c in colour)
        draw.rectangle([x1 + w // 3, y1 + h // 3, last_x - w // 3, last_y - h // 3], fill=shade)
    elif category == "tree":  # diamond crown
        draw.polygon([(x1 + w / 2, y1), (last_x, y1 + h / 2), (x1 + w / 2, last_y), (x1, y1 + h / 2)], fill=colour)
    elif category == "swimming pool":  # a rim with the background inside
        draw.rectangle([x1, y1, last_x, last_y], fill=colour)
        if w > 4 and h > 4:  # small pools (32 px scenes) are solid
            draw.rectangle([x1 + 2, y1 + 2, last_x - 2, last_y - 2], fill=background)
    elif category == "tennis court":  # court with a net line across
        draw.rectangle([x1, y1, last_x, last_y], fill=colour)
        draw.line([x1 + w // 2, y1, x1 + w // 2, last_y], fill=background, width=1)
    elif category == "roundabout":  # ring
        draw.ellipse([x1, y1, last_x, last_y], outline=colour, width=max(2, w // 4))
    else:
        raise ValueError(f"unknown category {category!r}")


def _cell(position: str, size: int) -> tuple[float, float, float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    third = size / 3
    return (col * third, row * third, (col + 1) * third, (row + 1) * third)


def _overlaps(box: tuple[int, int, int, int], others: Sequence[tuple[int, int, int, int]], gap: int = 1) -> bool:
    return any(box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap
               for o in others)


def place_objects(scene: Scene, size: int, rng: np.random.Generator) -> list[DrawnObject] | None:
    """Integer boxes for every object: centre inside its group's grid cell, inside the image, no overlaps.
    None when the objects do not fit (the caller samples another scene)."""
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for group_index, group in enumerate(scene.groups):
        side = max(4, round(SIZE_FRACTION[group.size] * size))
        w, h = _object_extent(group.category, side)
        if rng.random() < 0.5 and group.category in ("ship", "car", "bridge", "tennis court"):
            w, h = h, w  # elongated objects point either way
        cx1, cy1, cx2, cy2 = _cell(group.position, size)
        for _ in range(group.count):
            for _attempt in range(60):
                cx = rng.uniform(cx1, cx2)
                cy = rng.uniform(cy1, cy2)
                x1 = int(np.clip(round(cx - w / 2), 0, size - w))
                y1 = int(np.clip(round(cy - h / 2), 0, size - h))
                box = (x1, y1, x1 + w, y1 + h)
                centre_x, centre_y = x1 + w / 2, y1 + h / 2
                if cx1 <= centre_x < cx2 and cy1 <= centre_y < cy2 and not _overlaps(box, placed):
                    break
            else:
                return None
            placed.append(box)
            objects.append(DrawnObject(group_index, tuple(float(v) for v in box)))
    return objects


def render_scene(scene: Scene, objects: Sequence[DrawnObject], size: int, rng: np.random.Generator) -> Image.Image:
    """The RGB image of ``scene`` with ``objects`` drawn at their boxes."""
    image = Image.fromarray(_texture(scene.land_cover, size, rng))
    draw = ImageDraw.Draw(image)
    background = LAND_COVER_PALETTE[scene.land_cover][0]
    for drawn in objects:
        group = scene.groups[drawn.group]
        box = tuple(int(v) for v in drawn.box)
        _draw_object(draw, group.category, box, COLOURS[group.colour], background)
    return image


def make_scene_image(rng: np.random.Generator, size: int, land_cover: str | None = None
                     ) -> tuple[Scene, list[DrawnObject], Image.Image]:
    """Sample scenes until the objects fit, then render: (scene, objects, image)."""
    while True:
        scene = sample_scene(rng, land_cover)
        objects = place_objects(scene, size, rng)
        if objects is not None:
            return scene, objects, render_scene(scene, objects, size, rng)


def jsonl_entry(scene: Scene, objects: Sequence[DrawnObject], rng: np.random.Generator, *, image: str, split: str,
                record_id: str, image_size: int) -> dict:
    """One line of the JSONL corpus (schema of prepare_formats.prepare_jsonl)."""
    regions = []
    for drawn in objects:
        group = scene.groups[drawn.group]
        region = {"box": list(drawn.box), "category": group.category}
        if rng.random() < 0.5:  # half of the regions carry free text, as in MGRS / FarSLIP
            region["caption"] = region_caption(group)
        regions.append(region)
    return {
        "image": image,
        "split": split,
        "id": record_id,
        "captions": [caption(scene)],
        "long_caption": long_description(scene, objects, image_size),
        "hard_negatives": [caption(negative) for _, negative in hard_negative_scenes(scene, rng)],
        "regions": regions,
        "label": LAND_COVERS.index(scene.land_cover),
        "class_name": scene.land_cover,
    }


# ------------------------------------------------------------------------------------------------------------
# Writing


_SPLIT_CODES = {"train": 0, "val": 1, "landcover": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One independent generator per image: any image can be re-made alone, in any order."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def write_sources(scratch: pathlib.Path, *, num_train: int, num_val: int, num_per_class: int, image_size: int,
                  seed: int) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the PNG images + scenes.jsonl and the class folders; returns (jsonl path, class-folder root)."""
    lines = []
    for split, count in (("train", num_train), ("val", num_val)):
        folder = scratch / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = _rng(seed, split, index)
            scene, objects, image = make_scene_image(rng, image_size)
            relative = f"images/{split}/{index:06d}.png"
            image.save(scratch / relative, format="PNG")
            lines.append(jsonl_entry(scene, objects, rng, image=relative, split=split,
                                     record_id=f"demo-{split}-{index:06d}", image_size=image_size))
    jsonl_path = scratch / "scenes.jsonl"
    jsonl_path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines), encoding="utf-8")
    class_root = scratch / "landcover"
    for class_index, land_cover in enumerate(LAND_COVERS):
        folder = class_root / land_cover
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(num_per_class):
            rng = _rng(seed, "landcover", class_index * 1_000_000 + index)
            _, _, image = make_scene_image(rng, image_size, land_cover)
            image.save(folder / f"{land_cover}_{index:05d}.png", format="PNG")
    return jsonl_path, class_root


def make_demo_data(out: str | pathlib.Path, *, num_train: int = 1000, num_val: int = 200, num_per_class: int = 20,
                   image_size: int = 64, seed: int = 0, num_shards: int = 2, workers: int = 1,
                   keep_sources: bool = False, overwrite: bool = False) -> dict[str, str]:
    """Render the demo sources and prepare them; returns {"scenes": dir, "landcover": dir}."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 px (objects of 4 px and a 3x3 grid), got {image_size}")
    if num_train < 1 or num_val < 0 or num_per_class < 0:
        raise ValueError("need num_train >= 1, num_val >= 0, num_per_class >= 0")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="demo-sources-", dir=out)) if not keep_sources else out / "sources"
    try:
        jsonl_path, class_root = write_sources(scratch, num_train=num_train, num_val=num_val,
                                               num_per_class=num_per_class, image_size=image_size, seed=seed)
        result = {"scenes": str(out / "scenes")}
        prepare_formats.prepare_jsonl(jsonl_path, out / "scenes", name="demo", workers=workers, num_shards=num_shards,
                                 max_bad_fraction=0.0, overwrite=overwrite, progress=False)
        if num_per_class:
            prepare_formats.prepare_folders(class_root, out / "landcover", name="demo_landcover", split="test",
                                       workers=workers, num_shards=1, max_bad_fraction=0.0, overwrite=overwrite,
                                       progress=False)
            result["landcover"] = str(out / "landcover")
    finally:
        if not keep_sources:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (gets scenes/ and landcover/)")
    parser.add_argument("--num-train", type=int, default=1000, help="training scenes")
    parser.add_argument("--num-val", type=int, default=200, help="validation scenes")
    parser.add_argument("--num-per-class", type=int, default=20, help="land-cover images per class (zero-shot split)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (the tiny model sees 32-64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=2, help="shards per split of the scenes dataset")
    parser.add_argument("--workers", type=int, default=1, help="prepare worker processes")
    parser.add_argument("--keep-sources", action="store_true", help="keep the PNGs + JSONL in OUT/sources")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo dataset in OUT")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = make_demo_data(args.out, num_train=args.num_train, num_val=args.num_val,
                            num_per_class=args.num_per_class, image_size=args.image_size, seed=args.seed,
                            num_shards=args.num_shards, workers=args.workers, keep_sources=args.keep_sources,
                            overwrite=args.overwrite)
    total = args.num_train + args.num_val + args.num_per_class * len(LAND_COVERS)
    print(f"wrote {total} demo images in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
