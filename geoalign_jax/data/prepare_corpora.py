"""Preparation of the seed papers' training corpora as they are published (docs/data_format.md, section 4).

* MGRS-200k (FarSLIP stage 2): one JSON list of images with global captions and `segment` boxes;
* RS5M-style webdataset shards (FarSLIP stage 1 and most RS pretraining corpora): `.tar` files of samples;
* SkyScript-style CSV/TSV files: an image-path column and a caption column.

Like `prepare_formats.py`, these only read the corpus files and turn every image into an `ImageTask`; loading and
checking images, skip accounting, sharding, the manifest and the bad-fraction check are the shared machinery
(`prepare_formats._write` -> `writers.write_dataset`), so every format behaves the same on bad input.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os
import pathlib
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Unpack

from geoalign_jax.data import skip_accounting, writers
from geoalign_jax.data.prepare_formats import PathLike, PrepareOptions, _claim_id, _load_json, _write
from geoalign_jax.data.record_builder import ImageTask, RawRegion
from geoalign_jax.data.skip_accounting import ANNOTATION, ConversionError, Skip, SkipLog
from geoalign_jax.data.writers import ConversionSummary

# Skip reasons of these formats (the shared ones are in skip_accounting.py).
CATEGORY_ID_CONFLICT = "category id names two categories"
NO_IMAGE_IN_SAMPLE = "sample without image"
CAPTION_NOT_UTF8 = "caption is not UTF-8"
UNREADABLE_SHARD = "unreadable shard"

# ---------------------------------------------------------------------------------------------------------
# MGRS-200k JSON

MGRS_SHORT_CAPTION_FIELDS = ("global_caption", "brief_caption")
MGRS_LONG_CAPTION_FIELD = "detailed_caption"
_BOX_KEYS = ("x1", "y1", "x2", "y2")
MGRS_CAPTION_RULES = ("all", "farslip")


def mgrs_scene_captions(item: Mapping[str, Any], rule: str) -> tuple[str, ...]:
    """The short captions of an MGRS item: "all" = its global and brief captions; "farslip" = FarSLIP's one
    scene text, `item.get("global_caption") or item.get("detailed_caption")` (open_clip_train/data.py:93)."""
    if rule == "farslip":
        text = item.get("global_caption") or item.get(MGRS_LONG_CAPTION_FIELD)
        return (text,) if text is not None else ()
    return tuple(item[field] for field in MGRS_SHORT_CAPTION_FIELDS if item.get(field) is not None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def mgrs_box(bbox: Any) -> tuple[tuple[float, float, float, float], tuple[float, float] | None] | None:
    """An MGRS `bbox` -> ((x1, y1, x2, y2) pixels, (W, H) of the image they refer to, or None); None when it is
    malformed. Takes `{x1, y1, x2, y2[, W, H]}`, or a list of 4 or 6 numbers in that order (the order FarSLIP
    reads `bbox.values()` in). A dict with other key names is refused rather than read by position: it could
    be [x, y, w, h]. Degenerate boxes are left to the record builder."""
    if isinstance(bbox, Mapping) and all(key in bbox for key in _BOX_KEYS):
        values = [bbox[key] for key in _BOX_KEYS]
        size = [bbox.get("W"), bbox.get("H")] if "W" in bbox or "H" in bbox else None  # one alone: malformed
    elif isinstance(bbox, (list, tuple)) and len(bbox) in (4, 6):
        values, size = list(bbox[:4]), (list(bbox[4:]) or None)
    else:
        return None
    box = [_number(value) for value in values]
    frame = [_number(value) for value in size] if size is not None else None
    if None in box or (frame is not None and (None in frame or min(frame) <= 0)):
        return None
    return (box[0], box[1], box[2], box[3]), ((frame[0], frame[1]) if frame is not None else None)


def _image_size(path: pathlib.Path) -> tuple[int, int] | None:
    """The pixel size from the image header (no decoding), or None when the file cannot tell: the builder then
    reports the file as missing or broken."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable file is the builder's to report, with its reason
        return None


