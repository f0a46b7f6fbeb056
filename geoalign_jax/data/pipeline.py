"""The grain training input pipeline: shards -> per-process slice -> augmented, tokenised, fixed-shape batches.

Order of operations (``make_train_dataset``)::

    MapDataset.source(RecordSource(shards, raw=True))   # raw bytes; decoding happens after slicing
      .map_with_index(attach the source index)           # so a bad record can be named (shard + index)
      .seed(seed).shuffle()                              # global, seeded, different every epoch
      .repeat(num_epochs)                                # None = forever
      .random_map(DecodeAndTransform, seed=augmentation_seed(seed))  # lazy; RNG from the GLOBAL position
      [process_index::process_count]                     # disjoint and covering per-host slices
      .to_iter_dataset(ReadOptions)                      # threads within each worker
      -> SkipAndCount                                    # drop records that failed, count them in the data
      .batch(per-host batch, drop_remainder=True)        # fixed shapes
      .mp_prefetch(worker_count)                         # spawned worker processes, when worker_count > 0
      -> DecodeErrorTotal                                # running total of skipped records (main process)

Why the random map comes before the per-host slice: grain seeds each example's generator from the element's
index in the dataset the map is applied to (Philox keyed by the seed, counter = index). Applied to the global
shuffled, repeated stream, that index is the record's global position (epoch * records + position in the
epoch's shuffle), so a record's crop, flip, caption, hard-negative and region draws depend only on (seed, epoch,
global position): never on the number of hosts, worker processes (grain slices workers above the map too) or
threads. Applied after the slice it would be the host-local position, and the k-th example of every host would
get the same augmentation. MapDataset maps are lazy: each host still decodes only the records of its slice.

Why the skip count travels with the data: with multiprocess workers no global counter can be right, and a
counter must be part of the checkpointed iterator state to survive a restart. Each example carries the number
of records its worker skipped just before it (``_skipped``); the main-process ``DecodeErrorTotal`` adds them up
and keeps the running total in its own iterator state, so ``batch["decode_errors"]`` is exact for any number
of workers and resumes with the iterator. (A skip is reported with the next good example, so skips after the
last example of a finite stream go unreported; training streams repeat forever.)

Everything passed to grain is a small top-level class (no lambdas, no closures): grain's workers are spawned
and unpickle the whole pipeline; this module has no import-time side effects for the same reason.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from geoalign_jax import batch_contract
from geoalign_jax.data import records, sources, transforms
from geoalign_jax.data.pipeline_stages import (
    DECODE_ERRORS_KEY, AttachIndex, DecodeAndTransform, DecodeErrorTotalIterDataset, SkipAndCountIterDataset,
)



def default_data_config() -> ml_collections.ConfigDict:
    """The data config with every field documented once (the single reference for these names)."""
    config = ml_collections.ConfigDict()
    # --- what to read
    config.train_shards = ""  # a prepared folder (with manifest.json) or a glob of *.array_record shards
    config.train_split = "train"  # split name: the manifest's split, or the <name>-<split>-NNNNN-of-NNNNN filter
    # --- batch
    config.batch_size = 256  # GLOBAL batch size; each host yields batch_size // process_count (must divide)
    # --- global view
    config.image_size = 224  # square output side of `image`, pixels
    config.random_resized_crop = True  # False: the whole image squashed to image_size (FarSLIP's global view)
    config.random_resized_crop_scale = (0.5, 1.0)  # area fraction range of the global crop (torchvision)
    config.random_resized_crop_ratio = (3 / 4, 4 / 3)  # aspect-ratio range of the global crop
    config.hflip_prob = 0.5  # probability of a left-right flip (image, boxes, local crops together)
    config.interpolation = "bicubic"  # resize filter of every view: "bicubic" (open_clip, FarSLIP) or "bilinear"
    # --- text
    config.context_length = 77  # tokens of `text`, `hard_negatives`, `region_text`
    config.long_context_length = 248  # tokens of `long_text` (Long-CLIP); 0 = no long_text key
    config.num_hard_negatives = 0  # K: hard negatives per image, padded + `hard_negative_mask`; 0 = off
    # --- regions
    config.max_regions = 0  # R: boxes per image after augmentation, padded + `region_mask`; 0 = off
    config.min_box_visible_fraction = 0.25  # a box keeps >= this fraction of its area inside the crop, else dropped
    config.min_box_size_px = 2.0  # ... and at least this many output pixels wide and high
    # Source-pixel bounds on a box's area, checked before any crop (FarSLIP data.py: `--min-size 64
    # --max-size 1024` keep boxes of area in [64^2, 1024^2] pixels of the original image): a box is used
    # only when area >= region_min_source_size ** 2 and, if region_max_source_size > 0, <= its square.
    config.region_min_source_size = 0.0
    config.region_max_source_size = 0.0
    config.region_crop_size = 0  # side of `region_crops`: each whole box of the ORIGINAL image, unflipped (region_cls)
    # side of `region_view_crops`: the part of each box inside the augmented global view, flipped with it: the
    # pixels RoI-Align pools at `region_boxes` (global_region_consistency); 0 = off
    config.region_view_crop_size = 0
    config.category_prompt = transforms.DEFAULT_CATEGORY_PROMPT  # region text when a region has no caption
    # category name -> id for `region_category`. Empty (default): the record's own category_id, assigned by the
    # preparation from the dataset's sorted category names (manifest 'category_names'), identical on every host and
    # worker because it is data. Give a mapping to unify several datasets; names missing from it get -1. Shards
    # of several datasets with different category_names (or without manifests) and regions on need a mapping.
    config.category_ids = ml_collections.ConfigDict()
    # --- local crops (FarSLIP multicrop, patch-to-patch distillation)
    config.num_local_crops = 0  # C: local views per image + `local_crop_boxes`; 0 = off
    config.local_crop_size = 0  # side of `local_crops`; 0 = image_size
    config.local_crop_scale = (0.3, 0.7)  # area fraction of the global view covered by a local crop
    config.local_crop_ratio = (3 / 4, 4 / 3)  # aspect-ratio range of a local crop
    # --- order, epochs, workers
    config.seed = 0  # shuffle + augmentation seed (same seed, same stream)
    config.shuffle = True  # global seeded shuffle, reshuffled every epoch
    config.num_epochs = ml_collections.FieldReference(None, field_type=int)  # None = repeat forever
    config.worker_count = 0  # grain worker processes (mp_prefetch); 0 = in the main process
    config.worker_buffer_size = 2  # batches buffered per worker
    config.read_threads = 4  # threads per process that decode + augment examples (PIL releases the GIL)
    config.read_buffer_size = 32  # examples prefetched per process by those threads
    config.max_consecutive_skips = 1000  # more skipped records than this in a row is a broken dataset: raise
    return config


def per_host_batch_size(batch_size: int, process_count: int) -> int:
    """Global batch -> the batch each host yields; refuses sizes that do not divide evenly."""
    if batch_size <= 0:
        raise ValueError(f"data config: batch_size must be positive, got {batch_size}")
    if batch_size % process_count:
        raise ValueError(
            f"data config: batch_size {batch_size} (global) is not divisible by process_count {process_count}; "
            f"use a multiple of {process_count}"
        )
    return batch_size // process_count


def transform_config(config: ml_collections.ConfigDict) -> transforms.TransformConfig:
    """The frozen per-example part of the data config (what workers need)."""
    category_ids = config.get("category_ids") or {}
    if not isinstance(category_ids, Mapping):
        category_ids = dict(category_ids)
    for name, value in category_ids.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"data config: category_ids[{name!r}] must be an int >= 0, got {value!r}")
    return transforms.TransformConfig(
        image_size=int(config.image_size),
        context_length=int(config.context_length),
        long_context_length=int(config.long_context_length),
        num_hard_negatives=int(config.num_hard_negatives),
        max_regions=int(config.max_regions),
        region_crop_size=int(config.region_crop_size),
        region_view_crop_size=int(config.region_view_crop_size),
        num_local_crops=int(config.num_local_crops),
        local_crop_size=int(config.local_crop_size),
        local_crop_scale=tuple(float(v) for v in config.local_crop_scale),
        local_crop_ratio=tuple(float(v) for v in config.local_crop_ratio),
        random_resized_crop=bool(config.random_resized_crop),
        random_resized_crop_scale=tuple(float(v) for v in config.random_resized_crop_scale),
        random_resized_crop_ratio=tuple(float(v) for v in config.random_resized_crop_ratio),
        hflip_prob=float(config.hflip_prob),
        min_box_visible_fraction=float(config.min_box_visible_fraction),
        min_box_size_px=float(config.min_box_size_px),
        region_min_source_size=float(config.region_min_source_size),
        region_max_source_size=float(config.region_max_source_size),
        category_prompt=str(config.category_prompt),
        category_ids=tuple(sorted((str(k), int(v)) for k, v in category_ids.items())),
        interpolation=str(config.interpolation),
    )


def batch_spec(config: ml_collections.ConfigDict, process_count: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Keys, per-host shapes and dtypes of the batches ``make_train_dataset(config)`` yields (incl. the metric);
    every key is one that ``geoalign_jax.batch_contract.BATCH_KEYS`` names and describes."""
    batch = per_host_batch_size(int(config.batch_size), process_count)
    spec = {key: ((batch, *shape), dtype) for key, (shape, dtype) in transforms.output_spec(transform_config(config)).items()}
    spec[DECODE_ERRORS_KEY] = ((), np.dtype(np.int64))
    batch_contract.check_known_keys(spec, "the data pipeline's batch")
    return spec


