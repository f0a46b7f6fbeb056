"""Local folders and ``gs://`` buckets behind one set of small functions: the data side's file-system layer.

Two mechanisms, each the maintained one for its job (README, "Training data in a bucket", says why):

* record bytes: ArrayRecord's own GCS reader. array-record 0.8.6 is built with riegeli's ``GcsReader``
  (google-cloud-cpp), so ``ArrayRecordReader("gs://bucket/shard.array_record")`` and grain's
  ``ArrayRecordDataSource`` read records with ranged GETs in C++ (no GIL, no copy of the shard): each
  worker reads only the records of its own slice.
* everything else (manifest, sidecars, globs, existence checks, writes): ``etils.epath`` over fsspec's
  ``gcsfs``; local paths go to the OS as before.

Endpoint: a real bucket is reached with the machine's default credentials (a TPU VM's service account).
``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (the variable Google's Python clients read) points both
mechanisms at a local emulator instead: ``configure()`` copies it to ``CLOUD_STORAGE_EMULATOR_ENDPOINT``
(the one google-cloud-cpp reads) and to ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore's, with a placeholder
token: orbax checkpoints in a gs:// workdir), and selects gcsfs's plain JSON-API file system, whose default class would
first probe the bucket type over gRPC, which an emulator does not serve (a 60 s stall).

Faults: gcsfs retries transient HTTP errors itself, and the C++ reader retries and resumes a cut download
itself; what still fails reaches ``retry`` below, which backs off, retries and counts (``RETRIES``), and
raises after ``MAX_ATTEMPTS``. A missing object or a refused permission is never retried:
``error_text.one_line`` turns it into one line naming the object.

What is counted, and what cannot be. The C++ reader's own retries are invisible to Python: array-record 0.8.6
builds its reader on a default ``google::cloud::storage::Client()`` (python/array_record_module.cc), whose retry
policy (up to 15 min, back-off 1 s doubling to 5 min, a stalled download cut after 120 s) is set by C++ options
that neither the Python API nor an environment variable reaches (the variables the library reads:
``CLOUD_STORAGE_EMULATOR_ENDPOINT``, ``CLOUD_STORAGE_ENABLE_TRACING``, ``GOOGLE_CLOUD_CPP_ENABLE_CLOG``,
``GOOGLE_CLOUD_PROJECT`` and a few more; none sets a retry policy), so it cannot be made to fail fast for
``retry`` to count. Its request trace (``CLOUD_STORAGE_ENABLE_TRACING=raw-client`` with
``GOOGLE_CLOUD_CPP_ENABLE_CLOG=yes``) goes to the process's stderr and logs each ranged GET, a retry as one more
GET of the same object, which tells a retry from the next read only by guessing. What Python does see is time:
before each of its retries the C++ reader sleeps at least ``NATIVE_FIRST_BACKOFF_S``, so a record read that took
that long is counted in ``RETRIES["slow_record"]`` and logged naming the record (the 1st, 2nd, 4th, 8th ... of
them). That count covers every read the C++ reader retried after a back-off (once, however many retries) and
also reads that were just slow; a dropped connection that is reopened at once (no back-off) is not seen: measured
on the emulator, a download cut during the first record read of a shard was re-requested at once in 3 of 8 runs
(in a shard already read from, 8 of 8 waited the back-off).
gcsfs's own retries (metadata, uploads) are not counted either. ``RETRIES`` is per process (each grain worker
has its own).
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from geoalign_jax.error_text import one_line

logger = logging.getLogger(__name__)

GCS_PREFIX = "gs://"
#: Where Google's Python clients (and gcsfs) look for an emulator endpoint.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
#: Where google-cloud-cpp (ArrayRecord's GCS reader) looks for it.
NATIVE_EMULATOR_ENV = "CLOUD_STORAGE_EMULATOR_ENDPOINT"
#: Where tensorstore (orbax's checkpoints in a gs:// workdir) looks for it, and the bearer token it then sends
#: instead of asking for credentials (an emulator checks none).
TENSORSTORE_EMULATOR_ENV, TENSORSTORE_TOKEN_ENV = "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"
#: Attempts of one operation in `retry` (the clients below it have retried already).
MAX_ATTEMPTS = 4
#: First back-off in seconds; doubled after every failed attempt.
FIRST_BACKOFF_S = 0.5
#: Retries done by `retry`, by kind of operation ("record", "metadata"), and record reads that took at least
#: NATIVE_FIRST_BACKOFF_S ("slow_record": the C++ reader retried them, or they were slow), in this process.
RETRIES: collections.Counter[str] = collections.Counter()
#: google-cloud-cpp's first back-off (its ExponentialBackoffPolicy draws each delay from [d, 2d], d = 1 s,
#: 2 s, ...): a record read that took this long was retried by ArrayRecord's C++ reader, or was slow.
NATIVE_FIRST_BACKOFF_S = 1.0

_T = TypeVar("_T")
_configured_lock = threading.Lock()
_configured_for: tuple[int, str] | None = None

#: What marks a transient failure in an error's text (gRPC-style status names as google-cloud-cpp prints
#: them, an HTTP 408/429/5xx status, a dropped or timed-out connection), rather than a missing object, a
#: refused permission or damaged bytes. Numbers count only beside "status"/"code"/"HTTP", so a byte offset
#: in a damaged-chunk message ("at byte 5000") is not taken for one.
_TRANSIENT_PATTERN = re.compile(
    r"UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|Retry policy exhausted|timed? ?out|"
    r"connection (?:reset|refused|aborted|died|closed)|broken pipe|service unavailable|"
    r"(?:status|code|http)\W{0,3}(?:408|429|5\d\d)\b", re.IGNORECASE)
_MISSING_PATTERN = re.compile(r"NOT_FOUND|no such object|(?:status|code|http)\W{0,3}404\b", re.IGNORECASE)
_DENIED_PATTERN = re.compile(r"PERMISSION_DENIED|UNAUTHENTICATED|forbidden|permission denied|access denied|"
                             r"(?:status|code|http)\W{0,3}40[13]\b", re.IGNORECASE)


class StorageError(OSError):
    """An object that cannot be used: missing, not permitted, or still failing after retries; names it."""


def is_gcs(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object or prefix in a GCS bucket."""
    return os.fspath(path).startswith(GCS_PREFIX)