def _rescale(region: RawRegion, frame: tuple[float, float] | None, size: tuple[int, int] | None) -> RawRegion:
    """A box given in a (W, H) frame, in pixels of the image as stored: unchanged when the sizes agree."""
    if frame is None or size is None or (float(size[0]), float(size[1])) == frame:
        return region
    sx, sy = size[0] / frame[0], size[1] / frame[1]
    x1, y1, x2, y2 = region.box
    return dataclasses.replace(region, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy))


def prepare_mgrs(
    json_path: PathLike,
    image_dir: PathLike,
    out_dir: PathLike,
    *,
    name: str = "mgrs",
    split: str = "train",
    captions: str = "all",
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert an MGRS-200k-style JSON (FarSLIP stage 2) with its image folder.

    Each item: `global_filepath` (relative to `image_dir`); with `captions="all"` `global_caption` and
    `brief_caption` become short captions (one is drawn per step), with `captions="farslip"` the one short
    caption is FarSLIP's scene text, `global_caption` else `detailed_caption` (data.py:93; its `brief_caption`
    line is commented out); `detailed_caption` is the long caption either way. `segment` is a list of
    `{bbox: {x1, y1, x2, y2, W, H}, category, category_id}` (a category region) and/or `cap` (a region caption;
    a segment with both keeps both: FarSLIP's loader uses the caption as its text and leaves it out of the
    category loss, which the transforms reproduce by giving captioned regions category id -1). Boxes are pixels of a W x H image: they are rescaled to the
    stored image's size when it differs, then clipped like every format's. Region `category_id` is the index
    of the published id in the sorted ids (manifest: `category_names` in that order, `mgrs_category_ids`); a
    segment whose id was already seen with another name is dropped ('category id names two categories').
    """
    if captions not in MGRS_CAPTION_RULES:
        raise ConversionError(f"captions must be one of {MGRS_CAPTION_RULES}, got {captions!r}")
    data = _load_json(json_path)
    if not isinstance(data, list):
        raise ConversionError(f"{json_path}: expected an MGRS JSON list of items (global_filepath, segment, ...)")
    json_name = pathlib.Path(json_path).name
    root = pathlib.Path(image_dir)
    log = SkipLog()
    id_names: dict[int, str] = {}
    entries = []
    for index, item in enumerate(data):
        where = f"{json_name}[{index}]"
        segments = (item.get("segment") or []) if isinstance(item, Mapping) else None
        if not isinstance(item, Mapping) or not isinstance(item.get("global_filepath"), str) \
                or not item["global_filepath"].strip() or not isinstance(segments, list):
            log.add_input(Skip(skip_accounting.MALFORMED_ANNOTATION, where))
            continue
        regions = []
        for number, segment in enumerate(segments):
            region_name = f"{where}.segment[{number}]"
            parsed = mgrs_box(segment.get("bbox")) if isinstance(segment, Mapping) else None
            if parsed is None:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.MALFORMED_ANNOTATION, region_name, ANNOTATION))
                continue
            box, frame = parsed
            caption = segment.get("cap")
            category, category_id = segment.get("category"), segment.get("category_id")
            has_category = isinstance(category, str) and bool(category.strip()) \
                and isinstance(category_id, int) and not isinstance(category_id, bool)
            if caption is None and not has_category:
                log.annotations_seen += 1
                log.add(Skip(skip_accounting.MALFORMED_ANNOTATION, f"{region_name} (needs 'cap', or 'category' and an "
                                                           "int 'category_id')", ANNOTATION))
                continue
            if has_category:
                known = id_names.setdefault(category_id, category.strip())
                if known != category.strip():
                    log.annotations_seen += 1
                    log.add(Skip(CATEGORY_ID_CONFLICT, f"{region_name} ({category_id}: {category.strip()!r}, "
                                                       f"earlier {known!r})", ANNOTATION))
                    if caption is None:
                        continue
                    has_category = False  # the caption still makes a region
            # A segment with both keeps both (the data are not thinned); the category term leaves it out
            # (transforms: a captioned region's category id is -1), as FarSLIP's data.py:126-128 does.
            regions.append((RawRegion(box=box, caption=caption, category=category if has_category else None,
                                      category_id=category_id if has_category else -1, name=region_name), frame))
        entries.append((where, item, regions))
    published_ids = sorted(id_names)
    id_index = {category_id: index for index, category_id in enumerate(published_ids)}

    pending, seen_ids = [], set()
    for where, item, regions in entries:
        path = item["global_filepath"]
        if not _claim_id(seen_ids, path, f"{where} ({path})", log):
            continue
        regions = [(dataclasses.replace(region, category_id=id_index[region.category_id])
                    if region.category is not None else region, frame) for region, frame in regions]
        pending.append((where, item, regions))

    def tasks() -> Iterator[ImageTask]:
        # Lazy so that reading each image header (for the W x H rescaling) happens under the progress bar.
        for where, item, regions in pending:
            image_path = root / item["global_filepath"]
            size = _image_size(image_path) if any(frame is not None for _, frame in regions) else None
            yield ImageTask(
                split=split, id=item["global_filepath"], source=name, name=f"{where} ({item['global_filepath']})",
                image_path=str(image_path),
                captions=mgrs_scene_captions(item, captions),
                long_caption=item.get(MGRS_LONG_CAPTION_FIELD),
                regions=tuple(_rescale(region, frame, size) for region, frame in regions), require="text",
            )

    extra = {"category_names": [id_names[category_id] for category_id in published_ids],
             "mgrs_category_ids": published_ids}
    return _write(tasks(), out_dir, name=name, created_by="python -m geoalign_jax.prepare mgrs", log=log,
                  manifest_extra=extra, expected_counts={split: len(pending)}, **options)


# ---------------------------------------------------------------------------------------------------------
# Webdataset .tar shards (RS5M and other pretraining corpora)

#: Member extensions read as the image / caption of a sample, in order of preference. RS5M's shards name them
#: `img_content` and `caption`; most webdatasets use jpg/png/webp and txt.
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "img_content")
WEBDATASET_CAPTION_EXTS = ("txt", "caption")

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as webdataset shard lists use it: `{a,b}` alternatives and `{0000..0031}`
    zero-padded integer ranges, any number of them (innermost first), in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        start, stop = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).lstrip("-").startswith("0") else 0
        step = 1 if stop >= start else -1
        choices = [f"{value:0{width}d}" for value in range(start, stop + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ConversionError(f"shard pattern {pattern!r}: cannot expand {{{body}}} (use {{a,b}} or {{0000..0031}})")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def resolve_shards(patterns: str | Sequence[str]) -> list[pathlib.Path]:
    """Shard paths from patterns with braces and/or glob wildcards, in pattern order (glob matches sorted).
    A named shard that does not exist, or a wildcard that matches nothing, is a ConversionError."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    shards: list[pathlib.Path] = []
    missing = []
    for pattern in patterns:
        for expanded in expand_braces(str(pattern)):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else \
                ([expanded] if os.path.isfile(expanded) else [])
            if not matches:
                missing.append(expanded)
            shards.extend(pathlib.Path(match) for match in matches)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"shard(s) not found: {', '.join(missing[:5])}{more}")
    unique = list(dict.fromkeys(shards))
    if not unique:
        raise ConversionError("no shards given")
    return unique


