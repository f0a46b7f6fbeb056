"""Train/test overlap: evaluation images that also occur in the training data, copied or re-encoded.

RS benchmarks leak: RSICD and RSITMD share images, and corpora built from them carry test images into
training. An evaluation image **overlaps** the training data when

- *exact*: the SHA-256 of its encoded bytes equals a training image's, or
- *near duplicate*: its 64-bit perceptual hash (``data.fingerprints``) is within ``max_distance`` bits
  (default 8) of a training image's **and** their 32x32 grey thumbnails differ by at most
  ``max_thumbnail_difference`` grey levels on average (default 4): the hash finds candidates among
  millions, the thumbnail comparison confirms them. On the real RS samples a JPEG re-encoded at quality
  30-95 stays within 8 bits and 1.8 grey levels; distinct images are 16+ bits and 6+ grey levels apart.

Training fingerprints come from the converters' sidecar files (``<shard stem>.hashes.npy``, one 40-byte
row per record); shards without one (converted by an older version, or written by other tools) are
fingerprinted here by decoding every image, with a warning. Near duplicates are looked up with a
multi-index: the hash is cut into 3 blocks, and by the pigeonhole principle a pair within 8 bits agrees to
within 2 bits on some block, so only the training hashes in those few block buckets are compared.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Sequence

import numpy as np

from geoalign_jax.data import fingerprints

log = logging.getLogger(__name__)

DEFAULT_MAX_DISTANCE = 8
DEFAULT_MAX_THUMBNAIL_DIFFERENCE = 4.0
#: (shift, width) of the three blocks of the 64-bit hash used as look-up keys.
_BLOCKS = ((42, 22), (21, 21), (0, 21))
#: Near-duplicate candidates confirmed per evaluation image, nearest first.
_MAX_CANDIDATES = 8


class OverlapError(ValueError):
    """Training data that cannot be fingerprinted as asked; the message names the location."""


# ---------------------------------------------------------------------------------------------------------
# Near-duplicate look-up.


def _masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit XOR mask with at most ``radius`` bits set."""
    masks = [0]
    for count in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in itertools.combinations(range(width), count)]
    return np.asarray(masks, np.uint64)


