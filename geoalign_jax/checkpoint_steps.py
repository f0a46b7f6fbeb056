"""Which step of a trainer's `checkpoints/` to read, and whether it is whole.

The trainer (train/checkpoint.py), `evaluate --checkpoint` and `convert export --params` share this choice:
the newest step that reads back whole. orbax commits a step atomically (a kill while writing leaves a temporary
folder, never a half step), but a file damaged after the commit (a truncated or zeroed copy, a disk that
returns other bytes) is only noticed when it is read. So after orbax commits a step, process 0 writes
`checkpoints/<step>/digest.json`: the size of every file of the step and the CRC-32 of each 64 MiB segment. Before a step is read its
files are checked against it; a step that fails the check or fails to restore is damaged.

The trainer moves a damaged step aside to `checkpoints/<step>.damaged` (never deletes it: `mv` it back to
retry), logs one line naming the step and the reason and tries the step before it; on a multi-host run every
process agrees on the same step (the trainer passes `parallel.multihost.agree_on_failure` as `agree`).
Evaluate and export are read-only: they skip a damaged step with the same one-line warning and leave it in
place. A step without digest.json (written before digests existed, or killed between orbax's commit and the
digest) is read without the file check.

CRC-32 rather than a cryptographic hash: this guards against accidents, not adversaries. It is computed by
ISA-L (`isal`, carry-less-multiply folding: about 4x zlib's speed on the same core, the same values as
`zlib.crc32`, so digests written with zlib read alike) over a read-only memory map of the file (no copy); the
cost was the hash, not the reading (README "What a run survives" has the measured cost).

A `gs://` workdir (paths through `data/filesystem.py`): GCS computes a CRC32C and an MD5 of every object it
stores and checks uploads against them, so the digest of a step in a bucket records each object's size and
those two server-side checksums from one listing, without reading a byte back; the check compares a new
listing. (The MD5 matters: tensorstore's OCDBT files end with their own CRC32C, which makes the CRC32C of every
such file the same constant; it still changes with any damage, but would not tell two intact files apart.)
An object that GCS lists without an MD5 (a composite object, e.g. copied in by a parallel composite upload)
is checked by size and CRC32C, said in one warning. A digest of the other kind (a workdir copied between a
disk and a bucket) is checked as far as it can be: CRC-32 segments by reading the bytes; object checksums on
a local copy by size and CRC32C (google-crc32c, installed with gcsfs; without it by size alone).
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import mmap
import os
import pathlib
from typing import Any, Callable, Sequence, TypeVar

import orbax.checkpoint as ocp
from isal import isal_zlib

from geoalign_jax.data import filesystem
from geoalign_jax.error_text import one_line

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/
DIGEST_FILE = "digest.json"
DIGEST_FORMAT = "geoalign-step-digest"
DAMAGED_SUFFIX = ".damaged"
SEGMENT_BYTES = 64 << 20  # each file's CRC-32 is kept per segment, so that segments are hashed in parallel
CRC32_SEGMENTS, OBJECT_CHECKSUMS = "crc32-segments", "gcs-object-checksums"  # digest.json "checksums"

T = TypeVar("T")


class DamagedStepError(ValueError):
    """A checkpoint step that does not read back whole; the message names the step folder and the reason."""


class NoIntactStepError(ValueError):
    """A checkpoints folder in which no step reads back whole (the CLIs: one line, exit status 2)."""


def finished_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The steps orbax has committed under `checkpoints_dir` (a folder or gs://), newest first (`N.damaged` and
    temporary folders are not steps)."""
    return sorted(ocp.utils.checkpoint_steps(filesystem.path(checkpoints_dir)), reverse=True)


def reason(error: BaseException, limit: int = 300) -> str:
    """A read failure as one short line: orbax / tensorstore messages span many lines and repeat the path,
    so the innermost cause is shown (tensorstore's own words: `OUT_OF_RANGE ...`, `ZSTD ...`)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return one_line(f"{type(error).__name__}: {one_line(error, limit=None)}", limit)


def _segment_crc32(path: Any, start: int, length: int, crc32: Callable[..., int] = isal_zlib.crc32) -> str:
    """CRC-32 of `length` bytes of `path` from `start` (`crc32`: tools/bench_checkpoint_digest.py passes
    zlib's, the previous implementation, as its baseline)."""
    if not filesystem.is_gcs(path):
        with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return f"{crc32(memoryview(view)[start:start + length]):08x}"  # no copy
    crc = 0
    with path.open("rb") as stream:  # a digest of a local step, checked on a copy in a bucket
        stream.seek(start)
        for _ in range(0, length, READ_BYTES):
            crc = crc32(stream.read(min(READ_BYTES, start + length - stream.tell())), crc)
    return f"{crc:08x}"


READ_BYTES = 16 << 20


def _segments(path: Any, size: int) -> list[tuple[Any, int, int]]:
    return [(path, start, min(SEGMENT_BYTES, size - start)) for start in range(0, size, SEGMENT_BYTES)]


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path for path in step_dir.rglob("*") if path.is_file() and path.name != DIGEST_FILE)