def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension rule: the key is the path up to the first '.' of the file name, the
    extension (lower-cased) the rest; None for names without one (or hidden files)."""
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _ends_properly(archive: tarfile.TarFile, last: tarfile.TarInfo) -> bool:
    """Whether the zero end-of-archive block follows the last member: tarfile reads an archive cut exactly
    before a member header as complete. Read through `archive.fileobj`, so compressed shards are checked too."""
    archive.fileobj.seek(last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    return archive.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


def _tar_samples(shard: pathlib.Path, read: bool, log: SkipLog | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a shard's samples, grouping consecutive members with the same key as
    webdataset does. With `read=False` the data is not read (counting pass). A shard that stops being readable
    ends there; with a `log`, that is counted as one 'unreadable shard' skip."""
    key, members, last = None, {}, None
    try:
        with tarfile.open(shard, mode="r:*") as archive:
            for info in archive:
                last = info
                if not info.isfile():
                    continue
                parts = _split_member_name(info.name)
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, members
                    key, members = parts[0], {}
                if read:
                    handle = archive.extractfile(info)
                    members[parts[1]] = handle.read() if handle is not None else b""
                else:
                    members[parts[1]] = b""
            if last is not None and not _ends_properly(archive, last):
                raise tarfile.ReadError("no end-of-archive block after the last member (file cut short)")
        if key is not None:
            yield key, members
    except (tarfile.TarError, OSError, EOFError) as error:
        # the sample being read when the damage showed may be incomplete: it is dropped with the rest
        if log is not None:
            log.add_input(Skip(UNREADABLE_SHARD, f"{shard.name} ({error.__class__.__name__}: {error})"))


