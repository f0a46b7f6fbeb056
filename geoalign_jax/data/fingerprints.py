"""Image fingerprints: an exact hash of the encoded bytes and a small perceptual hash of the decoded pixels.

Why two: the exact hash (SHA-256 of the stored bytes) finds a training image copied byte for byte into an
evaluation set; the perceptual hash finds the same picture re-encoded (another JPEG quality, PNG <-> JPEG),
which byte hashes miss. Both are computed by `prepare` while it decodes each image anyway, and kept
in a sidecar file beside each shard (``<shard stem>.hashes.npy``, see docs/data_format.md), so an overlap
check over millions of training records reads 40 bytes per record instead of decoding every image again.

The perceptual hash is a 64-bit DCT hash ("pHash"): the image is decoded completely (no JPEG draft
scaling, so a JPEG and a PNG of the same pixels hash alike), converted to 8-bit grey, area-averaged to a
32x32 thumbnail, and bit i of the hash says whether the i-th of the 8x8 lowest-frequency DCT coefficients
lies above their median. A re-encoded copy differs in a few bits (up to 8 at JPEG quality 30 on the real
RS samples), distinct images in many (16 or more on the same samples); ``THUMBNAIL_SIZE`` thumbnails
confirm a candidate match (see ``geoalign_jax.eval.overlap``).

Shards prepared without sidecars (older versions, other tools, or copied without their .npy files) get
them once with ``python -m geoalign_jax.prepare fingerprints DIR_OR_GLOB`` (``add_sidecars``), which decodes
their images in parallel (``compute_fingerprints``).

Importing this module never imports jax, and what the preparation and the fingerprinting workers run
(spawned processes) never does; reading shards (``open_shard``) goes through grain, which does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from geoalign_jax.data import filesystem

THUMBNAIL_SIZE = 32
_DCT_SIZE = 8
#: One row per record of a shard, in record order.
FINGERPRINT_DTYPE = np.dtype([("sha256", "u1", (32,)), ("phash", "<u8")])
SHARD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".hashes.npy"

# DCT-II basis of the lowest frequencies: coefficient (u, v) = sum_x,y C[u, x] C[v, y] thumb[x, y].
_positions = np.arange(THUMBNAIL_SIZE)[None, :]
_frequencies = np.arange(_DCT_SIZE)[:, None]
_DCT_BASIS = np.cos(np.pi * (2 * _positions + 1) * _frequencies / (2 * THUMBNAIL_SIZE))


class FingerprintError(ValueError):
    """A sidecar file that does not belong to its shard (wrong layout or record count); names the file."""


def sha256(data: bytes) -> bytes:
    """The 32-byte SHA-256 digest of encoded image bytes."""
    return hashlib.sha256(data).digest()


def thumbnail(image: Any) -> np.ndarray:
    """[32, 32] uint8 grey thumbnail (area average) of a decoded PIL image of any mode PIL converts to L."""
    from PIL import Image

    grey = image.convert("L") if image.mode != "L" else image
    return np.asarray(grey.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BOX), dtype=np.uint8)


def thumbnail_from_bytes(data: bytes) -> np.ndarray:
    """``thumbnail`` of encoded image bytes, decoded completely (the same pixels whatever the format)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return thumbnail(image)


def perceptual_hash(thumb: np.ndarray) -> int:
    """64-bit DCT hash of a ``thumbnail``: bit 63 - i is set when low-frequency coefficient i (row-major over
    the 8x8 lowest frequencies) exceeds their median. Coefficients are rounded first, so a flat image (all
    AC coefficients zero up to float noise) hashes the same on every machine."""
    pixels = np.asarray(thumb, dtype=np.float64)
    if pixels.shape != (THUMBNAIL_SIZE, THUMBNAIL_SIZE):
        raise ValueError(f"thumbnail must be {THUMBNAIL_SIZE}x{THUMBNAIL_SIZE}, got {pixels.shape}")
    coefficients = np.round(_DCT_BASIS @ pixels @ _DCT_BASIS.T, 6).reshape(-1)
    bits = coefficients > np.median(coefficients)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance of 64-bit hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))).astype(np.int64)


