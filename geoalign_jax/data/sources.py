"""Where records come from: prepared shards (manifest + ArrayRecord files) and TFDS array_record datasets.

`RecordSource` is a grain random-access data source (`__len__`, `__getitem__`) over the shards of one split;
every record it returns has been checked by `records.decode_record`, and an error names the shard file and
the record's index inside it, so a damaged or foreign shard is found without bisecting a training run.

Damaged files are told apart at two levels. A shard whose index cannot be read (truncated footer, not an
ArrayRecord file, missing) is refused when the source is built, naming the shard and the `prepare` command that
rebuilds it. A single record whose bytes cannot be read (a chunk hash mismatch from a zeroed or flipped
block) raises `RecordReadError`, or, with `unreadable="mark"` (the training pipeline), comes back as an
`UnreadableRecord` for the caller to skip and count: one bad block must not stop a week-long run.
Every location may also be `gs://` (data/filesystem.py); a storage failure there is never taken for a bad record.
"""
from __future__ import annotations

import bisect
import dataclasses
import io
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, SupportsIndex

from geoalign_jax.data import filesystem, glob_check, records
from geoalign_jax.error_text import one_line

MANIFEST_NAME = "manifest.json"
#: A shard file's base name: `<name>-<split>-NNNNN-of-NNNNN.array_record`. The split is the last "-" field
#: before the numbering (writers refuse split names containing "-"), so dataset names may contain "-".
_SHARD_PATTERN = re.compile(r"^(?P<name>.+)-(?P<split>[^-]+)-\d{5}-of-\d{5}\.array_record$")


def parse_shard_name(path: str | os.PathLike) -> tuple[str, str] | None:
    """(dataset name, split) of a shard path named `<name>-<split>-NNNNN-of-NNNNN.array_record`, else None."""
    match = _SHARD_PATTERN.match(os.path.basename(os.fspath(path)))
    return (match.group("name"), match.group("split")) if match else None


class SourceError(ValueError):
    """A dataset folder, manifest, split or shard that cannot be used; the message names it."""


class RecordReadError(records.RecordError):
    """The bytes of one record cannot be read from its shard (damaged chunk, short read); names shard + index."""


@dataclasses.dataclass(frozen=True)
class UnreadableRecord:
    """What a source opened with `unreadable="mark"` returns for a record it cannot read, instead of raising."""

    where: str  # "<shard path> record <index in shard>"
    reason: str


def rebuild_hint(shard: str | os.PathLike) -> str:
    """How to get a good copy of a damaged shard: copy it again, or rerun the `prepare` command named by the manifest
    beside it (`created_by`) with --overwrite."""
    folder = filesystem.dirname(filesystem.absolute(os.fspath(shard)))
    converter = "python -m geoalign_jax.prepare <format>"
    try:
        created_by = json.loads(filesystem.read_bytes(filesystem.join(folder, MANIFEST_NAME))).get("created_by")
        if isinstance(created_by, str) and created_by.strip():
            converter = created_by.strip()
            if converter.endswith(".py"):  # manifests written before the prepare CLI name the script
                converter = f"python {converter}"
    except (OSError, ValueError, AttributeError):
        pass  # bare shards: the generic name
    return (f"copy the shard again from where it came from, or rebuild the dataset: "
            f"{converter} ... --out {folder} --overwrite")