def configure() -> None:
    """Point the GCS clients at ``$STORAGE_EMULATOR_HOST`` when it is set (once per process and value)."""
    global _configured_for
    endpoint = os.environ.get(EMULATOR_ENV, "")
    key = (os.getpid(), endpoint)
    if _configured_for == key:
        return
    with _configured_lock:
        if _configured_for == key:
            return
        import fsspec

        for protocol in ("gs", "gcs"):
            # No cached listings: a bucket folder changes under a long-lived process (prepare --overwrite, a
            # shard deleted); an existence check must ask the bucket, not a listing taken minutes ago.
            fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
        if endpoint:
            if not endpoint.startswith(("http://", "https://")):
                endpoint = f"http://{endpoint}"
            os.environ.setdefault(NATIVE_EMULATOR_ENV, endpoint)
            os.environ.setdefault(TENSORSTORE_EMULATOR_ENV, endpoint)
            os.environ.setdefault(TENSORSTORE_TOKEN_ENV, "emulator")
            import gcsfs.core

            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
                # An emulator takes no credentials; gcsfs's default (token=None) would look for them on the
                # GCE metadata server (169.254.169.254, seconds of timeouts): network the emulator must not need.
                fsspec.config.conf[protocol]["token"] = "anon"
        _configured_for = key


def path(location: str | os.PathLike) -> Any:
    """pathlib's API for a location: ``pathlib.Path`` for a local path, ``etils.epath.Path`` for ``gs://``."""
    if not is_gcs(location):
        return pathlib.Path(location)
    try:
        import gcsfs  # noqa: F401 - epath reaches gs:// through fsspec's gcsfs
    except ImportError:
        raise ImportError(f"{os.fspath(location)}: reading or writing gs:// needs gcsfs: "
                          "pip install 'geoalign-jax[gcs]' (or gcsfs==2026.10.1)") from None
    from etils import epath

    configure()
    return epath.Path(os.fspath(location))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def dirname(location: str | os.PathLike) -> str:
    location = os.fspath(location)
    if is_gcs(location):
        head = location.rstrip("/").rsplit("/", 1)[0]
        return head if len(head) > len(GCS_PREFIX) else location
    return os.path.dirname(location)


def absolute(location: str | os.PathLike) -> str:
    """``os.path.abspath`` for a local path; a ``gs://`` location is absolute already."""
    location = os.fspath(location)
    return location if is_gcs(location) else os.path.abspath(location)


def error_kind(error: BaseException) -> str:
    """"missing", "denied", "transient" or "other" (damaged bytes, bad arguments), from the error's type and
    text: gcsfs raises FileNotFoundError / OSError("Forbidden ..."), the C++ reader a RuntimeError with the
    GCS status in its message."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    code = getattr(error, "code", None)  # gcsfs's HttpError carries the HTTP status here, not in its text
    if isinstance(code, int):
        if code in (401, 403):
            return "denied"
        if code == 404:
            return "missing"
        if code in (408, 429) or 500 <= code < 600:
            return "transient"
    if isinstance(error, PermissionError):
        return "denied"
    text = str(error)
    if _DENIED_PATTERN.search(text):
        return "denied"
    if _MISSING_PATTERN.search(text):
        return "missing"
    if isinstance(error, (TimeoutError, ConnectionError)) or _TRANSIENT_PATTERN.search(text):
        return "transient"
    return "other"


def retry(operation: Callable[[], _T], *, what: str | Callable[[], str], kind: str = "metadata",
          sleep: Callable[[float], None] = time.sleep) -> _T:
    """``operation()``, retried with exponential back-off while it fails transiently (each retry counted in
    ``RETRIES[kind]`` and logged naming ``what``); other failures propagate at once. A "record" read that took
    ``NATIVE_FIRST_BACKOFF_S`` or longer is counted in ``RETRIES["slow_record"]`` (module docstring)."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        started = time.perf_counter()
        try:
            result = operation()
            if kind == "record" and (took := time.perf_counter() - started) >= NATIVE_FIRST_BACKOFF_S:
                RETRIES["slow_record"] += 1
                count = RETRIES["slow_record"]
                if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: a slow bucket must not flood the log
                    logger.warning("%s: the read took %.1f s: ArrayRecord's C++ reader retried it (it backs off "
                                   "%.0f s or more before each retry), or the bucket was slow (%d such reads in "
                                   "this process)", what if isinstance(what, str) else what(), took,
                                   NATIVE_FIRST_BACKOFF_S, count)
            return result
        except Exception as error:  # noqa: BLE001 - classified below; anything not transient propagates
            if error_kind(error) != "transient" or attempt == MAX_ATTEMPTS:
                raise
            delay = FIRST_BACKOFF_S * 2 ** (attempt - 1)
            RETRIES[kind] += 1
            logger.warning("%s: transient error (%s); retry %d of %d in %.1f s (%d %s retries in this process)",
                           what if isinstance(what, str) else what(), one_line(error, limit=None),
                           attempt, MAX_ATTEMPTS - 1, delay, RETRIES[kind], kind)
            sleep(delay)
    raise AssertionError("unreachable")