def _crcs(jobs: list[tuple[Any, int, int]], crc32: Callable[..., int] = isal_zlib.crc32) -> list[str]:
    """CRC-32 of each (file, start, length) segment, several at once (the saves are large, the cores many)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda job: _segment_crc32(*job, crc32=crc32), jobs))


def compute_digest(step_dir: str | os.PathLike, crc32: Callable[..., int] = isal_zlib.crc32) -> dict[str, list]:
    """{path relative to the step folder: [size in bytes, [CRC-32 hex of each SEGMENT_BYTES segment]]} of a
    local step; of a gs:// step {name: [size, CRC32C, MD5]} as the bucket lists them (base64, as GCS gives them)."""
    if filesystem.is_gcs(step_dir):
        return {name: [int(info["size"]), info.get("crc32c"), info.get("md5Hash")]
                for name, info in sorted(filesystem.list_objects(step_dir).items()) if name != DIGEST_FILE}
    step_dir = pathlib.Path(step_dir)
    sizes = {path: path.stat().st_size for path in _step_files(step_dir)}
    jobs = [job for path, size in sizes.items() for job in _segments(path, size)]
    crcs = iter(_crcs(jobs, crc32))
    return {path.relative_to(step_dir).as_posix(): [size, [next(crcs) for _ in _segments(path, size)]]
            for path, size in sizes.items()}


def write_atomic(path: Any, text: str) -> None:
    """Writes a small text file whole or not at all: a local file through a renamed temporary one; an object
    in a bucket is whole by itself (GCS has no partial objects)."""
    if filesystem.is_gcs(path):
        path.write_text(text)
        return
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


def write_digest(step_dir: str | os.PathLike) -> None:
    """Writes `step_dir`/digest.json (process 0, after orbax committed the step), atomically."""
    checksums = OBJECT_CHECKSUMS if filesystem.is_gcs(step_dir) else CRC32_SEGMENTS
    text = json.dumps({"format": DIGEST_FORMAT, "version": 1, "checksums": checksums, "segment_bytes": SEGMENT_BYTES,
                       "files": compute_digest(step_dir)}, indent=0)
    write_atomic(filesystem.path(step_dir) / DIGEST_FILE, text)