def check_shard(path: str | os.PathLike) -> int:
    """Records in one shard, read from its index (footer); SourceError naming the shard, what is wrong and
    how to rebuild it when the file is missing, truncated or not an ArrayRecord file."""
    path = os.fspath(path)
    if not _isfile(path):
        raise SourceError(f"shard {path} is missing; {rebuild_hint(path)}")
    problem = None
    try:
        reader = _open_reader(path)
    except Exception as error:  # noqa: BLE001 - riegeli raises RuntimeError / OSError / ValueError
        problem = one_line(error, limit=None)
    else:
        ok = reader.ok()
        count = int(reader.num_records()) if ok else 0
        try:
            reader.close()  # a reader that failed to open reports why only when closed
        except Exception as error:  # noqa: BLE001
            problem = one_line(error, limit=None)
        if ok and problem is None:
            return count
    raise SourceError(f"shard {path} cannot be opened (truncated, damaged or not an ArrayRecord file: "
                      f"{problem or 'unreadable index'}); {rebuild_hint(path)}")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Load and check `<directory>/manifest.json` (format name and version, splits with counts and shards)."""
    path = filesystem.join(os.fspath(directory), MANIFEST_NAME)
    try:
        manifest = json.loads(filesystem.read_bytes(path))
    except FileNotFoundError:
        raise SourceError(f"no {MANIFEST_NAME} in {directory} (was it written by python -m geoalign_jax.prepare?)") \
            from None
    except filesystem.StorageError as error:  # refused or still failing: the storage's fault, not the JSON's
        raise SourceError(str(error)) from None
    except (OSError, ValueError) as error:
        raise SourceError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != records.FORMAT_NAME:
        raise SourceError(f"{path}: not a {records.FORMAT_NAME} manifest")
    if manifest.get("version") != records.FORMAT_VERSION:
        raise SourceError(f"{path}: format version {manifest.get('version')!r}, this reader reads version "
                          f"{records.FORMAT_VERSION}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("count"), int) and isinstance(s.get("shards"), list)
            for s in splits.values()):
        raise SourceError(f"{path}: 'splits' must map split names to {{'count': int, 'shards': [paths]}}")
    return manifest


def group_by_dataset(paths: Sequence[str | os.PathLike]) -> dict[tuple[str, str], list[str]]:
    """Shard paths grouped by the dataset they belong to: (folder, dataset name from the shard name), in first-
    seen order. A file not named like a shard is its own group (its name is the file name)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path in map(os.fspath, paths):
        parsed = parse_shard_name(path)
        key = (filesystem.dirname(filesystem.absolute(path)), parsed[0] if parsed else os.path.basename(path))
        groups.setdefault(key, []).append(path)
    return groups


def _contained_shard(entry: Any, manifest_path: str) -> str:
    """A manifest's shard entry, refused unless it is a relative path inside the manifest's folder: a shared
    or downloaded manifest must not make the reader open arbitrary files ("/etc/...", "../../...")."""
    if not isinstance(entry, str) or not entry:
        raise SourceError(f"{manifest_path}: shard entry {entry!r} is not a file name")
    normalised = os.path.normpath(entry)
    if os.path.isabs(entry) or normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise SourceError(f"{manifest_path}: shard entry {entry!r} points outside the dataset folder "
                          "(entries must be relative paths inside it)")
    return entry


