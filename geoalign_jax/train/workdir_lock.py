"""One workdir, one run: the trainer holds an exclusive lock on its workdir for the whole run.

Local and NFS disks: `WORKDIR/run.lock`, held with `flock` (Linux emulates it with POSIX byte-range locks on
NFS, so it holds across hosts). The kernel drops the lock when the process ends however it ends (`kill -9`
included): nothing is left that blocks the next start. The file keeps the holder's host, pid and start time,
which a refused trainer names.

`gs://` workdirs have no locks: `WORKDIR/run.lease` is a lease object created only if absent (a generation
precondition), rewritten by a heartbeat every `LEASE_HEARTBEAT_S`, deleted at the end. A lease whose
heartbeat is older than `LEASE_STALE_S` (default 600 s; `GEOALIGN_LEASE_STALE_S` changes it) belongs to a
run that died without deleting it: the next trainer takes it over with a warning. A heartbeat that finds the
lease taken by another owner (it took over a lease this run let go stale) logs an error and marks the lease
lost (`lost()`): the trainer stops at its next log or save step without saving or logging more into the
workdir (train/loop.py), and its release leaves the new owner's lease alone. A heartbeat that fails (the
bucket unreachable) is logged and tried at the next beat.

Multi-host runs: process 0 holds the lock; if it cannot, every process stops (a collective). Evaluate and
export only read and take no lock.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from typing import Any, Callable, Protocol

from geoalign_jax.error_text import one_line

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
LEASE_FILE = "run.lease"
LEASE_STALE_S = float(os.environ.get("GEOALIGN_LEASE_STALE_S", "600"))
LEASE_HEARTBEAT_S = 60.0


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir (the message names its host, pid and start time)."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "owner": uuid.uuid4().hex,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _owner(text: str) -> str | None:
    try:
        return json.loads(text).get("owner")
    except (ValueError, AttributeError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its details are not readable)"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _busy(workdir: str, holder: dict[str, Any] | None, where: str) -> WorkdirBusyError:
    return WorkdirBusyError(f"workdir {workdir} is in use by another trainer ({_describe(holder)}; {where}): wait "
                            "for it to end, or use another --workdir")


class FileLock:
    """flock on WORKDIR/run.lock, with the holder's details in the file."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            except ValueError:
                holder = None
            os.close(fd)
            raise _busy(str(self.path.parent), holder, str(self.path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd
        return self

    def lost(self) -> bool:
        """A flock is held until it is released: never lost."""
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class LeaseStore(Protocol):
    """One object with compare-and-set by generation (GCS's preconditions)."""

    def read(self) -> tuple[str, int] | None: ...
    def create(self, text: str) -> int | None: ...  # None: it exists
    def replace(self, text: str, generation: int) -> int | None: ...  # None: the generation changed
    def delete(self, generation: int) -> None: ...


class GcsLeaseStore:
    """The lease object on Google Cloud Storage (google-cloud-storage, needed for gs:// workdirs only)."""

    def __init__(self, url: str):
        from google.api_core import exceptions
        from google.cloud import storage  # reads STORAGE_EMULATOR_HOST itself (data/filesystem.py)

        bucket, _, self._name = url.removeprefix("gs://").partition("/")
        self._bucket = storage.Client().bucket(bucket)
        self._blob = self._bucket.blob(self._name)
        self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)

    def read(self) -> tuple[str, int] | None:
        blob = self._bucket.get_blob(self._name)  # the generation first, then that generation's text
        if blob is None:
            return None
        generation = int(blob.generation)
        try:
            return blob.download_as_text(if_generation_match=generation), generation
        except self._conflict:  # replaced or deleted meanwhile
            return None

    def _write(self, text: str, generation: int) -> int | None:
        try:
            self._blob.upload_from_string(text, if_generation_match=generation)
        except self._conflict:
            return None
        return int(self._blob.generation)

    def create(self, text: str) -> int | None:
        return self._write(text, 0)

    def replace(self, text: str, generation: int) -> int | None:
        return self._write(text, generation)

    def delete(self, generation: int) -> None:
        try:
            self._blob.delete(if_generation_match=generation)
        except self._conflict:
            pass


@dataclasses.dataclass
class Lease:
    """A lease in `store` held by this process; `clock` is time.time (tests pass their own)."""

    store: LeaseStore
    where: str
    stale_s: float = LEASE_STALE_S
    clock: Callable[[], float] = time.time
    holder: dict[str, Any] = dataclasses.field(default_factory=_holder)
    generation: int | None = None
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _lost: threading.Event = dataclasses.field(default_factory=threading.Event)  # set by the heartbeat thread
    _beating: threading.Thread | None = None

    def _text(self) -> str:
        return json.dumps({**self.holder, "heartbeat": self.clock()})

    def acquire(self) -> Lease:
        self.generation = self.store.create(self._text())
        if self.generation is not None:
            return self
        found = self.store.read()
        if found is None:  # deleted meanwhile: try once more
            self.generation = self.store.create(self._text())
        else:
            text, generation = found
            try:
                other = json.loads(text)
            except ValueError:
                other = {}
            age = self.clock() - float(other.get("heartbeat", 0.0))
            if age < self.stale_s:
                raise _busy(self.where, other, f"lease {self.where}, heartbeat {age:.0f} s ago")
            logger.warning("taking over the stale lease %s of %s (no heartbeat for %.0f s > %.0f s)", self.where,
                           _describe(other), age, self.stale_s)
            self.generation = self.store.replace(self._text(), generation)
        if self.generation is None:
            raise _busy(self.where, None, f"lease {self.where} changed while it was being taken")
        return self

    def heartbeat(self) -> bool:
        """Renews the lease; False (an error logged, `lost()` True from now on) when another owner holds it."""
        if self.generation is None:
            return False
        generation = self.store.replace(self._text(), self.generation)
        if generation is None:
            # A retried upload whose first try was stored (its answer lost) fails its own precondition:
            # the lease is still ours if it names our owner id.
            found = self.store.read()
            if found is not None and _owner(found[0]) == self.holder["owner"]:
                self.generation = found[1]
                return True
            logger.error("lost the lease %s to another trainer: this run stops at its next log or save step, "
                         "without saving", self.where)
            self.generation = None
            self._lost.set()
            return False
        self.generation = generation
        return True

    def start_heartbeat(self, every_s: float = LEASE_HEARTBEAT_S) -> None:
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    if not self.heartbeat():
                        return
                except Exception as error:  # noqa: BLE001 - a bucket failing now may answer the next beat;
                    # a dead thread would let the lease go stale while the run goes on
                    logger.warning("lease %s: the heartbeat failed (%s: %s); next try in %.0f s", self.where,
                                   type(error).__name__, one_line(error), every_s)

        self._beating = threading.Thread(target=beat, name="workdir-lease", daemon=True)
        self._beating.start()

    def lost(self) -> bool:
        """Did a heartbeat find that another trainer owns the lease now?"""
        return self._lost.is_set()

    def release(self) -> None:
        self._stop.set()  # a lost lease has no generation: the new owner's object is not deleted
        if self._beating is not None and self._beating is not threading.current_thread():
            self._beating.join(timeout=30)  # a beat in flight would race the delete below (a hung one: not forever)
        if self.generation is not None:
            self.store.delete(self.generation)
            self.generation = None


def acquire(workdir: str | os.PathLike, *, process_index: int = 0, process_count: int = 1,
            agree: Callable[[bool], bool] | None = None) -> FileLock | Lease | None:
    """Takes the workdir's lock on process 0 (None elsewhere); WorkdirBusyError on every process when process 0
    cannot. `agree(failed) -> any process failed` is the collective of a multi-host run."""
    held: FileLock | Lease | None = None
    error: WorkdirBusyError | None = None
    if process_index == 0:
        try:
            text = os.fspath(workdir)
            if text.startswith("gs://"):
                lease = Lease(GcsLeaseStore(f"{text.rstrip('/')}/{LEASE_FILE}"), f"{text.rstrip('/')}/{LEASE_FILE}")
                held = lease.acquire()
                lease.start_heartbeat()
            else:
                held = FileLock(pathlib.Path(text)).acquire()
        except WorkdirBusyError as busy:
            error = busy
    if process_count > 1 and agree is not None and agree(error is not None) and error is None:
        if held is not None:
            held.release()
        error = WorkdirBusyError(f"workdir {workdir}: process 0 could not lock it (see its log)")
    if error is not None:
        raise error
    return held


def acquire_for_run(workdir: str | os.PathLike) -> FileLock | Lease | None:
    """`acquire` for this process of the running jax job (the trainer's call; every process calls it)."""
    import jax
    import numpy as np

    from geoalign_jax.parallel import multihost

    return acquire(workdir, process_index=jax.process_index(), process_count=jax.process_count(),
                   agree=lambda failed: bool(np.any(multihost.gather_host_values(np.int32(failed)))))


__all__ = ["FileLock", "GcsLeaseStore", "LEASE_FILE", "LEASE_STALE_S", "LOCK_FILE", "Lease", "WorkdirBusyError",
           "acquire", "acquire_for_run"]
