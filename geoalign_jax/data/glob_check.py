"""A shard glob must not read two datasets as one.

A prepared folder is a dataset only through its manifest; a glob of its shards bypasses it. While `prepare`
puts a new dataset into a folder (or after it failed there, e.g. a killed `prepare --overwrite`), the folder
holds old and new shards side by side: the old manifest is gone (so reading the folder is refused) but a glob
would still match both. So a glob's matches are checked folder by folder:

* a folder holding `records.UNFINISHED_NAME` (written by `prepare` before it renames or uploads its first
  shard, deleted once the new manifest is in place) and no manifest is refused;
* in a folder with a manifest, every matched shard must be one the manifest lists (others are left from an
  earlier run: the old shards an overwrite had not deleted yet). A marker beside a manifest does not matter:
  `prepare` removes the old manifest before it puts the first new shard into place and writes the new one
  after the last, so the shards a manifest lists are always one whole dataset (a run killed between writing
  the manifest and deleting the marker leaves a good folder, read as such);
* shards in a folder without a manifest (copied bare, written by another tool) are taken as they are.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from geoalign_jax.data import filesystem, records


def mixed_dataset_problem(paths: Sequence[str], pattern: str, read_manifest: Callable[[str], Mapping[str, Any]],
                          manifest_name: str) -> str | None:
    """One line naming the folder and shards when the glob ``pattern``'s matches ``paths`` may mix two
    datasets (or a storage error naming the object); None when they may be read. ``read_manifest(folder)``:
    the checked manifest of a folder (its errors propagate)."""
    folders: dict[str, list[str]] = {}
    for path in paths:
        folders.setdefault(filesystem.dirname(path), []).append(path)
    for folder, members in folders.items():
        manifest_path = filesystem.join(folder, manifest_name)
        unfinished_path = filesystem.join(folder, records.UNFINISHED_NAME)
        try:
            absent = set(filesystem.missing_files([manifest_path, unfinished_path]))  # one listing in a bucket
        except filesystem.StorageError as error:  # refused or still failing: it names the object
            return str(error)
        if manifest_path in absent and unfinished_path not in absent:
            return (f"{pattern}: {folder} is being written by `prepare`, or a run of it did not finish "
                    f"({records.UNFINISHED_NAME} is there), so its shards may mix two datasets; rerun that "
                    "prepare command with --overwrite")
        if manifest_path in absent:
            continue
        listed = {shard for entry in read_manifest(folder)["splits"].values() for shard in entry.get("shards", [])}
        unlisted = [path for path in members if os.path.basename(path) not in listed]
        if unlisted:
            return (f"{pattern} matches shards that {manifest_path} does not list (left from another run, e.g. a "
                    f"failed `prepare --overwrite`): {unlisted[:5]}{' ...' if len(unlisted) > 5 else ''}; read "
                    f"the folder {folder} (its manifest) instead, or delete them")
    return None