def _sizes(step_dir: Any, names: Sequence[str]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """(size of each file that exists, the bucket's listing of the step (empty for a local step))."""
    if filesystem.is_gcs(step_dir):
        listing = filesystem.list_objects(step_dir)
        return {name: int(listing[name]["size"]) for name in names if name in listing}, listing
    return {name: (step_dir / name).stat().st_size for name in names if (step_dir / name).is_file()}, {}


def _local_crc32c(path: pathlib.Path) -> str | None:
    """The base64 CRC32C of a local file (as GCS gives it), or None without google-crc32c."""
    try:
        import google_crc32c
    except ImportError:
        return None
    checksum = google_crc32c.Checksum()
    with path.open("rb") as stream:
        while chunk := stream.read(READ_BYTES):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def verify_digest(step_dir: str | os.PathLike, under: str = "") -> bool:
    """Checks the files of `step_dir` (only those below `under`, e.g. "params", when given) against its
    digest.json; DamagedStepError naming the first missing, resized or changed file. False when the step has
    no digest (nothing to check), True when it matched."""
    step_dir = filesystem.path(step_dir)
    digest_path = step_dir / DIGEST_FILE
    if not digest_path.is_file():
        return False
    try:
        digest = json.loads(digest_path.read_text())
        files, segment_bytes = digest["files"], int(digest["segment_bytes"])
        checksums = digest.get("checksums", CRC32_SEGMENTS)  # digests before gs:// workdirs: CRC-32 segments
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedStepError(f"{step_dir}: {DIGEST_FILE} is unreadable ({reason(error)})") from None
    if checksums not in (CRC32_SEGMENTS, OBJECT_CHECKSUMS):
        raise DamagedStepError(f"{step_dir}: {DIGEST_FILE} has checksums {checksums!r}, which this version does not "
                               f"know ({CRC32_SEGMENTS}, {OBJECT_CHECKSUMS}); read it with a newer geoalign-jax")
    if checksums == CRC32_SEGMENTS and segment_bytes != SEGMENT_BYTES:
        raise DamagedStepError(f"{step_dir}: {DIGEST_FILE} has segments of {segment_bytes} bytes, not {SEGMENT_BYTES}")
    prefix = f"{under.rstrip('/')}/" if under else ""
    checked = {name: entry for name, entry in sorted(files.items()) if name.startswith(prefix)}
    sizes, listing = _sizes(step_dir, list(checked))
    for name, (size, *_) in checked.items():
        if name not in sizes:
            raise DamagedStepError(f"{step_dir}: {name} is missing")
        if sizes[name] != size:
            raise DamagedStepError(f"{step_dir}: {name} has {sizes[name]} bytes, {size} were saved")
    changed = f"{step_dir}: {{}} changed since it was saved (content digest mismatch)"
    if checksums == OBJECT_CHECKSUMS:
        without_md5 = []  # objects checked by size and CRC32C alone, or by size alone
        for name, (_, crc32c, md5) in checked.items():
            if listing:  # in a bucket: the server's checksums of the objects now there
                now = (listing[name].get("crc32c"), listing[name].get("md5Hash"))
                if any(saved and found and saved != found for saved, found in zip((crc32c, md5), now)):
                    raise DamagedStepError(changed.format(name))
                if not (md5 and now[1]):
                    without_md5.append(name)
            elif crc32c and (found := _local_crc32c(step_dir / name)) is not None and found != crc32c:
                raise DamagedStepError(changed.format(name))
        if without_md5:  # GCS gives composite objects (parallel composite uploads) no MD5
            logger.warning("%s: %d of %d object(s) have no MD5 (composite objects?), e.g. %s: checked by size and "
                           "CRC32C only, which finds damage but not an intact object swapped for another (an OCDBT "
                           "file ends with its own CRC32C, so every intact one has the same)", step_dir,
                           len(without_md5), len(checked), without_md5[0])
        return True
    jobs = [job for name, (size, _) in checked.items() for job in _segments(step_dir / name, size)]
    found = iter(_crcs(jobs))
    for name, (size, crcs) in checked.items():
        if [next(found) for _ in _segments(step_dir / name, size)] != crcs:
            raise DamagedStepError(changed.format(name))
    return True


def set_aside(step_dir: str | os.PathLike) -> Any:
    """Renames a damaged step folder to `<step>.damaged` (`.damaged.2`, ... when that exists); returns it."""
    step_dir = filesystem.path(step_dir)
    target = step_dir.parent / (step_dir.name + DAMAGED_SUFFIX)
    number = 1
    while target.exists():
        number += 1
        target = step_dir.parent / f"{step_dir.name}{DAMAGED_SUFFIX}.{number}"
    filesystem.rename_folder(step_dir, target)
    return target


def newest_intact(
    steps: Sequence[int], read: Callable[[int], T], *, on_damaged: Callable[[int, str], None],
    agree: Callable[[str], str] = lambda own: own,
) -> tuple[int, T] | None:
    """Tries `read(step)` from the newest step down; a step whose read raises (any error: orbax, tensorstore,
    decompression, a missing file, DamagedStepError) is reported to `on_damaged(step, reason)` and the next
    one is tried. `agree(own_reason) -> reason` makes several processes decide alike (a collective: every
    process calls it once per step tried). Returns (step, what read returned), or None when no step reads."""
    for step in sorted(steps, reverse=True):
        try:
            value, own = read(step), ""
        except Exception as error:  # noqa: BLE001 - any failure to read a step makes it damaged
            logger.debug("step %d does not read back", step, exc_info=True)
            value, own = None, reason(error)
        why = agree(own)
        if not why:
            return step, value
        on_damaged(step, why)
    return None


def damaged_line(checkpoints_dir: Any, step: int, why: str, action: str) -> str:
    """The one line that reports a damaged step (`action`: what was done about it)."""
    return f"checkpoint step {step} in {checkpoints_dir} is damaged ({why}); {action}"


__all__ = [
    "CHECKPOINTS_DIR", "DAMAGED_SUFFIX", "DIGEST_FILE", "DamagedStepError", "NoIntactStepError", "compute_digest",
    "damaged_line", "finished_steps", "newest_intact", "reason", "set_aside", "verify_digest", "write_atomic",
    "write_digest",
]