def _open_reader(path: str) -> Any:
    """An ArrayRecordReader; in a bucket, opening is retried on transient errors (`filesystem.retry`)."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not filesystem.is_gcs(path):
        return ArrayRecordReader(path)

    def open_once() -> Any:
        reader = ArrayRecordReader(path)
        if not reader.ok():  # a failed open does not raise: close() raises why, which `retry` can classify
            reader.close()
        return reader

    filesystem.configure()
    return filesystem.retry(open_once, what=path)


def _isfile(location: str) -> bool:
    """`filesystem.isfile`, a refused permission or an outage as a SourceError naming the object."""
    try:
        return filesystem.isfile(location)
    except filesystem.StorageError as error:
        raise SourceError(str(error)) from None


def _missing(paths: Sequence[str]) -> list[str]:
    try:
        return filesystem.missing_files(paths)
    except filesystem.StorageError as error:
        raise SourceError(str(error)) from None


def _glob(pattern: str) -> list[str]:
    try:
        return filesystem.glob(pattern)
    except filesystem.StorageError as error:
        raise SourceError(str(error)) from None


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def shard_paths(dir_or_glob: str | os.PathLike, split: str) -> list[str]:
    """The shard files of `split`: from a prepared folder's manifest, or from a glob of shard files (filtered
    by the `<name>-<split>-NNNNN-of-NNNNN.array_record` naming). Raises SourceError naming what is missing."""
    location = os.fspath(dir_or_glob)
    if _is_glob(location):
        matches = _glob(location)
        paths = [p for p in matches if (parsed := parse_shard_name(p)) is not None and parsed[1] == split]
        if not paths:
            raise SourceError(f"no shards of split {split!r} match {location} ({len(matches)} files matched the glob)")
        if problem := glob_check.mixed_dataset_problem(paths, location, read_manifest, MANIFEST_NAME):
            raise SourceError(problem)  # a folder `prepare` is writing, or shards left from another run
        return paths
    if _isfile(location):
        return [location]
    manifest = read_manifest(location)
    manifest_path = filesystem.join(location, MANIFEST_NAME)
    if split not in manifest["splits"]:
        raise SourceError(f"split {split!r} not in {manifest_path} (splits: {sorted(manifest['splits'])})")
    paths = [filesystem.join(location, _contained_shard(shard, manifest_path))
             for shard in manifest["splits"][split]["shards"]]
    missing = _missing(paths)
    if missing:
        raise SourceError(f"shard files listed in the manifest are missing: {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}; {rebuild_hint(missing[0])}")
    return paths


def _shard_record_count(path: str) -> int:
    """Records in one shard, from its index (the reader is closed again at once)."""
    reader = _open_reader(path)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class RecordSource:
    """grain random-access source over ArrayRecord shards: decoded record dicts, or raw bytes with `raw=True`.

    Built on `grain.sources.ArrayRecordDataSource` (which needs shards written with group_size:1, as
    `prepare` does). Every shard's index is read when the source is built, so a shard that cannot be opened
    fails here (SourceError naming it), before anything is compiled or trained. A record that cannot be read
    later raises `RecordReadError` (`unreadable="raise"`) or is returned as an `UnreadableRecord`
    (`unreadable="mark"`). Picklable, so grain worker processes can each open their own readers.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, raw: bool = False,
                 unreadable: Literal["raise", "mark"] = "raise"):
        import grain

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise SourceError("RecordSource needs at least one shard path")
        if unreadable not in ("raise", "mark"):
            raise ValueError(f"unreadable must be 'raise' or 'mark', got {unreadable!r}")
        missing = _missing(self._paths)
        if missing:
            raise SourceError(f"shard files not found: {missing[:5]}; {rebuild_hint(missing[0])}")
        self._raw = raw
        self._unreadable = unreadable
        self._remote = any(filesystem.is_gcs(p) for p in self._paths)
        if self._remote:
            filesystem.configure()  # ArrayRecord's own GCS reader reads the records (see data/filesystem.py)
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        except Exception as error:  # noqa: BLE001 - grain opens every shard at once and does not say which failed
            for path in self._paths:
                check_shard(path)  # raises naming the first bad shard
            raise SourceError(f"cannot open the shards {self._paths[:3]}{' ...' if len(self._paths) > 3 else ''}: "
                              f"{one_line(error, limit=None)}") from None
        self._prefix_sums: list[int] | None = None
        self._locate_failed = False

    @classmethod
    def from_dir(cls, dir_or_glob: str | os.PathLike, split: str, *, raw: bool = False,
                 unreadable: Literal["raise", "mark"] = "raise") -> "RecordSource":
        """The shards of `split` in a prepared folder (or a glob), see `shard_paths`."""
        return cls(shard_paths(dir_or_glob, split), raw=raw, unreadable=unreadable)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"RecordSource({len(self._paths)} shards, {len(self)} records, raw={self._raw})"

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, index inside that shard) of a global record index, for error messages."""
        if self._prefix_sums is None:
            self._prefix_sums = list(itertools.accumulate(_shard_record_count(p) for p in self._paths))
        shard = bisect.bisect_right(self._prefix_sums, index)
        start = self._prefix_sums[shard - 1] if shard else 0
        return self._paths[shard], index - start

    def _where(self, index: int) -> tuple[str | None, str]:
        """(shard path or None, "<shard path> record <index in shard>") for messages; never raises, since it
        describes records of shards that may be damaged."""
        if not self._locate_failed:
            try:
                path, local = self.locate(index)
                return path, f"{path} record {local}"
            except Exception:  # noqa: BLE001 - a shard changed since the source was built; do not retry per record
                self._locate_failed = True
        return None, f"record {index} of the shards {self._paths[:3]}{' ...' if len(self._paths) > 3 else ''}"

    def _check_index(self, record_key: SupportsIndex) -> int:
        index = record_key.__index__()
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return index

    def _decode(self, data: bytes, index: int) -> Any:
        if self._raw:
            return data
        try:
            return records.decode_record(data)
        except records.RecordError as error:
            raise records.RecordError(f"{self._where(index)[1]}: {error}") from None

    def _read(self, index: int) -> bytes | UnreadableRecord:
        """One record's bytes; a read failure (riegeli raises RuntimeError, the OS OSError) is named here."""
        try:
            if not self._remote:
                return self._source[index]
            return filesystem.retry(lambda: self._source[index], what=lambda: self._where(index)[1], kind="record")
        except Exception as error:  # noqa: BLE001 - every way a read of damaged bytes fails
            path, where = self._where(index)
            reason = f"cannot be read ({one_line(error, limit=None)})"
            if self._remote and filesystem.error_kind(error) in ("transient", "missing", "denied"):
                # the storage failed, not the record: stopping with its name beats skipping good data
                raise RecordReadError(f"{where}: {reason}; the storage failed after "
                                      f"{filesystem.MAX_ATTEMPTS} attempts") from None
            if self._unreadable == "mark":
                return UnreadableRecord(where=where, reason=reason)
            raise RecordReadError(f"{where}: {reason}; {rebuild_hint(path or self._paths[0])}") from None

    def _output(self, data: bytes | UnreadableRecord, index: int) -> Any:
        return data if isinstance(data, UnreadableRecord) else self._decode(data, index)

    def __getitem__(self, record_key: SupportsIndex) -> Any:
        index = self._check_index(record_key)
        return self._output(self._read(index), index)

    def __getitems__(self, record_keys: Sequence[SupportsIndex]) -> list[Any]:
        indices = [self._check_index(key) for key in record_keys]
        try:
            batch: Sequence[bytes | UnreadableRecord] = self._source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - one bad record fails the whole batched read: read one by one,
            batch = [self._read(index) for index in indices]  # so its neighbours are not lost with it
        return [self._output(data, index) for data, index in zip(batch, indices)]