def pop_host_metrics(batch: dict[str, Any]) -> dict[str, int]:
    """Remove and return the host-side scalars (``decode_errors``) so the rest can become global arrays."""
    return {DECODE_ERRORS_KEY: int(batch.pop(DECODE_ERRORS_KEY))} if DECODE_ERRORS_KEY in batch else {}


# ----------------------------------------------------------------------------------------------------------
# Building the datasets


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: tests and tools pass both and never initialise jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    return process_index, process_count


def _ensure_absl_flags_parsed() -> None:
    """grain's mp_prefetch reads an absl flag (grain_enable_multiprocess_worker_profiling, whenever jax's
    profiler is importable); outside ``absl.app.run`` the flags are unparsed and that read raises
    UnparsedFlagAccessError. Mark them parsed with their defaults, leaving already-parsed flags alone."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _manifest_category_names(folder: str, name: str) -> list[str] | None:
    """The ``category_names`` of dataset ``name``'s manifest in ``folder`` ([] when it lists none), or None when
    no manifest there describes that dataset (bare shards copied elsewhere)."""
    try:
        manifest = sources.read_manifest(folder)
    except sources.SourceError:
        return None
    if manifest.get("name") != name:
        return None
    return [str(category) for category in manifest.get("category_names") or []]


def check_category_numbering(config: ml_collections.ConfigDict, paths: Sequence[str]) -> None:
    """Refuse training shards from several datasets whose regions' ``category_id`` values may disagree.

    Without ``category_ids`` the pipeline uses each record's stored ``category_id``, which its preparation
    numbered from that dataset's own sorted category names: "ship" may be 3 in one dataset and 7 in another,
    so mixing them would train the category losses on wrong labels. Allowed when regions are off
    (``max_regions == 0``), with an explicit ``category_ids`` mapping, or when every dataset's manifest lists
    the same ``category_names`` (datasets without categories do not count).
    """
    if not int(config.max_regions) or len(dict(config.get("category_ids") or {})):
        return
    groups = sources.group_by_dataset(paths)
    if len(groups) <= 1:
        return
    names = {key: _manifest_category_names(*key) for key in groups}
    unknown = [f"{os.path.join(folder, name)}*" for (folder, name), found in names.items() if found is None]
    numberings = {tuple(found) for found in names.values() if found}
    if not unknown and len(numberings) <= 1:
        return
    described = ", ".join(f"{os.path.join(folder, name)}* ({len(members)} shards)"
                          for (folder, name), members in groups.items())
    reason = (f"no manifest.json beside {', '.join(unknown)} says which categories its ids number" if unknown
              else "their manifests' category_names differ")
    raise ValueError(
        f"data config: train_shards {config.train_shards!r} spans {len(groups)} datasets ({described}) and "
        f"data.category_ids is empty; each converter numbers its own categories, so the records' category_id "
        f"values may mean different categories in different datasets ({reason}). Set data.category_ids "
        "(category name -> id) to give all of them one numbering."
    )


def open_train_source(config: ml_collections.ConfigDict) -> sources.RecordSource:
    """The raw-bytes source over the training shards named by ``train_shards`` + ``train_split``
    (refused when they mix datasets with separate category numberings, see ``check_category_numbering``).
    Every shard's index is read here, so a missing or truncated shard fails before anything compiles; a
    record whose bytes cannot be read later comes back marked and becomes a counted skip."""
    if not config.train_shards:
        raise ValueError("data config: train_shards is empty (give a converted folder or a shard glob)")
    paths = sources.shard_paths(config.train_shards, config.train_split)
    check_category_numbering(config, paths)
    return sources.RecordSource(paths, raw=True, unreadable="mark")


#: Arbitrary fixed constant that separates the augmentation seed from other seeds derived from ``config.seed``.
_AUGMENTATION_STREAM = 0x6A0A_1C1F


def augmentation_seed(seed: int) -> int:
    """The key of every example's augmentation generator for data seed ``seed`` (a uint32, as grain wants).

    Derived rather than ``seed`` itself so the augmentation stream is not keyed like the shuffle; and explicit
    rather than grain's default (which hashes the seed with the map's depth in the dataset graph), so the draws
    stay the same when the graph around the map changes (shuffle on or off, the per-host slice).
    """
    if int(seed) < 0:
        raise ValueError(f"data config: seed must be an int >= 0, got {seed}")
    return int(np.random.SeedSequence([int(seed), _AUGMENTATION_STREAM]).generate_state(1, dtype=np.uint32)[0])


def make_global_record_dataset(
    config: ml_collections.ConfigDict, source: sources.RecordSource
) -> grain.MapDataset:
    """The (source index, raw record) stream of ALL hosts: shuffled (reshuffled every epoch) and repeated.

    Position ``i`` of this dataset is the record's global position: the same on every host, for any number of
    hosts. ``make_record_dataset`` slices it per host; ``make_train_dataset`` maps it first, then slices.
    """
    if len(source) == 0:
        raise ValueError(f"data config: no records in {config.train_shards} split {config.train_split!r}")
    dataset = grain.MapDataset.source(source).map_with_index(AttachIndex(len(source))).seed(int(config.seed))
    if config.shuffle:
        dataset = dataset.shuffle()
    num_epochs = config.num_epochs
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"data config: num_epochs must be None (forever) or >= 1, got {num_epochs}")
    return dataset.repeat(num_epochs)


def make_record_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: sources.RecordSource | None = None,
) -> grain.MapDataset:
    """This host's (source index, raw record) stream: the global stream sliced ``[process_index::count]``.

    Slicing after shuffle + repeat makes the hosts' slices disjoint and together exactly the (repeated) data:
    with ``num_epochs=1`` every record goes to exactly one host. With a finite ``num_epochs`` the hosts' lengths
    may differ by one example, so the last per-host batch counts can differ: train with ``num_epochs=None`` and
    stop by steps (as the trainer does), which also keeps multi-host steps in lock-step.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    source = source if source is not None else open_train_source(config)
    return make_global_record_dataset(config, source)[process_index::process_count]


