"""What an evaluation number was computed from, recorded beside it in results.json.

A published zero-shot or retrieval number is only reproducible when the reader knows the exact records,
prompts, protocol, tie rule and weights behind it. Each task therefore records (``task_provenance``) the
dataset name, path and split, the number of evaluated records, and a **content hash**; the run records the
model (``model_provenance``: config and a parameter hash) and the software (``software_provenance``).

The content hash is order-independent: every evaluated item (one image with what it is scored against: its
class, its captions, its labelled regions) is hashed on its own (``item_digest``), and the hash of the set
is the SHA-256 of the sorted item digests with their count (``ContentHash``). So it does not change with
the record order, the number of shards, or how the records were split between processes (partial hashes
merge with ``ContentHash.update``), and it changes when one image byte or one caption character does.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from geoalign_jax.data import filesystem

CONTENT_HASH_SCHEME = "geoalign-eval-content/1"
PARAMETER_HASH_SCHEME = "geoalign-params-sha256/1"
#: Distributions whose versions can change an evaluation's numbers or its reading of the data.
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "pillow", "grain", "array-record", "msgpack", "ftfy", "regex",
            "orbax-checkpoint", "open-clip-torch", "torch", "transformers")


def item_digest(image_sha256: bytes, **texts: Any) -> bytes:
    """SHA-256 of one evaluated item: its image's SHA-256 and the texts / labels it is scored against,
    serialised as canonical JSON (sorted keys, no whitespace, UTF-8)."""
    payload = {"image": image_sha256.hex(), **texts}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


class ContentHash:
    """Order-independent hash of a multiset of item digests; ``update`` merges partial hashes (e.g. per
    process or per shard) into the hash of their union."""

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self._digests: list[bytes] = []
        for digest in digests:
            self.add(digest)

    def add(self, digest: bytes) -> None:
        if len(digest) != 32:
            raise ValueError(f"item digests are 32-byte SHA-256 values, got {len(digest)} bytes")
        self._digests.append(bytes(digest))

    def update(self, other: "ContentHash") -> None:
        self._digests.extend(other._digests)

    @property
    def count(self) -> int:
        return len(self._digests)

    def hexdigest(self) -> str:
        hasher = hashlib.sha256(f"{CONTENT_HASH_SCHEME}\n{self.count}\n".encode())
        for digest in sorted(self._digests):
            hasher.update(digest)
        return hasher.hexdigest()


def image_digests(images: Any) -> list[bytes]:
    """SHA-256 of every image's encoded bytes (records are read again; images are not decoded)."""
    return [hashlib.sha256(images.image_bytes(index)).digest() for index in range(len(images))]


# ---------------------------------------------------------------------------------------------------------
# Items of each kind of evaluation set (datasets.ClassificationSet / RetrievalSet / RegionSet).


def classification_items(data: Any, digests: Sequence[bytes]) -> list[bytes]:
    """An image with its class: the class id (folder / raw name) and the name its prompts use."""
    return [item_digest(digest, label=data.class_ids[label], prompt_name=data.class_names[label])
            for digest, label in zip(digests, data.labels.tolist())]


def retrieval_items(data: Any, digests: Sequence[bytes]) -> list[bytes]:
    """An image with its captions (sorted: the protocols score each caption on its own, order-free)."""
    return [item_digest(digest, captions=sorted(captions)) for digest, captions in zip(digests, data.captions)]


def region_items(data: Any, digests: Sequence[bytes]) -> list[bytes]:
    """An image with its (box, category name) regions, sorted."""
    return [item_digest(digest, regions=sorted([[float(v) for v in box], data.category_names[category]]
                                               for box, category in image_regions))
            for digest, image_regions in zip(digests, data.regions)]


def segmentation_items(data: Any, digests: Sequence[bytes]) -> list[bytes]:
    """An image with its mask file and the class names (seg_data.SegmentationSet)."""
    return [item_digest(digest, mask=hashlib.sha256((data.root / entry["mask"]).read_bytes()).hexdigest(),
                        classes=data.classes, ignore_index=data.ignore_index,
                        reduce_zero_label=data.reduce_zero_label)
            for digest, entry in zip(digests, data.images.entries)]


_ITEMS = {"zeroshot": classification_items, "retrieval": retrieval_items, "regions": region_items,
          "segmentation": segmentation_items}


def content_hashes(kind: str, data: Any, digests: Sequence[bytes]) -> dict[str, str]:
    """{"content_sha256": items of the set, "images_sha256": its images alone} (both order-independent)."""
    if len(digests) != len(data.images):
        raise ValueError(f"{len(digests)} image digests for {len(data.images)} images")
    return {"content_sha256": ContentHash(_ITEMS[kind](data, digests)).hexdigest(),
            "images_sha256": ContentHash(digests).hexdigest()}


def task_provenance(spec: Any, data: Any, digests: Sequence[bytes], *, dataset: str, split: str | None,
                    ties: str, protocol: Mapping[str, Any], templates: Sequence[str] | None) -> dict[str, Any]:
    """The per-task record in results.json (see the module docstring)."""
    entry: dict[str, Any] = {
        "kind": spec.kind, "dataset": dataset, "path": str(Path(spec.path).resolve()), "split": split,
        "records": len(data.images), "limit": spec.limit, "skipped": dict(data.skipped),
        **content_hashes(spec.kind, data, digests),
        "protocol": dict(protocol), "ties": ties,
    }
    if spec.kind == "retrieval":
        entry["captions"] = sum(len(c) for c in data.captions)
    if spec.kind == "regions":
        entry["regions"] = data.num_regions
        entry["categories"] = list(data.category_names)
    if spec.kind == "zeroshot":
        entry["classes"] = len(data.class_ids)
    if templates is not None:
        entry["template_set"] = spec.templates
        entry["templates"] = list(templates)
    return entry