def _checked(operation: Callable[[], _T], what: str) -> _T:
    """``retry(operation)``; a missing object or a refused permission as a one-line StorageError naming
    ``what``."""
    try:
        return retry(operation, what=what)
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001
        kind = error_kind(error)
        if kind == "denied":
            raise StorageError(f"{what}: permission denied ({one_line(error, limit=None)}); check the bucket's IAM "
                               "for this machine's service account") from None
        if kind == "transient":
            raise StorageError(f"{what}: still failing after {MAX_ATTEMPTS} attempts: "
                               f"{one_line(error, limit=None)}") from None
        raise


def isfile(location: str | os.PathLike) -> bool:
    """Whether a file / object exists (a permission error is raised, not taken for "absent")."""
    location = os.fspath(location)
    if not is_gcs(location):
        return os.path.isfile(location)
    return bool(_checked(lambda: path(location).is_file(), location))


def missing_files(locations: Iterable[str | os.PathLike]) -> list[str]:
    """The locations that are not files. In a bucket, each folder is listed once rather than one request
    per object (a dataset may have thousands of shards)."""
    locations = [os.fspath(p) for p in locations]
    by_folder: dict[str, list[str]] = {}
    for location in locations:
        if is_gcs(location):
            by_folder.setdefault(dirname(location), []).append(location)
    listed: set[str] = set()
    for folder in by_folder:
        try:
            listed.update(os.fspath(p) for p in _checked(lambda f=folder: list(path(f).iterdir()), folder))
        except FileNotFoundError:
            pass
    return [p for p in locations if (p not in listed if is_gcs(p) else not os.path.isfile(p))]


def read_bytes(location: str | os.PathLike) -> bytes:
    """A whole (small) file: manifests, sidecars. FileNotFoundError when absent."""
    location = os.fspath(location)
    if not is_gcs(location):
        with open(location, "rb") as handle:
            return handle.read()
    return _checked(lambda: path(location).read_bytes(), location)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob; in a bucket the wildcards may stand in any path component after the
    bucket name."""
    if not is_gcs(pattern):
        import glob as glob_module

        return sorted(glob_module.glob(pattern))
    parts = pattern[len(GCS_PREFIX):].split("/")
    first = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    if first == 0:
        raise StorageError(f"{pattern}: the bucket name cannot be a wildcard")
    base = GCS_PREFIX + "/".join(parts[:first])
    rest = "/".join(parts[first:])
    return sorted(os.fspath(p) for p in _checked(lambda: list(path(base).glob(rest)), pattern))


def list_objects(prefix: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every object under the ``gs://`` folder ``prefix`` (recursively), by name relative to it: the server's
    metadata (``size``, ``crc32c``, ``md5Hash``, ``generation``), one listing request per 1000 objects."""
    prefix = os.fspath(prefix).rstrip("/")
    path(prefix)  # configure
    import fsspec

    found = _checked(lambda: fsspec.filesystem("gs").find(prefix[len(GCS_PREFIX):], detail=True), prefix)
    base = prefix[len(GCS_PREFIX):] + "/"
    return {name[len(base):]: info for name, info in found.items() if name.startswith(base)}


def rename_folder(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames a folder; in a bucket (which has no folders) every object under it is copied, then deleted."""
    source, target = os.fspath(source), os.fspath(target)
    if not is_gcs(source):
        os.rename(source, target)
        return
    path(source)  # configure
    import fsspec

    bucket = fsspec.filesystem("gs")
    _checked(lambda: bucket.copy(source, target, recursive=True), source)  # copying twice is harmless
    for name in _checked(lambda: bucket.find(source), source):
        try:
            _checked(lambda name=name: bucket.rm_file(name), f"{GCS_PREFIX}{name}")
        except FileNotFoundError:  # a delete retried (by gcsfs or `retry`) after its first try was done
            pass