def fingerprint(data: bytes, thumb: np.ndarray | None = None) -> tuple[bytes, int]:
    """(SHA-256 of ``data``, perceptual hash of its pixels); pass ``thumb`` when the image is already decoded."""
    return sha256(data), perceptual_hash(thumbnail_from_bytes(data) if thumb is None else thumb)


def fingerprint_rows(fingerprints: Sequence[tuple[bytes, int]]) -> np.ndarray:
    """Structured ``FINGERPRINT_DTYPE`` rows of (sha256 digest, perceptual hash) pairs."""
    rows = np.zeros(len(fingerprints), FINGERPRINT_DTYPE)
    for index, (digest, phash) in enumerate(fingerprints):
        rows[index]["sha256"] = np.frombuffer(digest, np.uint8)
        rows[index]["phash"] = phash
    return rows


# ---------------------------------------------------------------------------------------------------------
# Sidecar files: one per shard, rows in record order.


def sidecar_path(shard_path: str | os.PathLike) -> pathlib.Path:
    """``.../rsicd-train-00000-of-00002.hashes.npy`` for ``.../rsicd-train-00000-of-00002.array_record``."""
    path = filesystem.path(shard_path)  # a pathlib.Path, or an epath.Path for gs://
    stem = path.name[: -len(SHARD_SUFFIX)] if path.name.endswith(SHARD_SUFFIX) else path.name
    return path.with_name(stem + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, rows: np.ndarray) -> None:
    """Write fingerprint rows as a plain .npy (no pickle; byte-identical for identical rows), atomically:
    a reader (or a run interrupted half-way) sees the old file or the complete new one, never a torn one."""
    rows = np.asarray(rows, FINGERPRINT_DTYPE)
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    replace_file(path, buffer.getvalue())


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, flushed to disk, then renamed over it.
    In a bucket the object is uploaded whole: readers see the old object or the new one, never a part."""
    if filesystem.is_gcs(path):
        location = os.fspath(path)
        filesystem.retry(lambda: filesystem.path(location).write_bytes(data), what=location)
        return
    path = pathlib.Path(path)
    temp = path.with_name(f".tmp-{path.name}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def read_sidecar(path: str | os.PathLike, expected_count: int | None = None) -> np.ndarray:
    """Fingerprint rows of a sidecar; FingerprintError when its layout or its row count does not fit."""
    try:
        rows = np.load(io.BytesIO(filesystem.read_bytes(path)) if filesystem.is_gcs(path) else path,
                       allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FingerprintError(f"{path}: not a fingerprint sidecar ({error})") from None
    if rows.dtype != FINGERPRINT_DTYPE or rows.ndim != 1:
        raise FingerprintError(f"{path}: expected a 1-D array of {FINGERPRINT_DTYPE}, got {rows.dtype} {rows.shape}")
    if expected_count is not None and len(rows) != expected_count:
        raise FingerprintError(f"{path}: {len(rows)} fingerprints for a shard of {expected_count} records "
                               "(stale sidecar? python -m geoalign_jax.prepare fingerprints replaces it)")
    zeroed = np.flatnonzero(~rows["sha256"].any(axis=1)) if len(rows) else []
    if len(zeroed):  # no image hashes to 32 zero bytes: a zeroed block (the .npy has no checksum of its own)
        raise FingerprintError(f"{path}: rows {zeroed[:5].tolist()} are zeroed (a damaged file; "
                               "python -m geoalign_jax.prepare fingerprints replaces it)")
    return rows


# ---------------------------------------------------------------------------------------------------------
# Shards without a sidecar: verifying a sidecar, fingerprinting a shard's images, writing the missing sidecars.


class ShardReadError(ValueError):
    """A shard, record or image that cannot be read to fingerprint it; the message names the shard and record."""


#: Decoding work is sent to the worker processes in chunks of at most this many images / bytes, and at
#: most two chunks per worker are in flight: few round trips, bounded memory for multi-megabyte images.
_CHUNK_IMAGES = 64
_CHUNK_BYTES = 8 << 20
#: A spawned worker takes seconds to start (it imports the main module, often jax with it: 3-8 s measured
#: on 2 busy cores), the time to decode a few thousand small images: fewer per worker are not worth one.
MIN_IMAGES_PER_WORKER = 4000
#: PIL's errors for a broken or truncated image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def default_workers() -> int:
    """Processes that decode images to fingerprint them (as many as `prepare` uses by default)."""
    return min(8, os.cpu_count() or 1)


def open_shard(shard_path: str | os.PathLike) -> Any:
    """A ``sources.RecordSource`` over one shard; ShardReadError naming it when it cannot be opened."""
    from geoalign_jax.data import sources

    try:
        return sources.RecordSource([shard_path])
    except sources.SourceError as error:
        raise ShardReadError(str(error)) from None


def shard_image(source: Any, index: int) -> bytes:
    """The image bytes of record ``index`` of a one-shard source; ShardReadError (naming shard and record)."""
    from geoalign_jax.data import records

    try:
        return source[index]["image"]
    except records.RecordError as error:  # its message names the shard and the record
        raise ShardReadError(str(error)) from None


def verified_sidecar(shard_path: str | os.PathLike, source: Any | None = None) -> np.ndarray | None:
    """The rows of a shard's sidecar, or None when it has none. FingerprintError when the sidecar does not
    fit the shard: its row count must equal the shard's record count and its first and last rows must hash
    the shard's first and last images (a cheap check that catches a sidecar of another shard or a rebuilt
    shard). ``source``: the shard already opened (``open_shard``)."""
    sidecar = sidecar_path(shard_path)
    if not sidecar.is_file():
        return None
    source = open_shard(shard_path) if source is None else source
    count = len(source)
    rows = read_sidecar(sidecar, count)
    for index in sorted({0, count - 1}) if count else ():
        if bytes(rows[index]["sha256"]) != sha256(shard_image(source, index)):
            raise FingerprintError(f"{sidecar}: row {index} does not hash record {index} of its shard "
                                   "(stale sidecar? python -m geoalign_jax.prepare fingerprints replaces it)")
    return rows


def fingerprint_chunk(chunk: tuple[int, int, Sequence[bytes]]) -> tuple[int, int, list[tuple[bytes, int] | str]]:
    """(shard number, first record, images) -> the same numbers and, per image, its ``fingerprint`` or the
    reason it cannot be decoded. A top-level function of a jax-free module: it runs in spawned workers."""
    shard, start, images = chunk
    results: list[tuple[bytes, int] | str] = []
    for data in images:
        try:
            results.append(fingerprint(data))
        except _DECODE_ERRORS as error:
            results.append(f"{type(error).__name__}: {error}")
    return shard, start, results


@dataclasses.dataclass
class _ShardWork:
    path: str
    rows: np.ndarray
    error: str | None = None
    in_flight: int = 0  # chunks sent, results not yet back
    read: bool = False  # every chunk of the shard has been sent (or reading it failed)


def compute_fingerprints(shard_paths: Sequence[str | os.PathLike], *, workers: int = 1, progress: bool = False,
                         min_images_per_worker: int = MIN_IMAGES_PER_WORKER
                         ) -> Iterator[tuple[str, np.ndarray | ShardReadError]]:
    """(shard path, fingerprint rows) of each shard, in the given order, by decoding every image: this
    process reads the records, ``workers`` processes decode and hash them (``parallel_map.ordered_parallel_map``;
    fewer, down to none, when there are fewer than ``min_images_per_worker`` images each). A shard that
    cannot be opened, or holds a record or an image that cannot be read, comes back as (path,
    ShardReadError naming the shard and record) and the others go on."""
    from tqdm import tqdm

    from geoalign_jax.data import parallel_map, sources

    shards: list[_ShardWork] = []
    for path in map(os.fspath, shard_paths):
        try:  # the count from the shard's index; its reader is opened when its records are read
            shards.append(_ShardWork(path, np.zeros(sources.check_shard(path), FINGERPRINT_DTYPE)))
        except sources.SourceError as error:
            shards.append(_ShardWork(path, np.zeros(0, FINGERPRINT_DTYPE), str(error), read=True))
    total = sum(len(shard.rows) for shard in shards)
    workers = max(1, min(workers, total // max(1, min_images_per_worker)))

    def chunks() -> Iterator[tuple[int, int, list[bytes]]]:
        for number, shard in enumerate(shards):
            if shard.read:
                continue
            images: list[bytes] = []
            start, size = 0, 0
            try:
                source = open_shard(shard.path)
                for index in range(len(shard.rows)):
                    data = shard_image(source, index)
                    images.append(data)
                    size += len(data)
                    if len(images) >= _CHUNK_IMAGES or size >= _CHUNK_BYTES:
                        shard.in_flight += 1
                        yield number, start, images
                        start, images, size = index + 1, [], 0
            except ShardReadError as error:
                shard.error, images = str(error), []
            if images:
                shard.in_flight += 1
                yield number, start, images
            shard.read = True

    done = 0

    def finished() -> Iterator[tuple[str, np.ndarray | ShardReadError]]:
        nonlocal done
        while done < len(shards) and shards[done].read and not shards[done].in_flight:
            shard = shards[done]
            yield shard.path, (ShardReadError(shard.error) if shard.error is not None else shard.rows)
            done += 1

    with tqdm(total=total, desc="fingerprinting", unit="img", disable=not progress, file=sys.stderr) as bar:
        for number, start, results in parallel_map.ordered_parallel_map(fingerprint_chunk, chunks(), workers,
                                                                   window=2 * workers):
            shard = shards[number]
            shard.in_flight -= 1
            for offset, result in enumerate(results):
                if isinstance(result, str):
                    if shard.error is None:
                        shard.error = (f"{shard.path} record {start + offset}: cannot decode its image to "
                                       f"fingerprint it ({result})")
                else:
                    shard.rows[start + offset]["sha256"] = np.frombuffer(result[0], np.uint8)
                    shard.rows[start + offset]["phash"] = result[1]
            bar.update(len(results))
            yield from finished()
        yield from finished()


@dataclasses.dataclass
class SidecarReport:
    """What ``add_sidecars`` found and did, shard by shard; ``format()`` is what the CLI prints."""

    kept: list[str] = dataclasses.field(default_factory=list)  # already had a sidecar that fits
    written: list[str] = dataclasses.field(default_factory=list)  # had none
    replaced: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (shard, why the old one was unfit)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (shard, why it cannot be read)
    manifests: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # manifest -> splits newly listed
    unlisted: list[str] = dataclasses.field(default_factory=list)  # shards no manifest beside them lists

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        shards = len(self.kept) + len(self.written) + len(self.replaced) + len(self.failed)
        lines = [f"fingerprints: {shards} shards: {len(self.written)} sidecars written, {len(self.replaced)} "
                 f"replaced, {len(self.kept)} already there, {len(self.failed)} shards unreadable"]
        lines += [f"  replaced {sidecar_path(path)}: {why}" for path, why in self.replaced]
        lines += [f"  UNREADABLE {path}: {why}" for path, why in self.failed]
        lines += [f"  {manifest}: image_hashes now lists {', '.join(splits)}"
                  for manifest, splits in self.manifests.items() if splits]
        if self.unlisted:
            lines.append(f"  {len(self.unlisted)} shards are listed by no manifest beside them (sidecars written "
                         f"all the same), e.g. {self.unlisted[0]}")
        return "\n".join(lines)


def _location_shards(location: str) -> tuple[list[str], list[str]]:
    """(shard paths, folders whose manifest may list them) of a prepared folder (every split), a shard file
    or a glob of shard files (``.array_record``); ShardReadError naming the location when there are none.
    Local or ``gs://`` (data/filesystem.py); a storage error is a ShardReadError naming the object."""
    from geoalign_jax.data import sources

    try:
        if any(ch in location for ch in "*?["):
            matches = [p for p in filesystem.glob(location) if p.endswith(SHARD_SUFFIX)]
            absent = set(filesystem.missing_files(matches))
            paths = [p for p in matches if p not in absent]
            if not paths:
                raise ShardReadError(f"no {SHARD_SUFFIX} files match {location}")
            return paths, sorted({filesystem.dirname(p) or "." for p in paths})
        if filesystem.isfile(location):
            return [location], [filesystem.dirname(location) or "."]
        if not filesystem.is_gcs(location) and not os.path.isdir(location):
            raise ShardReadError(f"{location}: no such folder or file")
        if not filesystem.isfile(filesystem.join(location, sources.MANIFEST_NAME)):
            raise ShardReadError(f"no {sources.MANIFEST_NAME} in {location}: give its shards as a glob, e.g. "
                                 f"'{filesystem.join(location, '*' + SHARD_SUFFIX)}'")
    except filesystem.StorageError as error:
        raise ShardReadError(str(error)) from None
    try:
        manifest = sources.read_manifest(location)
        paths = [p for split in manifest["splits"] for p in sources.shard_paths(location, split)]
    except sources.SourceError as error:
        raise ShardReadError(str(error)) from None
    return paths, [location]


