"""Preparing object-detection annotation layouts: COCO JSON (DIOR, NWPU VHR-10; also COCO-style caption
files) and DOTA text labels (oriented 8-point boxes), each image with its boxes as regions. The shared
options and writing are those of `prepare_formats.py`."""
from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from geoalign_jax.data import record_builder, skip_accounting
from geoalign_jax.data.prepare_formats import PathLike, PrepareOptions, _claim_id, _load_json, _write
from geoalign_jax.data.record_builder import ImageTask, RawRegion
from geoalign_jax.data.skip_accounting import ANNOTATION, ConversionError, Skip, SkipLog
from geoalign_jax.data.writers import ConversionSummary

# ---------------------------------------------------------------------------------------------------------
# COCO JSON (DIOR, NWPU VHR-10 as usually distributed; also COCO-style caption files)


def _coco_box(bbox: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return (x, y, x + w, y + h)


def prepare_coco(
    annotation_files: Mapping[str, PathLike],
    image_dir: PathLike | Mapping[str, PathLike],
    out_dir: PathLike,
    *,
    name: str,
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert COCO JSON files, one per split ({split: path}), with their image folder (one, or per split).

    Annotations with a `bbox` ([x, y, w, h] pixels) become regions whose text is the category name
    (`category_id` = index of the category in the id-sorted `categories`, listed in the manifest's
    `category_names`); annotations with a `caption` become captions. Images without annotations are kept
    (with no regions), so region-free images still count for image-level tasks.
    """
    categories: dict[int, str] = {}
    parsed = {}
    for split, path in sorted(annotation_files.items()):
        data = _load_json(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
            raise ConversionError(f"{path}: expected a COCO JSON object with an 'images' list")
        for category in data.get("categories", []) or []:
            if not isinstance(category, Mapping) or not isinstance(category.get("id"), int) \
                    or not isinstance(category.get("name"), str):
                raise ConversionError(f"{path}: malformed category {category!r} (needs int 'id' and str 'name')")
            known = categories.setdefault(category["id"], category["name"].strip())  # as records store it
            if known != category["name"].strip():
                raise ConversionError(f"{path}: category id {category['id']} is {category['name']!r} here "
                                      f"but {known!r} in another file")
        parsed[split] = (pathlib.Path(path).name, data)
    category_ids = sorted(categories)
    category_index = {category_id: index for index, category_id in enumerate(category_ids)}

    log, tasks, seen_ids = SkipLog(), [], set()
    for split, (json_name, data) in parsed.items():
        root = pathlib.Path(image_dir[split] if isinstance(image_dir, Mapping) else image_dir)
        per_image: dict[Any, dict[str, list]] = {}
        images = []
        for index, image in enumerate(data["images"]):
            if not isinstance(image, Mapping) or not isinstance(image.get("file_name"), str) or "id" not in image:
                log.add_input(Skip(skip_accounting.MALFORMED_ANNOTATION, f"{json_name}:images[{index}]"))
                continue
            images.append(image)
            per_image[image["id"]] = {"regions": [], "captions": []}
        for index, annotation in enumerate(data.get("annotations", []) or []):
            where = f"{json_name}:annotations[{index}]"
            if not isinstance(annotation, Mapping):
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.MALFORMED_ANNOTATION, where, ANNOTATION))
                continue
            target = per_image.get(annotation.get("image_id"))
            if target is None:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.UNKNOWN_IMAGE_ID, where, ANNOTATION))
                continue
            if "caption" in annotation:
                target["captions"].append(annotation["caption"])
            if "bbox" not in annotation:
                continue
            box = _coco_box(annotation["bbox"])
            category_id = annotation.get("category_id")
            if box is None:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.MALFORMED_ANNOTATION, where, ANNOTATION))
            elif category_id not in categories:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.UNKNOWN_CATEGORY, where, ANNOTATION))
            else:
                target["regions"].append(RawRegion(box=box, category=categories[category_id],
                                                   category_id=category_index[category_id], name=where))
        for image in images:
            file_name = image["file_name"]
            if not _claim_id(seen_ids, file_name, file_name, log):
                continue
            size = (image["width"], image["height"]) if isinstance(image.get("width"), int) \
                and isinstance(image.get("height"), int) else None
            found = per_image[image["id"]]
            tasks.append(ImageTask(
                split=split, id=file_name, source=name, name=file_name, image_path=str(root / file_name),
                captions=tuple(found["captions"]), regions=tuple(found["regions"]), expected_size=size,
            ))
    extra = {"category_names": [categories[category_id] for category_id in category_ids],
             "coco_category_ids": category_ids}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare coco", log=log, manifest_extra=extra,
                  **options)


# ---------------------------------------------------------------------------------------------------------
# DOTA text labels (oriented 8-point boxes)


def parse_dota_labels(text: str, file_name: str, *, skip_difficult: bool = False
                      ) -> tuple[list[tuple[tuple[float, float, float, float], str]], list[Skip], int]:
    """Parse one DOTA label file: `x1 y1 x2 y2 x3 y3 x4 y4 category [difficulty]` per object, optionally after
    `imagesource:` / `gsd:` header lines. Each polygon is reduced to its axis-aligned bounding box.

    Returns ([(box, category)], skips for malformed lines, number of object lines seen). The difficulty flag
    is not stored; `skip_difficult` drops objects marked difficult (1) instead, without counting them bad.
    """
    objects, skips, seen = [], [], 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or re.match(r"^(imagesource|gsd)\s*:", stripped, re.IGNORECASE):
            continue
        seen += 1
        fields = stripped.split()
        where = f"{file_name}:{line_number}"
        if len(fields) not in (9, 10):
            skips.append(Skip(skip_accounting.MALFORMED_LINE, where, ANNOTATION))
            continue
        try:
            coordinates = [float(v) for v in fields[:8]]
        except ValueError:
            skips.append(Skip(skip_accounting.MALFORMED_LINE, where, ANNOTATION))
            continue
        if not all(math.isfinite(v) for v in coordinates):
            skips.append(Skip(skip_accounting.MALFORMED_LINE, where, ANNOTATION))
            continue
        if skip_difficult and len(fields) == 10 and fields[9] == "1":
            seen -= 1
            continue
        xs, ys = coordinates[0::2], coordinates[1::2]
        objects.append(((min(xs), min(ys), max(xs), max(ys)), fields[8]))
    return objects, skips, seen


def prepare_dota(
    image_dir: PathLike,
    label_dir: PathLike,
    out_dir: PathLike,
    *,
    name: str = "dota",
    split: str = "train",
    categories: Sequence[str] | None = None,
    skip_difficult: bool = False,
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert DOTA-style `labelTxt/*.txt` files with their images (same stem, any image suffix).

    One record per label file; a label file without an image is a 'missing image', an image without a label
    file is a 'no label file' skip. Category names are the region text; `category_id` indexes `categories`
    (default: the sorted category names found), listed in the manifest's `category_names`. Large scenes are
    stored whole: tile them first (e.g. with the DOTA devkit) if needed.
    """
    image_root, label_root = pathlib.Path(image_dir), pathlib.Path(label_dir)
    if not label_root.is_dir():
        raise ConversionError(f"label folder not found: {label_root}")
    images = {}
    if image_root.is_dir():
        for path in sorted(image_root.iterdir()):
            if path.suffix.lower() in record_builder.IMAGE_SUFFIXES and not path.name.startswith("."):
                images.setdefault(path.stem, path)
    label_files = sorted(p for p in label_root.iterdir() if p.suffix == ".txt" and not p.name.startswith("."))

    log = SkipLog()
    parsed = []
    for label_file in label_files:
        objects, skips, seen = parse_dota_labels(label_file.read_text(encoding="utf-8", errors="replace"),
                                                 label_file.name, skip_difficult=skip_difficult)
        log.annotations_seen += len(skips)  # the kept objects are counted by the worker
        for skip in skips:
            log.add(skip)
        parsed.append((label_file, objects))
    found = sorted({category for _, objects in parsed for _, category in objects})
    category_names = list(categories) if categories is not None else found
    category_index = {category: index for index, category in enumerate(category_names)}

    tasks = []
    for label_file, objects in parsed:
        regions = []
        for number, (box, category) in enumerate(objects):
            if category not in category_index:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.UNKNOWN_CATEGORY, f"{label_file.name} ({category})", ANNOTATION))
                continue
            regions.append(RawRegion(box=box, category=category, category_id=category_index[category],
                                     name=f"{label_file.name} (object {number})"))
        image_path = images.get(label_file.stem)
        tasks.append(ImageTask(
            split=split, id=label_file.stem, source=name,
            name=image_path.name if image_path is not None else f"{label_file.stem} (no image for {label_file.name})",
            image_path=str(image_path) if image_path is not None else None, regions=tuple(regions),
        ))
    labelled = {label_file.stem for label_file in label_files}
    for stem, path in sorted(images.items()):
        if stem not in labelled:
            log.add_input(Skip(skip_accounting.NO_LABEL_FILE, path.name))
    extra = {"category_names": category_names}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare dota", log=log, manifest_extra=extra,
                  **options)


