"""Label-column CSVs (SkyScript / FarSLIP zero-shot benchmarks) converted to records, and their shared rules.

A benchmark CSV has an image-path column (``filepath``) and a label column (``label``), one row per image,
with a ``classnames.txt`` listing the classes one per line in label order. A label is an index into that
list or one of its names (FarSLIP's reader accepts both). ``read_class_lines`` and ``parse_label`` are the
one reading of these files: ``eval.label_csv`` evaluates the CSV as it is, ``prepare_label_csv`` writes
records (``python -m geoalign_jax.prepare labels-csv``) for users who want shards.
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import Unpack

from geoalign_jax.data import skip_accounting
from geoalign_jax.data.prepare_formats import PathLike, PrepareOptions, _claim_id, _write, readable_class_name
from geoalign_jax.data.record_builder import ImageTask
from geoalign_jax.data.skip_accounting import ConversionError, Skip, SkipLog
from geoalign_jax.data.writers import ConversionSummary

_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(train|val|validation|test)(?:[_\-.]|$)", re.IGNORECASE)


def split_of_file(path: PathLike) -> str | None:
    """The split a benchmark CSV's name says it holds: ``aid_img_txt_pairs_test.csv`` -> "test",
    ``img_txt_pairs_train.csv`` -> "train"; None when the name says none."""
    found = _SPLIT_IN_NAME.findall(pathlib.Path(path).stem)
    return found[-1].lower() if found else None


def read_class_lines(path: PathLike) -> list[str]:
    """``classnames.txt``: one class per line, stripped, in label order. Trailing blank lines are ignored;
    a blank line between names or a repeated name is a ConversionError naming the line (labels index lines)."""
    path = pathlib.Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ConversionError(f"class list not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"class list {path} is unreadable: {error}") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ConversionError(f"{path}: no class names")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name:
            raise ConversionError(f"{path}:{number}: blank line between class names (labels index lines)")
        if name in seen:
            raise ConversionError(f"{path}:{number}: class {name!r} repeats line {seen[name]}")
        seen[name] = number
    return names


def parse_label(value: str, class_names: Sequence[str]) -> int:
    """A label cell -> class index: an integer in 0..C-1 or a name of the list; ValueError saying why not."""
    text = value.strip()
    if _INTEGER.fullmatch(text):
        index = int(float(text))
        if not 0 <= index < len(class_names):
            raise ValueError(f"label {index} is outside the {len(class_names)} classes of the class list")
        return index
    try:
        return list(class_names).index(text)
    except ValueError:
        raise ValueError(f"label {text!r} is neither a class index nor a name in the class list") from None


def prepare_label_csv(
    csv_file: PathLike,
    classnames: PathLike,
    out_dir: PathLike,
    *,
    name: str,
    image_root: PathLike | None = None,
    split: str | None = None,
    separator: str | None = None,
    image_column: str = "filepath",
    label_column: str = "label",
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert a label-column CSV with its class list into one split of classification records.

    ``split`` defaults to what the file name says (``*_test.csv`` -> test), else "test". Image paths are
    relative to ``image_root`` (default: the CSV's folder; FarSLIP's are relative to the benchmark root).
    ``label`` is the class index, ``class_name`` the readable name; the manifest lists ``raw_class_names``
    (the lines of the class list) and ``class_names`` (readable). A row with an empty label or a label
    outside the list, a row whose fields differ from the header, or an empty image path is a counted
    'malformed line' naming ``file.csv:LINE``; the same image twice is a 'duplicate id'.
    """
    from geoalign_jax.data import prepare_corpora as corpora

    path = pathlib.Path(csv_file)
    names = read_class_lines(classnames)
    root = pathlib.Path(image_root) if image_root is not None else path.parent
    chosen = split or split_of_file(path) or "test"
    readable = [readable_class_name(class_name) for class_name in names]
    log, seen_ids, tasks = SkipLog(), set(), []
    for line, row in corpora._csv_rows(path, corpora._separator(path, separator), (image_column, label_column)):
        where = f"{path.name}:{line}"
        image = row[image_column].strip() if row is not None else ""
        if row is None or not image:
            why = "fields differ from the header" if row is None else f"empty {image_column!r}"
            log.add_input(Skip(skip_accounting.MALFORMED_LINE, f"{where} ({why})"))
            continue
        try:
            label = parse_label(row[label_column], names)
        except ValueError as error:
            log.add_input(Skip(skip_accounting.MALFORMED_LINE, f"{where} ({error})"))
            continue
        if not _claim_id(seen_ids, image, f"{where} ({image})", log):
            continue
        tasks.append(ImageTask(split=chosen, id=image, source=name, name=f"{where} ({image})",
                               image_path=str(root / image), label=label, class_name=readable[label]))
    extra = {"class_names": readable, "raw_class_names": names,
             "csv_columns": {"image": image_column, "label": label_column}}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare labels-csv", log=log,
                  manifest_extra=extra, **options)
