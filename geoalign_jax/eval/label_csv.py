"""Evaluation sets read from CSV files as SkyScript / FarSLIP ship them, without converting to records.

Zero-shot classification (``load_label_csv``): a CSV with an image-path column (``filepath``) and a label
column (``label``), plus ``classnames.txt`` (one class per line, in label order), as FarSLIP's
``open_clip_train/benchmark_dataset_info.py`` describes its eight benchmarks. A label is an integer index
into the class list, or a class name from it (FarSLIP's reader accepts both); a row with an empty label is
left out and counted, as FarSLIP's ``df[label].isnull()`` filter does. Image paths are relative to an image
root (FarSLIP: the benchmark root, not the CSV's folder).

Retrieval (``load_caption_csv``): ``filepath`` and a caption column (``title``; SkyScript retrieval:
``title_multi_objects``), one row per (image, caption) pair; rows of the same path are one image with all
its captions, and the image's identity is its path (FarSLIP groups by ``filepath``).

Bad input: a missing column, a class file with blank or repeated names, a label outside the class list
or not in it are EvalDataErrors naming the file and line; an image file that does not exist is left out,
counted (``missing_image_files``) and logged with its path.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import numpy as np

from geoalign_jax.eval import datasets

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".tsv")
MISSING_IMAGE_FILES = "missing_image_files"
_LOGGED_MISSING = 3  # missing images named in the log per file; all are counted


def _log_missing(count: int, where: str, image: pathlib.Path) -> None:
    if count <= _LOGGED_MISSING:
        log.warning("%s: image file not found, left out: %s%s", where, image,
                    " (further missing images are counted, not logged)" if count == _LOGGED_MISSING else "")


def is_csv_file(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return path.is_file() and path.suffix.lower() in CSV_SUFFIXES


def split_of_file(path: str | pathlib.Path) -> str | None:
    """The split a benchmark CSV's name says it holds (``data.prepare_csv.split_of_file``)."""
    from geoalign_jax.data import prepare_csv

    return prepare_csv.split_of_file(path)


def read_class_names(path: str | pathlib.Path) -> list[str]:
    """``classnames.txt`` read by ``data.prepare_csv.read_class_lines``; its errors as EvalDataErrors."""
    from geoalign_jax.data import prepare_csv, skip_accounting

    try:
        return prepare_csv.read_class_lines(path)
    except skip_accounting.ConversionError as error:
        raise datasets.EvalDataError(str(error)) from None


def _rows(path: pathlib.Path, separator: str, columns: Sequence[str]):
    """(line, row) per data row, with the CSV reader the converters use (``data.corpora``); its errors
    become EvalDataErrors. A row whose field count differs from the header is an error naming the line."""
    from geoalign_jax.data import prepare_corpora as corpora, skip_accounting

    try:
        for line, row in corpora._csv_rows(path, separator, columns):
            if row is None:
                raise datasets.EvalDataError(f"{path}:{line}: the row's fields differ from the header")
            yield line, row
    except skip_accounting.ConversionError as error:
        raise datasets.EvalDataError(str(error)) from None


def _label_index(value: str, class_names: Sequence[str], where: str) -> int:
    from geoalign_jax.data import prepare_csv

    try:
        return prepare_csv.parse_label(value, class_names)
    except ValueError as error:
        raise datasets.EvalDataError(f"{where}: {error}") from None


def load_label_csv(csv_path: str | pathlib.Path, *, class_names: Sequence[str] | str | pathlib.Path,
                   image_root: str | pathlib.Path | None = None, limit: int | None = None,
                   separator: str = ",", image_column: str = "filepath", label_column: str = "label",
                   ) -> datasets.ClassificationSet:
    """A zero-shot set from a label-column CSV (see the module docstring). ``class_names``: the list, or
    the path of a ``classnames.txt``. The names are the class ids in results and, verbatim, the words put
    into the prompt templates (as FarSLIP does). ``limit``: the first N images taken round-robin over classes.
    """
    path = pathlib.Path(csv_path)
    root = pathlib.Path(image_root) if image_root is not None else path.parent
    names = read_class_names(class_names) if isinstance(class_names, (str, pathlib.Path)) else list(class_names)
    paths, labels, skipped = [], [], {"unlabelled": 0, MISSING_IMAGE_FILES: 0}
    for line, row in _rows(path, separator, (image_column, label_column)):
        where = f"{path}:{line}"
        if not row[label_column].strip():
            skipped["unlabelled"] += 1
            continue
        label = _label_index(row[label_column], names, where)
        relative = row[image_column].strip()
        if not relative:
            raise datasets.EvalDataError(f"{where}: empty {image_column!r}")
        image = root / relative
        if not image.is_file():
            skipped[MISSING_IMAGE_FILES] += 1
            _log_missing(skipped[MISSING_IMAGE_FILES], where, image)
            continue
        paths.append(image)
        labels.append(label)
    if not paths:
        raise datasets.EvalDataError(f"{path}: no labelled rows with an existing image file (image root {root})")
    if limit is not None:
        paths, labels = datasets._stratified_head(paths, labels, limit)
    return datasets.ClassificationSet(
        datasets.FolderImages(paths), np.asarray(labels, np.int64), list(names), list(names),
        {reason: count for reason, count in skipped.items() if count},
        f"{path} ({len(paths)} images, {len(names)} classes, image root {root})")


def load_caption_csv(csv_path: str | pathlib.Path, *, image_root: str | pathlib.Path | None = None,
                     caption_column: str = "title", limit: int | None = None, separator: str = ",",
                     image_column: str = "filepath") -> datasets.RetrievalSet:
    """A retrieval set from an (image, caption) pair CSV; ``limit``: the first N images (in file order)."""
    path = pathlib.Path(csv_path)
    root = pathlib.Path(image_root) if image_root is not None else path.parent
    grouped: dict[str, list[str]] = {}
    skipped = {MISSING_IMAGE_FILES: 0}
    missing: set[str] = set()
    for line, row in _rows(path, separator, (image_column, caption_column)):
        relative = row[image_column].strip()
        if not relative:
            raise datasets.EvalDataError(f"{path}:{line}: empty {image_column!r}")
        if relative in missing:
            continue
        if relative not in grouped:
            if limit is not None and len(grouped) >= limit:
                continue
            if not (root / relative).is_file():
                missing.add(relative)
                skipped[MISSING_IMAGE_FILES] += 1
                _log_missing(skipped[MISSING_IMAGE_FILES], f"{path}:{line}", root / relative)
                continue
            grouped[relative] = []
        grouped[relative].append(row[caption_column])
    if not grouped:
        raise datasets.EvalDataError(f"{path}: no rows with an existing image file (image root {root})")
    keys = list(grouped)
    return datasets.RetrievalSet(
        datasets.FolderImages([root / key for key in keys]), keys, [grouped[key] for key in keys],
        {reason: count for reason, count in skipped.items() if count},
        f"{path} ({len(keys)} images, {sum(map(len, grouped.values()))} captions, column {caption_column!r}, "
        f"image root {root})")