# ---------------------------------------------------------------------------------------------------------
# TFDS datasets prepared in array_record format

#: Our field -> TFDS feature name (dotted for nested features); None = the dataset has no such feature.
DEFAULT_TFDS_MAPPING: dict[str, str | None] = {
    "image": "image",
    "label": "label",
    "captions": None,
    "long_caption": None,
    "hard_negatives": None,
    "id": None,
}


def _lookup(example: Mapping[str, Any], dotted: str) -> Any:
    value: Any = example
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _as_text(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


def _as_text_list(value: Any) -> list[str]:
    if isinstance(value, (str, bytes, bytearray)) or getattr(value, "shape", None) == ():
        return [_as_text(value)]
    return [_as_text(v) for v in value]


def _as_image_bytes(value: Any) -> bytes:
    """Encoded bytes as they are; a decoded uint8 array ([H, W], [H, W, 1|3|4]) is encoded losslessly as PNG."""
    import numpy as np

    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"image feature is neither encoded bytes nor a uint8 image array "
                         f"(dtype {array.dtype}, shape {array.shape})")
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def map_tfds_example(
    example: Mapping[str, Any], mapping: Mapping[str, str | None], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """A TFDS example (numpy-decoded) as the fields of our example dict: `image` bytes, `captions`,
    `long_caption`, `hard_negatives`, `label`, `class_name`, `id`. A mapped feature that is absent raises
    KeyError naming it, so a wrong mapping fails at the first example instead of yielding empty records."""
    mapped: dict[str, Any] = {"captions": [], "hard_negatives": [], "long_caption": None, "label": -1,
                              "class_name": None, "id": None}
    unknown = sorted(set(mapping) - set(DEFAULT_TFDS_MAPPING))
    if unknown:
        raise KeyError(f"unknown fields in TFDS mapping: {unknown} (allowed: {sorted(DEFAULT_TFDS_MAPPING)})")
    feature = mapping.get("image")
    if not feature:
        raise KeyError("the TFDS mapping needs an 'image' feature")
    mapped["image"] = _as_image_bytes(_lookup(example, feature))
    for field in ("captions", "hard_negatives"):
        if mapping.get(field):
            mapped[field] = _as_text_list(_lookup(example, mapping[field]))
    for field in ("long_caption", "id"):
        if mapping.get(field):
            mapped[field] = _as_text(_lookup(example, mapping[field]))
    if mapping.get("label"):
        label = int(_lookup(example, mapping["label"]))
        mapped["label"] = label
        if class_names is not None and 0 <= label < len(class_names):
            mapped["class_name"] = str(class_names[label])
    return mapped


class TfdsSource:
    """A TFDS array_record split as a random-access source of mapped example dicts (see `map_tfds_example`).
    Image features are read undecoded (`tfds.decode.SkipDecoding`), so the original encoded bytes are kept."""

    def __init__(self, data_source: Any, mapping: Mapping[str, str | None], class_names: Sequence[str] | None):
        self._data_source = data_source
        self.mapping = dict(mapping)
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
        return map_tfds_example(self._data_source[record_key.__index__()], self.mapping, self.class_names)


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    mapping: Mapping[str, str | None] | None = None,
) -> TfdsSource:
    """Open split `split` of the TFDS dataset `name` that the user already prepared in array_record format
    (`tfds.data_source`, no TensorFlow needed, never downloads). `mapping` overrides DEFAULT_TFDS_MAPPING."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "reading TFDS datasets needs tensorflow-datasets (pip install tensorflow-datasets importlib_resources; "
            f"TensorFlow itself is not needed): {error}"
        ) from None
    full_mapping = dict(DEFAULT_TFDS_MAPPING)
    full_mapping.update(mapping or {})
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir is not None else None)
    except Exception as error:  # tfds raises DatasetNotFoundError and others
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"TFDS dataset {name!r} not found in {data_dir or 'the default data dir'}: {first_line}") \
            from None
    if not builder.is_prepared():
        raise SourceError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it first "
                          "(this tool never downloads)")
    features = builder.info.features
    if full_mapping.get("label") and full_mapping["label"] == DEFAULT_TFDS_MAPPING["label"] \
            and full_mapping["label"] not in features:
        full_mapping["label"] = None  # the default mapping on a dataset without labels
    absent = sorted(f"{field}={feature}" for field, feature in full_mapping.items()
                    if feature and feature.split(".")[0] not in features)
    if absent:
        raise SourceError(f"TFDS dataset {name!r} has no feature for the mapping {absent} "
                          f"(its features: {sorted(features.keys())})")
    decoders = {}
    image_feature = full_mapping["image"]
    if image_feature and "." not in image_feature and image_feature in features \
            and isinstance(features[image_feature], tfds.features.Image):
        decoders[image_feature] = tfds.decode.SkipDecoding()
    class_names = None
    label_feature = full_mapping.get("label")
    if label_feature and label_feature in features and isinstance(features[label_feature], tfds.features.ClassLabel):
        class_names = list(features[label_feature].names)
    try:
        data_source = builder.as_data_source(split=split, decoders=decoders or None)
    except NotImplementedError as error:
        raise SourceError(f"TFDS dataset {name!r} was not prepared in array_record format: {error}") from None
    except Exception as error:
        raise SourceError(f"cannot open split {split!r} of TFDS dataset {name!r}: {error}") from None
    return TfdsSource(data_source, full_mapping, class_names)