def _list_in_manifests(folders: Sequence[str], shard_paths: Sequence[str], report: SidecarReport) -> None:
    """Add each split whose shards all have a sidecar to ``image_hashes`` of the manifests in ``folders``
    (rewritten atomically, only when that changes them); note shards no manifest lists."""
    import json

    from geoalign_jax.data import sources

    listed: set[str] = set()
    for folder in folders:
        manifest_path = filesystem.join(folder, sources.MANIFEST_NAME)
        if not filesystem.isfile(manifest_path):
            continue
        try:
            manifest = sources.read_manifest(folder)
        except sources.SourceError as error:
            report.failed.append((manifest_path, str(error)))
            continue
        hashes = dict(manifest.get("image_hashes") or {})
        added = []
        for split, entry in manifest["splits"].items():
            shards = [filesystem.join(folder, shard) for shard in entry["shards"]]
            listed.update(filesystem.absolute(shard) for shard in shards)
            names = [sidecar_path(shard).as_posix() for shard in entry["shards"]]
            if all(sidecar_path(shard).is_file() for shard in shards) and hashes.get(split) != names:
                hashes[split] = names
                added.append(split)
        if added:
            manifest["image_hashes"] = dict(sorted(hashes.items()))
            replace_file(manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
        report.manifests[manifest_path] = added
    report.unlisted = [p for p in shard_paths if filesystem.absolute(p) not in listed]


def add_sidecars(locations: Sequence[str | os.PathLike], *, workers: int = 1, progress: bool = False
                 ) -> SidecarReport:
    """Give every shard of ``locations`` (prepared folders, shard files or globs) a fitting sidecar, once:
    shards with one are kept, the others are fingerprinted by decoding (``compute_fingerprints``) and their
    sidecars written atomically beside them; manifests beside the shards then list them in ``image_hashes``.
    A shard that cannot be read is named in the report (``failed``) and gets no sidecar; a location that
    holds no shards is a ShardReadError."""
    report = SidecarReport()
    paths, folders = [], []
    for location in map(os.fspath, locations):
        found, manifest_folders = _location_shards(location)
        paths += [p for p in found if p not in paths]
        folders += [f for f in manifest_folders if f not in folders]
    stale: dict[str, str] = {}
    missing = []
    for path in paths:
        try:
            if verified_sidecar(path) is not None:
                report.kept.append(path)
                continue
        except FingerprintError as error:
            stale[path] = str(error)
        except ShardReadError as error:
            report.failed.append((path, str(error)))
            continue
        missing.append(path)
    for path, rows in compute_fingerprints(missing, workers=workers, progress=progress):
        if isinstance(rows, ShardReadError):
            report.failed.append((path, str(rows)))
            continue
        write_sidecar(sidecar_path(path), rows)
        if path in stale:
            report.replaced.append((path, stale[path]))
        else:
            report.written.append(path)
    _list_in_manifests(folders, paths, report)
    return report
