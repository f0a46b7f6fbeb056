"""Helpers that damage files the way storage and interrupted copies do, for the bad-input tests (not a test
module): a zeroed block in the middle, a truncation, a wrong leading magic; and a small dataset to damage."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np


def zero_block(path: str | os.PathLike, *, size: int = 20_000, at: float = 0.5) -> None:
    """Overwrite `size` bytes with zeros starting at fraction `at` of the file (a flipped / lost block)."""
    length = os.path.getsize(path)
    start = int(length * at)
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\0" * min(size, length - start))


def truncate(path: str | os.PathLike, *, keep: float = 0.5) -> None:
    """Cut the file to fraction `keep` of its length (an interrupted copy or download)."""
    os.truncate(path, int(os.path.getsize(path) * keep))


def wrong_magic(path: str | os.PathLike, *, size: int = 16) -> None:
    """Zero the first `size` bytes (the format's signature)."""
    with open(path, "r+b") as handle:
        handle.write(b"\0" * size)


def unreadable_indices(shard: str | os.PathLike) -> list[int]:
    """Ground truth, read with array_record directly (not through the code under test): the records of
    `shard` whose bytes cannot be read."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(shard))
    bad = []
    try:
        for index in range(reader.num_records()):
            try:
                reader.read([index])
            except RuntimeError:
                bad.append(index)
    finally:
        reader.close()
    return bad


def write_noise_sources(root: pathlib.Path, *, count: int = 40, image_size: int = 48, num_classes: int = 3,
                        split: str = "train", caption: str = "noise picture number") -> pathlib.Path:
    """`count` random-noise PNGs (incompressible, so a zeroed block hits a few records, not all) and a JSONL
    giving each a caption "<caption> <i>", a label and a class name; returns the JSONL path."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index:03d}.png")
        label = index % num_classes
        lines.append(json.dumps({"image": f"images/{index:03d}.png", "id": f"img{index:03d}", "split": split,
                                 "captions": [f"{caption} {index}"], "label": label,
                                 "class_name": f"class {label}"}))
    jsonl = root / "noise.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def make_noise_dataset(root: pathlib.Path, *, count: int = 40, image_size: int = 48, **options) -> pathlib.Path:
    """`write_noise_sources` converted (prepare_jsonl, dataset name "noise") into root/converted."""
    from geoalign_jax.data import prepare_formats

    jsonl = write_noise_sources(root, count=count, image_size=image_size)
    out = root / "converted"
    prepare_formats.prepare_jsonl(jsonl, out, name="noise", progress=False, **options)
    return out
