"""`prepare --out gs://bucket/folder`: prepare into a local staging folder, then publish it to the bucket in
the order that keeps a reader safe, as the local writer does (data/writers.py `write_dataset`):

1. refuse at once, before preparing, when the bucket folder holds a dataset and ``--overwrite`` is not given;
2. prepare into a staging folder on local disk (the shard writer's atomic output; nothing is uploaded when
   the preparation fails or is interrupted);
3. upload the marker ``records.UNFINISHED_NAME`` (a shard glob refuses a folder holding it), then, with
   ``--overwrite``, delete the old ``manifest.json``, so no reader takes old and new shards for one dataset
   while the shards are replaced;
4. upload every shard and sidecar (a GCS object becomes visible only once its upload is complete);
5. upload ``manifest.json`` last: only now is the folder a dataset a trainer reads; then delete the marker;
6. delete the old shards the new manifest does not list (until then a glob that matches them is refused:
   the manifest does not list them, data/glob_check.py).

Every failure is one line naming the object. One in 6, or in deleting the marker, leaves a published dataset
and is a warning (a marker beside a manifest changes nothing, data/glob_check.py). A run that fails in 3-5
leaves no manifest and the marker, so `sources.shard_paths` refuses the folder ("no
manifest.json") and any shard glob into it, and the next run with ``--overwrite`` replaces what it left.
Staging needs local disk for one dataset.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable

from geoalign_jax.data import filesystem, records
from geoalign_jax.error_text import one_line

MANIFEST_NAME = "manifest.json"


class BucketOutputError(RuntimeError):
    """The bucket folder cannot take the dataset (a dataset already there, an upload that failed)."""


def _bucket_fs():
    filesystem.configure()
    import fsspec

    return fsspec.filesystem("gs")


def _key(location: str) -> str:
    return location[len(filesystem.GCS_PREFIX):]


def _step(operation: Callable[[], object], doing: str, state: str) -> None:
    """``operation()`` with `filesystem.retry`; a failure as a one-line BucketOutputError saying what was
    being done and in what state the bucket folder is."""
    try:
        filesystem.retry(operation, what=doing)
    except Exception as error:  # noqa: BLE001 - a refused write, an outage past the retries
        raise BucketOutputError(f"{doing} failed ({one_line(error, limit=None)}); {state}") from None


def check_target(out: str, overwrite: bool) -> list[str] | None:
    """The shard names of the dataset already in ``out`` (None when there is none); BucketOutputError without
    ``overwrite`` when there is one."""
    manifest_location = filesystem.join(out, MANIFEST_NAME)
    if not filesystem.isfile(manifest_location):
        return None
    if not overwrite:
        raise BucketOutputError(f"{out} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to replace it")
    manifest = json.loads(filesystem.read_bytes(manifest_location))
    names = [shard for split in (manifest.get("splits") or {}).values() for shard in split.get("shards", [])]
    names += [sidecar for sidecars in (manifest.get("image_hashes") or {}).values() for sidecar in sidecars]
    return [str(name) for name in names]


def publish(staging: str, out: str, old_files: list[str] | None) -> list[str]:
    """Steps 3-6 of the module docstring; returns the uploaded file names, the manifest last."""
    fs = _bucket_fs()
    names = sorted(entry for entry in os.listdir(staging)
                   if os.path.isfile(os.path.join(staging, entry)) and not entry.startswith(".tmp-"))
    if MANIFEST_NAME not in names:
        raise BucketOutputError(f"{staging}: the conversion wrote no {MANIFEST_NAME}; nothing uploaded")
    names.remove(MANIFEST_NAME)
    target = out.rstrip("/")
    marker = filesystem.join(target, records.UNFINISHED_NAME)
    _step(lambda: fs.pipe_file(_key(marker), b""), f"writing {marker}", f"{target} is as it was")
    if old_files is not None:
        old_manifest = filesystem.join(target, MANIFEST_NAME)
        _step(lambda: fs.rm_file(_key(old_manifest)), f"deleting the old {old_manifest}",
              f"the old dataset in {target} is still whole")
    for name in [*names, MANIFEST_NAME]:  # the manifest last: it is what makes the folder a dataset
        destination = filesystem.join(target, name)
        try:
            filesystem.retry(lambda: fs.put_file(os.path.join(staging, name), _key(destination)), what=destination)
        except Exception as error:  # noqa: BLE001 - one line naming the object; no manifest was uploaded
            raise BucketOutputError(f"uploading {destination} failed ({one_line(error, limit=None)}); "
                                    f"{target} holds no {MANIFEST_NAME}, so no trainer reads it; rerun with "
                                    "--overwrite") from None
    # The dataset is complete from here: a marker or old shards left behind are warned about, not fatal (a
    # manifest beside the marker is read as usual; a glob refuses the shards that manifest does not list).
    leftovers = [(records.UNFINISHED_NAME, marker)]
    leftovers += [(name, filesystem.join(target, name)) for name in sorted(set(old_files or []) - set(names))]
    for name, location in leftovers:
        try:
            filesystem.retry(lambda: fs.rm_file(_key(location)), what=location)
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001 - named, and the published dataset stays usable
            print(f"warning: could not delete {location} ({one_line(error, limit=None)}); the dataset is "
                  f"published; delete {name} by hand", file=sys.stderr)
    fs.invalidate_cache()
    return [*names, MANIFEST_NAME]


def run_to_bucket(out: str, overwrite: bool, prepare_into: Callable[[str], int]) -> int:
    """``prepare_into(staging_dir)`` (the prepare CLI's exit status), then `publish` to ``out`` when it is 0."""
    try:
        old_files = check_target(out, overwrite)
    except (BucketOutputError, filesystem.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="geoalign-prepare-") as staging:
        status = prepare_into(staging)
        if status != 0:
            print(f"nothing uploaded to {out}", file=sys.stderr)
            return status
        try:
            uploaded = publish(staging, out, old_files)
        except (BucketOutputError, filesystem.StorageError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"published {len(uploaded)} files to {out} ({MANIFEST_NAME} last)")
    return 0