class HammingIndex:
    """All stored 64-bit hashes within ``max_distance`` bits of a query (multi-index hashing)."""

    def __init__(self, hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> None:
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.hashes = np.asarray(hashes, np.uint64)
        self.max_distance = max_distance
        radius = max_distance // len(_BLOCKS)
        self._blocks = []
        for shift, width in _BLOCKS:
            keys = (self.hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(keys, kind="stable")
            self._blocks.append((shift, width, keys[order], order, _masks(width, radius)))

    def query(self, queries: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query positions, stored positions, distances) of every pair within ``max_distance``, each once."""
        queries = np.asarray(queries, np.uint64)
        found = []
        for start in range(0, len(queries), chunk):
            part = queries[start:start + chunk]
            pairs = []
            for shift, width, sorted_keys, order, masks in self._blocks:
                probes = ((part[:, None] >> np.uint64(shift)) & np.uint64((1 << width) - 1)) ^ masks[None, :]
                low = np.searchsorted(sorted_keys, probes, "left").ravel()
                counts = np.searchsorted(sorted_keys, probes, "right").ravel() - low
                total = int(counts.sum())
                if not total:
                    continue
                first = np.repeat(low - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
                stored = order[first + np.arange(total)]
                query = np.repeat(np.repeat(np.arange(len(part)), len(masks)), counts)
                pairs.append((query, stored))
            if not pairs:
                continue
            query = np.concatenate([q for q, _ in pairs])
            stored = np.concatenate([s for _, s in pairs])
            distance = fingerprints.hamming(part[query], self.hashes[stored])
            close = distance <= self.max_distance
            unique = np.unique(np.stack([query[close], stored[close], distance[close]], axis=1), axis=0)
            found.append(unique + np.asarray([[start, 0, 0]]))
        if not found:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        rows = np.concatenate(found)
        return rows[:, 0], rows[:, 1], rows[:, 2]


# ---------------------------------------------------------------------------------------------------------
# Training fingerprints.


def shard_fingerprints(path: str) -> tuple[np.ndarray, bool]:
    """(fingerprint rows of a shard, True when read from its sidecar). A sidecar is used only when its row
    count fits the shard and its first and last rows hash the shard's first and last images; otherwise the
    shard's images are decoded and fingerprinted here. A shard, record or image that cannot be read is an
    OverlapError naming it (the check cannot vouch for data it cannot see)."""
    from geoalign_jax.data import sources

    try:
        source = sources.RecordSource([path])
    except sources.SourceError as error:
        raise OverlapError(f"training data: {error}") from None
    count = len(source)
    sidecar = fingerprints.sidecar_path(path)
    if sidecar.is_file():
        try:
            rows = fingerprints.read_sidecar(sidecar, count)
            for index in {0, count - 1} if count else ():
                if bytes(rows[index]["sha256"]) != fingerprints.sha256(_train_image(source, path, index)):
                    raise fingerprints.FingerprintError(f"{sidecar}: row {index} does not hash record {index} "
                                                        "of its shard (stale sidecar? re-run the converter)")
            return rows, True
        except fingerprints.FingerprintError as error:
            log.warning("%s; fingerprinting the shard's images instead", error)
    found = []
    for index in range(count):
        image = _train_image(source, path, index)  # outside the try: OverlapError is a ValueError too
        try:
            found.append(fingerprints.fingerprint(image))
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for a broken image
            raise OverlapError(f"training data {path} record {index}: cannot decode its image to fingerprint it "
                               f"({type(error).__name__}: {error})") from None
    return fingerprints.fingerprint_rows(found), False


def _train_image(source: Any, path: str, index: int) -> bytes:
    """The image bytes of record ``index`` of a training shard; an unreadable record is an OverlapError."""
    from geoalign_jax.data import records

    try:
        return source[index]["image"]
    except records.RecordError as error:
        raise OverlapError(f"training data: {error}") from None  # the source's message names shard and record


class TrainImages:
    """Fingerprints of the training images, indexed for exact and near-duplicate look-up.

    Build it once (``from_data`` for a converted folder / shard glob, ``from_shards`` for the shard paths a
    trainer already has) and pass it to every evaluation.
    """

    def __init__(self, shard_paths: Sequence[str], shard_rows: Sequence[np.ndarray], *, from_sidecars: int = 0,
                 locations: Sequence[str] = (), split: str | None = None,
                 max_distance: int = DEFAULT_MAX_DISTANCE) -> None:
        if len(shard_paths) != len(shard_rows):
            raise ValueError(f"{len(shard_paths)} shard paths but {len(shard_rows)} fingerprint arrays")
        self.shard_paths = [os.fspath(p) for p in shard_paths]
        self.rows = np.concatenate([np.asarray(r, fingerprints.FINGERPRINT_DTYPE) for r in shard_rows]) \
            if shard_rows else np.zeros(0, fingerprints.FINGERPRINT_DTYPE)
        self._ends = np.cumsum([len(r) for r in shard_rows], dtype=np.int64)
        self.locations = [os.fspath(p) for p in locations] or list(self.shard_paths)
        self.split = split
        self.from_sidecars = from_sidecars
        self._prefixes = np.ascontiguousarray(self.rows["sha256"][:, :8]).view(">u8").ravel() \
            if len(self.rows) else np.zeros(0, np.uint64)
        self._prefix_order = np.argsort(self._prefixes, kind="stable")
        self._sorted_prefixes = self._prefixes[self._prefix_order]
        self.index = HammingIndex(self.rows["phash"], max_distance)
        self._source = None

    @classmethod
    def from_shards(cls, shard_paths: Sequence[str | os.PathLike], *, locations: Sequence[str] = (),
                    split: str | None = None, max_distance: int = DEFAULT_MAX_DISTANCE) -> "TrainImages":
        paths = [os.fspath(p) for p in shard_paths]
        if not paths:
            raise OverlapError("no training shards to fingerprint")
        parts, sidecars, computed = [], 0, 0
        for path in paths:
            rows, from_sidecar = shard_fingerprints(path)
            parts.append(rows)
            sidecars += from_sidecar
            computed += 0 if from_sidecar else len(rows)
        if computed:
            log.warning("fingerprinted %d training images by decoding them (shards without a usable .hashes.npy "
                        "sidecar; the converters write one)", computed)
        return cls(paths, parts, from_sidecars=sidecars, locations=locations, split=split,
                   max_distance=max_distance)

    @classmethod
    def from_data(cls, locations: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train", *,
                  max_distance: int = DEFAULT_MAX_DISTANCE) -> "TrainImages":
        """The ``split`` shards of converted folders and / or shard globs (as ``data.train_shards`` takes)."""
        from geoalign_jax.data import sources

        if isinstance(locations, (str, os.PathLike)):
            locations = [locations]
        paths = []
        for location in locations:
            try:
                paths += sources.shard_paths(location, split)
            except sources.SourceError as error:
                raise OverlapError(f"training data {os.fspath(location)}: {error}") from None
        return cls.from_shards(paths, locations=[os.path.abspath(p) for p in locations], split=split,
                               max_distance=max_distance)  # absolute: results.json may be read elsewhere

    def __len__(self) -> int:
        return len(self.rows)

    def _record(self, index: int) -> dict[str, Any]:
        """Training record ``index``; OverlapError naming it when its shard is damaged."""
        from geoalign_jax.data import records, sources

        try:
            if self._source is None:
                self._source = sources.RecordSource(self.shard_paths)
            return self._source[int(index)]
        except (sources.SourceError, records.RecordError) as error:
            raise OverlapError(f"training data: {error}") from None

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record index in that shard) of training image ``index``."""
        shard = int(np.searchsorted(self._ends, index, "right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return self.shard_paths[shard], int(index) - start

    def describe(self, index: int) -> str:
        path, local = self.locate(index)
        try:
            record_id = self._record(index)["id"]
        except OverlapError:  # its fingerprint came from the sidecar; a description must not fail on the bytes
            record_id = "unreadable"
        return f"{path} record {local} (id {record_id})"

    def thumbnail(self, index: int) -> np.ndarray:
        return fingerprints.thumbnail_from_bytes(self._record(index)["image"])

    def exact(self, digest: bytes) -> list[int]:
        """Training images whose bytes hash to ``digest``."""
        prefix = np.frombuffer(digest[:8], ">u8")[0]
        low = int(np.searchsorted(self._sorted_prefixes, prefix, "left"))
        high = int(np.searchsorted(self._sorted_prefixes, prefix, "right"))
        return sorted(int(i) for i in self._prefix_order[low:high] if bytes(self.rows[i]["sha256"]) == digest)

    def summary(self) -> dict[str, Any]:
        return {"locations": self.locations, "split": self.split, "shards": len(self.shard_paths),
                "records": len(self), "shards_with_sidecar": self.from_sidecars,
                "max_hash_distance": self.index.max_distance}


# ---------------------------------------------------------------------------------------------------------
# Evaluation side.


def eval_perceptual_hashes(images: Any, digests: Sequence[bytes]) -> np.ndarray:
    """Perceptual hashes of an evaluation set's images: from the shards' sidecars where they agree with
    the images' SHA-256, else by decoding."""
    hashes = np.zeros(len(images), np.uint64)
    known = np.zeros(len(images), bool)
    paths = getattr(getattr(images, "source", None), "paths", None)
    if paths and hasattr(images, "record_indices"):
        try:
            from geoalign_jax.data import sources

            rows = np.concatenate([fingerprints.read_sidecar(fingerprints.sidecar_path(p),
                                                             len(sources.RecordSource([p]))) for p in paths])
            for position, record_index in enumerate(images.record_indices):
                if bytes(rows[record_index]["sha256"]) == digests[position]:
                    hashes[position], known[position] = rows[record_index]["phash"], True
        except (fingerprints.FingerprintError, OSError):
            pass
    for position in np.flatnonzero(~known):
        hashes[position] = fingerprints.perceptual_hash(eval_thumbnail(images, int(position)))
    return hashes


def eval_thumbnail(images: Any, index: int) -> np.ndarray:
    """The fingerprint thumbnail of an evaluation image; an undecodable image is an EvalDataError naming it."""
    from geoalign_jax.eval import datasets

    try:
        return fingerprints.thumbnail_from_bytes(images.image_bytes(index))
    except (OSError, ValueError, SyntaxError) as error:
        raise datasets.EvalDataError(f"cannot decode image {images.where(index)}: {error}") from None


def describe_eval_image(images: Any, index: int) -> str:
    """Where an evaluation image is, with its record id when it comes from records."""
    where = images.where(index)
    source, record_indices = getattr(images, "source", None), getattr(images, "record_indices", None)
    if source is not None and record_indices is not None:
        return f"{where} (id {source[record_indices[index]]['id']})"
    return where


@dataclasses.dataclass
class OverlapResult:
    """Which evaluation images overlap the training data, and with which training image."""

    checked: int
    matches: list[dict[str, Any]]
    train: dict[str, Any]
    criteria: dict[str, Any]
    excluded: bool = False

    @property
    def indices(self) -> list[int]:
        return [match["index"] for match in self.matches]

    @property
    def exact(self) -> int:
        return sum(match["match"] == "exact" for match in self.matches)

    @property
    def near_duplicates(self) -> int:
        return sum(match["match"] == "near_duplicate" for match in self.matches)

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "overlapping": len(self.matches), "exact": self.exact,
                "near_duplicates": self.near_duplicates, "excluded": self.excluded,
                "criteria": self.criteria, "train_data": self.train,
                "images": [{k: v for k, v in match.items() if k != "index"} for match in self.matches]}

    def metrics(self) -> dict[str, float]:
        result = {"overlap/exact": float(self.exact), "overlap/near_duplicates": float(self.near_duplicates)}
        if self.excluded:
            result["overlap/excluded"] = float(len(self.matches))
        return result

    def note(self) -> str | None:
        """A line for the results table, or None when nothing overlaps."""
        if not self.matches:
            return None
        action = "left out of these numbers" if self.excluded else "INCLUDED in these numbers (--exclude-overlap " \
                                                                   "leaves them out)"
        return (f"{len(self.matches)} of {self.checked} images also in the training data ({self.exact} exact, "
                f"{self.near_duplicates} re-encoded): {action}")


def check_images(images: Any, digests: Sequence[bytes], train: TrainImages, *,
                 max_thumbnail_difference: float = DEFAULT_MAX_THUMBNAIL_DIFFERENCE) -> OverlapResult:
    """Compare an evaluation set's images (``digests``: their SHA-256) with the training images."""
    matches: dict[int, dict[str, Any]] = {}
    for position, digest in enumerate(digests):
        found = train.exact(digest)
        if found:
            matches[position] = {"index": position, "eval": describe_eval_image(images, position),
                                 "train": train.describe(found[0]), "match": "exact", "hash_distance": 0,
                                 "thumbnail_difference": 0.0, "train_copies": len(found)}
    hashes = eval_perceptual_hashes(images, digests)
    query, stored, distance = train.index.query(hashes)
    candidates: dict[int, list[tuple[int, int]]] = {}
    for q, s, d in zip(query.tolist(), stored.tolist(), distance.tolist()):
        if q not in matches:
            candidates.setdefault(q, []).append((d, s))
    for position, pairs in sorted(candidates.items()):
        eval_thumb = eval_thumbnail(images, position).astype(np.float32)
        for hash_distance, train_index in sorted(pairs)[:_MAX_CANDIDATES]:
            difference = float(np.abs(eval_thumb - train.thumbnail(train_index).astype(np.float32)).mean())
            if difference <= max_thumbnail_difference:
                matches[position] = {"index": position, "eval": describe_eval_image(images, position),
                                     "train": train.describe(train_index), "match": "near_duplicate",
                                     "hash_distance": int(hash_distance),
                                     "thumbnail_difference": round(difference, 3)}
                break
    criteria = {"exact": "SHA-256 of the encoded image bytes",
                "near_duplicate": f"64-bit DCT perceptual hash within {train.index.max_distance} bits and 32x32 "
                                  f"grey thumbnails within {max_thumbnail_difference:g} grey levels "
                                  "(mean absolute difference)"}
    return OverlapResult(len(digests), [matches[p] for p in sorted(matches)], train.summary(), criteria)


# ---------------------------------------------------------------------------------------------------------
# Leaving overlapping images out.


def _subset_images(images: Any, keep: Sequence[int]) -> Any:
    from geoalign_jax.eval import datasets

    if isinstance(images, datasets.FolderImages):
        return datasets.FolderImages([images.paths[i] for i in keep])
    if isinstance(images, datasets.RecordImages):
        return datasets.RecordImages(images.source, [images.record_indices[i] for i in keep],
                                     [images.wheres[i] for i in keep], [images.sizes[i] for i in keep])
    raise TypeError(f"cannot select images of a {type(images).__name__}")


def without_images(data: Any, drop: Sequence[int]) -> Any:
    """A copy of an evaluation set (classification, retrieval or region set) without the images at ``drop``,
    with the count in ``skipped['overlap_with_training_data']``."""
    dropped = set(drop)
    keep = [i for i in range(len(data.images)) if i not in dropped]
    changes: dict[str, Any] = {"images": _subset_images(data.images, keep),
                               "skipped": {**data.skipped, "overlap_with_training_data": len(dropped)},
                               "description": f"{data.description}, {len(dropped)} images in the training "
                                              "data left out"}
    for field in ("labels", "image_keys", "captions", "sizes", "regions"):
        if hasattr(data, field):
            values = getattr(data, field)
            changes[field] = values[np.asarray(keep, np.int64)] if isinstance(values, np.ndarray) \
                else [values[i] for i in keep]
    return dataclasses.replace(data, **changes)
