"""Image fingerprints: an exact hash of the encoded bytes and a small perceptual hash of the decoded pixels.

Why two: the exact hash (SHA-256 of the stored bytes) finds a training image copied byte for byte into an
evaluation set; the perceptual hash finds the same picture re-encoded (another JPEG quality, PNG <-> JPEG),
which byte hashes miss. Both are computed by the converters while they decode each image anyway, and kept
in a sidecar file beside each shard (``<shard stem>.hashes.npy``, see docs/data_format.md), so an overlap
check over millions of training records reads 40 bytes per record instead of decoding every image again.

The perceptual hash is a 64-bit DCT hash ("pHash"): the image is decoded completely (no JPEG draft
scaling, so a JPEG and a PNG of the same pixels hash alike), converted to 8-bit grey, area-averaged to a
32x32 thumbnail, and bit i of the hash says whether the i-th of the 8x8 lowest-frequency DCT coefficients
lies above their median. A re-encoded copy differs in a few bits (up to 8 at JPEG quality 30 on the real
RS samples), distinct images in many (16 or more on the same samples); ``THUMBNAIL_SIZE`` thumbnails
confirm a candidate match (see ``geoalign_jax.eval.overlap``).

This module never imports jax (converter workers are spawned processes).
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Any, Sequence

import numpy as np

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
    path = pathlib.Path(shard_path)
    stem = path.name[: -len(SHARD_SUFFIX)] if path.name.endswith(SHARD_SUFFIX) else path.name
    return path.with_name(stem + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, rows: np.ndarray) -> None:
    """Write fingerprint rows as a plain .npy (no pickle; byte-identical for identical rows)."""
    rows = np.asarray(rows, FINGERPRINT_DTYPE)
    with open(path, "wb") as handle:
        np.save(handle, rows, allow_pickle=False)


def read_sidecar(path: str | os.PathLike, expected_count: int | None = None) -> np.ndarray:
    """Fingerprint rows of a sidecar; FingerprintError when its layout or its row count does not fit."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FingerprintError(f"{path}: not a fingerprint sidecar ({error})") from None
    if rows.dtype != FINGERPRINT_DTYPE or rows.ndim != 1:
        raise FingerprintError(f"{path}: expected a 1-D array of {FINGERPRINT_DTYPE}, got {rows.dtype} {rows.shape}")
    if expected_count is not None and len(rows) != expected_count:
        raise FingerprintError(f"{path}: {len(rows)} fingerprints for a shard of {expected_count} records "
                               "(stale sidecar? re-run the converter)")
    zeroed = np.flatnonzero(~rows["sha256"].any(axis=1)) if len(rows) else []
    if len(zeroed):  # no image hashes to 32 zero bytes: a zeroed block (the .npy has no checksum of its own)
        raise FingerprintError(f"{path}: rows {zeroed[:5].tolist()} are zeroed (a damaged file)")
    return rows