# ---------------------------------------------------------------------------------------------------------
# Model and software.


def _leaf_bytes(leaf: Any) -> np.ndarray:
    """A parameter as a host numpy array (gathered from all processes when sharded across hosts)."""
    import jax

    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.ascontiguousarray(np.asarray(leaf))


def parameter_hash(params: Any) -> str:
    """SHA-256 over every parameter leaf in sorted path order: path, dtype, shape and little-endian bytes.
    Equal for the same weights however they are sharded or placed (all processes must call it when some
    parameters are sharded across hosts)."""
    from geoalign_jax.params_checkpoint import flatten_params

    hasher = hashlib.sha256(PARAMETER_HASH_SCHEME.encode() + b"\n")
    for path, leaf in sorted(flatten_params(params).items()):
        array = _leaf_bytes(leaf)
        array = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array
        hasher.update(f"{path}\0{array.dtype.name}\0{list(array.shape)}\0".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def torch_parameter_hash(module: Any) -> str:
    """The same scheme over a torch module's state dict (open_clip names, so it differs from the JAX hash
    of the same weights)."""
    hasher = hashlib.sha256(PARAMETER_HASH_SCHEME.encode() + b"\n")
    for name, tensor in sorted(module.state_dict().items()):
        array = np.ascontiguousarray(tensor.detach().cpu().float().numpy() if tensor.is_floating_point()
                                     else tensor.detach().cpu().numpy())
        hasher.update(f"{name}\0{tensor.dtype}\0{list(array.shape)}\0".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def model_provenance(model_config: Any, params: Any, embedder: Any) -> dict[str, Any]:
    """The model config and parameter hash: of the JAX weights, or of an open_clip embedder's torch module."""
    from geoalign_jax.eval import embed

    entry: dict[str, Any] = {"embedder": type(embedder).__name__}
    if isinstance(embedder, embed.JaxEmbedder):
        model_config, params = embedder.config, embedder.params
        entry["dense"] = embedder.dense
    if model_config is not None and params is not None:
        entry["config"] = model_config.to_dict() if hasattr(model_config, "to_dict") else str(model_config)
        entry["parameter_hash"] = parameter_hash(params)
        entry["parameter_hash_scheme"] = f"{PARAMETER_HASH_SCHEME} (JAX parameter paths)"
    elif isinstance(embedder, embed.OpenClipEmbedder):
        entry["parameter_hash"] = torch_parameter_hash(embedder.model)
        entry["parameter_hash_scheme"] = f"{PARAMETER_HASH_SCHEME} (torch state-dict names)"
    else:
        entry["parameter_hash"] = None  # an embedder of unknown weights: say so rather than guess
    return entry


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (those not installed are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """geoalign-jax's version and, in a git checkout, its commit and whether tracked files were modified.
    Only a repository whose top level is the package's own root counts: an installed copy inside some other
    repository (a venv in a project checkout) has no commit, rather than that project's."""
    root = Path(__file__).resolve().parents[2]
    entry: dict[str, Any] = {"version": _project_version(root)}
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != root:
            raise subprocess.SubprocessError(f"{root} is inside another repository ({top})")
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        entry.update(git_commit=commit, git_modified=bool(status.strip()))
    except (OSError, subprocess.SubprocessError):
        entry.update(git_commit=None, git_modified=None)
    return entry


def _project_version(root: Path) -> str | None:
    try:
        return metadata.version("geoalign-jax")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return None


def software_provenance() -> dict[str, Any]:
    """Python, platform, JAX backend and device count, package versions, geoalign-jax code version."""
    import jax

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "jax_backend": jax.default_backend(), "devices": jax.device_count(),
            "packages": package_versions(), "geoalign_jax": dict(code_version())}


def trainer_run_info(workdir: Path, step: int, config_file: Path, eval_config: Any, model_config: Any,
                     train_shards: str, train_split: str) -> dict[str, Any]:
    """The `run` block of a results.json written during training: which weights (workdir and step), which
    tasks and options, and which training data the overlap was checked against."""
    return {
        "weights": f"{workdir} step {step}", "trainer": {"workdir": str(workdir), "step": step, "config": str(config_file)},
        "tasks": list(eval_config.tasks), "batch_size": int(eval_config.batch_size),
        "model_config": model_config.to_dict(), "allow_train_split": bool(eval_config.allow_train_split),
        "train_data": [filesystem.absolute(train_shards)], "train_split": str(train_split),
        "exclude_overlap": bool(eval_config.exclude_overlap),
    }


def protocol_description(spec: Any, *, ties: str, dense: str | None = None) -> dict[str, Any]:
    """How the task scores: metric definitions and options that change the numbers."""
    from geoalign_jax.eval import retrieval

    if spec.kind == "zeroshot":
        return {"name": "zero-shot classification", "metrics": ["top1", "top5", "mean_per_class"],
                "prompt_ensemble": "mean of L2-normalised prompt embeddings, normalised again", "ties": ties}
    if spec.kind == "retrieval":
        return {"name": "image-text retrieval", "ties": ties, "text": getattr(spec, "text", "short"),
                "protocols": [dataclasses.asdict(retrieval.get_protocol(name)) for name in spec.protocols]}
    return {"name": "region classification", "methods": list(spec.methods), "ties": ties,
            "roi_patch_tokens": dense, "prompt_ensemble": "as zero-shot, over category names"}
