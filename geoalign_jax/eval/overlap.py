"""Train/test overlap: evaluation images that also occur in the training data, copied or re-encoded.

RS benchmarks leak: RSICD and RSITMD share images, and corpora built from them carry test images into
training. An evaluation image **overlaps** the training data when

- *exact*: the SHA-256 of its encoded bytes equals a training image's, or
- *near duplicate*: its 64-bit perceptual hash (``data.fingerprints``) is within ``max_distance`` bits
  (default 8) of a training image's, and their 32x32 grey thumbnails (``NearDuplicateCriteria``) differ by
  at most 4 grey levels on average **and** correlate (Pearson, means removed) at 0.70 or more. The hash finds
  candidates among millions; the thumbnails confirm them. The correlation is what tells two different
  low-texture pictures of similar tone apart: among 15,200 random crops of the real RS samples one such
  pair passed the first two tests (hash 6 bits, 3.8 grey levels apart: a pond and a meadow) at a
  correlation of 0.50, and no two distinct crops within 4 grey levels (341 pairs, whatever their hashes)
  correlate above 0.63. Re-encoded copies: every shared sample re-encoded at JPEG quality 30-95 or as PNG
  stays within 8 bits, 1.8 grey levels and a correlation of 0.91; of the crops (down to 50 pixels) that pass
  the first two tests, all re-encodes at quality 75, 95 and PNG correlate at 0.75 or more, and 12 of ~29,000
  at quality 30/50 (crops under 85 pixels) fall below 0.70 and are missed. Two flat thumbnails (standard
  deviation under 1 grey level) have nothing to correlate: their mean difference alone decides.

Training fingerprints come from the sidecar files `prepare` writes (``<shard stem>.hashes.npy``, one 40-byte
row per record); shards without one (prepared by an older version, or copied without them) are
fingerprinted here by decoding their images in parallel, every run, with a warning naming the command
that writes their sidecars once (``python -m geoalign_jax.prepare fingerprints DIR_OR_GLOB``). Near
duplicates are looked up with a multi-index: the hash is cut into 3 blocks, and by the pigeonhole
principle a pair within 8 bits agrees to within 2 bits on some block, so only the training hashes in those
few block buckets are compared.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Sequence

import numpy as np

from geoalign_jax.data import filesystem, fingerprints

log = logging.getLogger(__name__)

DEFAULT_MAX_DISTANCE = 8
DEFAULT_MAX_THUMBNAIL_DIFFERENCE = 4.0
DEFAULT_MIN_THUMBNAIL_CORRELATION = 0.70
#: A thumbnail whose grey levels vary by less than this (standard deviation) is flat: little more than 8-bit
#: rounding noise (0.29), nothing a correlation could recognise.
DEFAULT_FLAT_THUMBNAIL_STD = 1.0
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


def train_fingerprints(shard_paths: Sequence[str], *, workers: int | None = None
                       ) -> tuple[list[np.ndarray], list[str]]:
    """(fingerprint rows of each shard, the shards fingerprinted by decoding). A shard's sidecar is used when
    it fits the shard (``fingerprints.verified_sidecar``); the other shards' images are decoded by
    ``workers`` processes. A shard, record or image that cannot be read is an OverlapError naming it (the
    check cannot vouch for data it cannot see)."""
    rows: dict[str, np.ndarray] = {}
    for path in shard_paths:
        try:
            found = fingerprints.verified_sidecar(path)
        except fingerprints.FingerprintError as error:
            log.warning("%s; fingerprinting the shard's images instead", error)
            found = None
        except fingerprints.ShardReadError as error:
            raise OverlapError(f"training data: {error}") from None
        if found is not None:
            rows[path] = found
    decoded = [path for path in shard_paths if path not in rows]
    for path, found in fingerprints.compute_fingerprints(
            decoded, workers=fingerprints.default_workers() if workers is None else workers):
        if isinstance(found, fingerprints.ShardReadError):
            raise OverlapError(f"training data: {found}")
        rows[path] = found
    return [rows[path] for path in shard_paths], decoded


def sidecar_command(shard_paths: Sequence[str]) -> str:
    """The command that writes the sidecars of these shards once: their folders when a manifest is there,
    else a glob of each folder's shards."""
    from geoalign_jax.data import sources

    targets = []  # local or gs://: `prepare fingerprints` writes the sidecars into a bucket folder too
    for folder in sorted({filesystem.dirname(filesystem.absolute(p)) for p in shard_paths}):
        has_manifest = filesystem.isfile(filesystem.join(folder, sources.MANIFEST_NAME))
        targets.append(folder if has_manifest else filesystem.join(folder, "*" + fingerprints.SHARD_SUFFIX))
    return "python -m geoalign_jax.prepare fingerprints " + " ".join(f"'{t}'" for t in targets)