def make_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This host's training batches: dicts of fixed-shape numpy arrays (``batch_spec(config)``).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``; pass them to
    build another host's stream without jax.distributed (tests, data inspection). The example at global
    position ``g`` (host ``g % process_count``) is the same array for any process, worker and thread count.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    batch_size = per_host_batch_size(int(config.batch_size), process_count)
    example_config = transform_config(config)
    source = open_train_source(config)
    # Map before slicing (see the module docstring): the generator is seeded by the global position.
    dataset = make_global_record_dataset(config, source).random_map(
        DecodeAndTransform(source, example_config), seed=augmentation_seed(int(config.seed))
    )
    dataset = dataset[process_index::process_count]
    read_options = grain.ReadOptions(
        num_threads=int(config.read_threads), prefetch_buffer_size=int(config.read_buffer_size)
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    iter_dataset = SkipAndCountIterDataset(iter_dataset, int(config.max_consecutive_skips))
    iter_dataset = iter_dataset.batch(batch_size, drop_remainder=True)
    if int(config.worker_count) > 0:
        _ensure_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(config.worker_count), per_worker_buffer_size=int(config.worker_buffer_size)
            )
        )
    return DecodeErrorTotalIterDataset(iter_dataset)


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    state: Mapping[str, Any] | bytes | None = None,
) -> grain.DatasetIterator:
    """An iterator over ``make_train_dataset``; with ``state`` it continues exactly where that state was taken.

    The iterator works with orbax directly (``grain.checkpoint.CheckpointSave(it)`` /
    ``CheckpointRestore(it)``), or through ``iterator_state``/``restore_iterator_state``.
    Call ``close()`` when done (worker processes).
    """
    iterator = iter(make_train_dataset(config, process_index=process_index, process_count=process_count))
    if state is not None:
        restore_iterator_state(iterator, state)
    return iterator


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (what grain's orbax handler writes per process)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: Mapping[str, Any] | bytes | str) -> None:
    """Move ``iterator`` to ``state`` (from ``iterator_state`` or ``get_state``): the next batch is the one that
    would have followed when the state was taken. Refuses a state of another pipeline layout."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    if not isinstance(state, Mapping) or "parent" not in state or DECODE_ERRORS_KEY not in state:
        raise ValueError(
            "iterator state is not from geoalign_jax.data.pipeline (expected keys 'parent' and "
            f"'{DECODE_ERRORS_KEY}', got {sorted(state) if isinstance(state, Mapping) else type(state).__name__})"
        )
    iterator.set_state(dict(state))


def take(iterator: Iterator[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """The next ``count`` batches (helper for tests and tools)."""
    return [next(iterator) for _ in range(count)]


def num_batches_per_epoch(num_records: int, config: ml_collections.ConfigDict, process_count: int = 1) -> int:
    """Full per-host batches in one epoch when no record is skipped (for step <-> epoch bookkeeping)."""
    per_host_records = num_records // process_count  # the smallest host slice
    return per_host_records // per_host_batch_size(int(config.batch_size), process_count)


__all__: Sequence[str] = (
    "DECODE_ERRORS_KEY",
    "augmentation_seed",
    "batch_spec",
    "default_data_config",
    "iterator_state",
    "make_global_record_dataset",
    "make_record_dataset",
    "make_train_dataset",
    "make_train_iterator",
    "num_batches_per_epoch",
    "per_host_batch_size",
    "pop_host_metrics",
    "restore_iterator_state",
    "transform_config",
)