def prepare_webdataset(
    shards: str | Sequence[str],
    out_dir: PathLike,
    *,
    name: str,
    split: str = "train",
    image_exts: Sequence[str] = WEBDATASET_IMAGE_EXTS,
    caption_exts: Sequence[str] = WEBDATASET_CAPTION_EXTS,
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert webdataset `.tar` shards (RS5M style): samples keyed by file name, each with an image member
    (the first of `image_exts` present) and a caption member (the first of `caption_exts`, UTF-8); other
    members (`json` metadata, ...) are ignored. `shards` are paths or patterns such as
    `{pub11,rs3}-train-{0000..0031}.tar` (braces, then glob wildcards). The record id is `<shard stem>/<key>`.

    Reads each shard twice (a header-only counting pass sizes the output shards and the progress bar, then
    the data pass), holding only a few samples in memory. A sample without an image is skipped ('sample
    without image'), one without a caption member or with a blank caption as 'no captions', and a shard that
    turns out truncated or corrupt keeps the samples before the damage and counts one 'unreadable shard'.
    """
    shard_paths = resolve_shards(shards)
    image_exts = tuple(ext.lower().lstrip(".") for ext in image_exts)
    caption_exts = tuple(ext.lower().lstrip(".") for ext in caption_exts)
    expected = sum(1 for shard in shard_paths for _ in _tar_samples(shard, read=False, log=None))
    log = SkipLog()

    def tasks() -> Iterator[ImageTask]:
        seen_ids: set[str] = set()
        for shard in shard_paths:
            stem = shard.name.split(".tar")[0]
            for key, members in _tar_samples(shard, read=True, log=log):
                record_id = f"{stem}/{key}"
                where = f"{shard.name}:{key}"
                image = next((members[ext] for ext in image_exts if ext in members), None)
                if image is None:
                    log.add_input(Skip(NO_IMAGE_IN_SAMPLE, f"{where} (members: {', '.join(sorted(members))})"))
                    continue
                caption = next((members[ext] for ext in caption_exts if ext in members), None)
                try:
                    captions = () if caption is None else (caption.decode("utf-8"),)
                except UnicodeDecodeError:
                    log.add_input(Skip(CAPTION_NOT_UTF8, where))
                    continue
                if not _claim_id(seen_ids, record_id, where, log):
                    continue
                yield ImageTask(split=split, id=record_id, source=name, name=where, image_bytes=image,
                                captions=captions, require="captions")

    return _write(tasks(), out_dir, name=name, created_by="python -m geoalign_jax.prepare webdataset", log=log,
                  manifest_extra={"shards_read": [shard.name for shard in shard_paths]},
                  expected_counts={split: expected}, **options)


# ---------------------------------------------------------------------------------------------------------
# CSV / TSV (SkyScript)


def _separator(path: pathlib.Path, separator: str | None) -> str:
    if separator is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
    separator = named.get(separator.lower(), separator)
    if len(separator) != 1:
        raise ConversionError(f"separator must be one character (or tab/comma/semicolon/pipe), got {separator!r}")
    return separator


def _csv_rows(path: pathlib.Path, separator: str, columns: Sequence[str]) -> Iterator[tuple[int, dict | None]]:
    """(line number, row) per data row; row None when the row has a different number of fields than the
    header. A header without one of `columns` is a ConversionError listing the header."""
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise ConversionError(f"CSV file not found: {path}") from None
    except OSError as error:
        raise ConversionError(f"CSV file {path} is unreadable: {error}") from None
    with handle:
        reader = csv.DictReader(handle, delimiter=separator, restkey=None)
        try:
            header = reader.fieldnames or []
            absent = [column for column in columns if column not in header]
            if absent:
                raise ConversionError(f"{path}: no column {', '.join(map(repr, absent))} (header: {header}; set "
                                      "--image-column / --caption-column / --separator)")
            for row in reader:
                complete = None not in row and None not in row.values()
                yield reader.line_num, (row if complete else None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise ConversionError(f"{path}:{reader.line_num}: unreadable CSV ({error})") from None


def prepare_csv(
    csv_files: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
    out_dir: PathLike,
    *,
    name: str,
    image_column: str = "filepath",
    caption_column: str = "title",
    separator: str | None = None,
    image_root: PathLike | None = None,
    split: str = "train",
    **options: Unpack[PrepareOptions],
) -> ConversionSummary:
    """Convert SkyScript-style CSV/TSV files: one row per (image, caption) pair, with a header naming the
    columns. `csv_files` is one file or a list (all in `split`), or {split: file} (e.g. the training CSV and
    the retrieval validation CSV). `separator` defaults to tab for `.tsv`, else comma (also 'tab', ...).

    Rows of the same image (within a split) become one record with all their captions, in file order, as the
    retrieval protocols group them; the same image in two splits is a 'duplicate id'. Image paths are relative
    to `image_root` (default: the CSV file's folder); the record id is the path as written. A row with a
    missing or extra field or an empty image path is a 'malformed line' (`file.csv:LINE`); blank captions are
    dropped and counted, and an image left without captions is skipped as 'no captions'.
    """
    if isinstance(csv_files, Mapping):
        files = [(split_name, pathlib.Path(path)) for split_name, path in csv_files.items()]
    else:
        paths = [csv_files] if isinstance(csv_files, (str, os.PathLike)) else list(csv_files)
        files = [(split, pathlib.Path(path)) for path in paths]
    log, seen_ids = SkipLog(), set()
    tasks: list[ImageTask] = []
    for split_name, path in files:
        root = pathlib.Path(image_root) if image_root is not None else path.parent
        grouped: dict[str, tuple[str, list[str]]] = {}
        for line, row in _csv_rows(path, _separator(path, separator), (image_column, caption_column)):
            where = f"{path.name}:{line}"
            image = row[image_column].strip() if row is not None else ""
            if not image:
                reason = "empty image path" if row is not None else "fields differ from the header"
                log.add_input(Skip(skip_accounting.MALFORMED_LINE, f"{where} ({reason})"))
                continue
            if image in grouped:
                grouped[image][1].append(row[caption_column])
            else:
                grouped[image] = (where, [row[caption_column]])
        for image, (where, captions) in grouped.items():
            if not _claim_id(seen_ids, image, f"{where} ({image})", log):
                continue
            tasks.append(ImageTask(split=split_name, id=image, source=name, name=f"{where} ({image})",
                                   image_path=str(root / image), captions=tuple(captions), require="captions"))
    extra = {"csv_columns": {"image": image_column, "caption": caption_column}}
    return _write(tasks, out_dir, name=name, created_by="python -m geoalign_jax.prepare csv", log=log,
                  manifest_extra=extra, **options)