class TrainImages:
    """Fingerprints of the training images, indexed for exact and near-duplicate look-up.

    Build it once (``from_data`` for a prepared folder / shard glob, ``from_shards`` for the shard paths a
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
                    split: str | None = None, max_distance: int = DEFAULT_MAX_DISTANCE,
                    workers: int | None = None) -> "TrainImages":
        """``workers``: processes decoding the images of shards without a fitting sidecar (default
        ``fingerprints.default_workers()``)."""
        paths = [os.fspath(p) for p in shard_paths]
        if not paths:
            raise OverlapError("no training shards to fingerprint")
        parts, decoded = train_fingerprints(paths, workers=workers)
        if decoded:
            decoded_set = set(decoded)
            computed = sum(len(rows) for path, rows in zip(paths, parts) if path in decoded_set)
            # Every run (and every periodic evaluation) decodes them again: say how to stop that.
            log.warning("fingerprinted %d training images by decoding them (%d shards without a usable %s "
                        "sidecar, e.g. %s); write the sidecars once with: %s", computed, len(decoded),
                        fingerprints.SIDECAR_SUFFIX, decoded[0], sidecar_command(decoded))
        return cls(paths, parts, from_sidecars=len(paths) - len(decoded), locations=locations, split=split,
                   max_distance=max_distance)

    @classmethod
    def from_data(cls, locations: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train", *,
                  max_distance: int = DEFAULT_MAX_DISTANCE, workers: int | None = None) -> "TrainImages":
        """The ``split`` shards of prepared folders and / or shard globs (as ``data.train_shards`` takes)."""
        from geoalign_jax.data import sources

        if isinstance(locations, (str, os.PathLike)):
            locations = [locations]
        paths = []
        for location in locations:
            try:
                paths += sources.shard_paths(location, split)
            except sources.SourceError as error:
                raise OverlapError(f"training data {os.fspath(location)}: {error}") from None
        # Locations are recorded absolute: results.json may be read elsewhere.
        return cls.from_shards(paths, locations=[filesystem.absolute(p) for p in locations], split=split,
                               max_distance=max_distance, workers=workers)

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


@dataclasses.dataclass(frozen=True)
class NearDuplicateCriteria:
    """The thresholds a near-duplicate candidate (hash within ``max_distance`` bits) must pass, on the 32x32
    grey thumbnails: mean absolute difference <= ``max_thumbnail_difference`` grey levels, and Pearson
    correlation of the mean-removed thumbnails >= ``min_thumbnail_correlation``, unless both thumbnails are
    flat (standard deviation < ``flat_thumbnail_std``), where the difference alone decides: two flat
    pictures of the same grey are the same picture as far as pixels can tell."""

    max_thumbnail_difference: float = DEFAULT_MAX_THUMBNAIL_DIFFERENCE
    min_thumbnail_correlation: float = DEFAULT_MIN_THUMBNAIL_CORRELATION
    flat_thumbnail_std: float = DEFAULT_FLAT_THUMBNAIL_STD

    def compare(self, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        """{"confirmed", "thumbnail_difference", "thumbnail_correlation" (None for a flat pair), "flat"}."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        difference = float(np.abs(a - b).mean())
        a, b = a - a.mean(), b - b.mean()
        spread_a, spread_b = float(np.sqrt((a * a).mean())), float(np.sqrt((b * b).mean()))
        flat = max(spread_a, spread_b) < self.flat_thumbnail_std
        if flat:
            correlation = None
        elif spread_a == 0 or spread_b == 0:
            correlation = 0.0  # a uniform picture beside a textured one: nothing in common but the mean
        else:
            correlation = float((a * b).mean() / (spread_a * spread_b))
        confirmed = difference <= self.max_thumbnail_difference and (
            correlation is None or correlation >= self.min_thumbnail_correlation)
        return {"confirmed": confirmed, "thumbnail_difference": difference, "thumbnail_correlation": correlation,
                "flat": flat}

    def to_json(self, max_distance: int) -> dict[str, Any]:
        return {"exact": "SHA-256 of the encoded image bytes",
                "near_duplicate": f"64-bit DCT perceptual hash within {max_distance} bits, 32x32 grey thumbnails "
                                  f"within {self.max_thumbnail_difference:g} grey levels (mean absolute "
                                  f"difference) and with a Pearson correlation >= {self.min_thumbnail_correlation:g} "
                                  f"(mean removed; not required when both are flat: standard deviation < "
                                  f"{self.flat_thumbnail_std:g} grey levels)",
                "max_hash_distance": max_distance,
                "max_thumbnail_difference": self.max_thumbnail_difference,
                "min_thumbnail_correlation": self.min_thumbnail_correlation,
                "flat_thumbnail_std": self.flat_thumbnail_std}


def check_images(images: Any, digests: Sequence[bytes], train: TrainImages, *,
                 criteria: NearDuplicateCriteria = NearDuplicateCriteria()) -> OverlapResult:
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
        eval_thumb = eval_thumbnail(images, position)
        for hash_distance, train_index in sorted(pairs)[:_MAX_CANDIDATES]:
            found = criteria.compare(eval_thumb, train.thumbnail(train_index))
            if found["confirmed"]:
                correlation = found["thumbnail_correlation"]
                matches[position] = {"index": position, "eval": describe_eval_image(images, position),
                                     "train": train.describe(train_index), "match": "near_duplicate",
                                     "hash_distance": int(hash_distance),
                                     "thumbnail_difference": round(found["thumbnail_difference"], 3),
                                     "thumbnail_correlation": None if correlation is None else round(correlation, 4),
                                     "flat": found["flat"]}
                break
    return OverlapResult(len(digests), [matches[p] for p in sorted(matches)], train.summary(),
                         criteria.to_json(train.index.max_distance))


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
