"""The evaluation entry point shared by the CLI and the trainer: parameters in, a metrics dict out.

``evaluate(model_config, params, tasks)`` runs zero-shot classification, retrieval and region
classification tasks and returns flat ``{"kind/name/...": value}`` metrics (percentages), e.g.
``zeroshot/aid/top1``, ``retrieval/rsicd/standard/mean_recall``, ``regions/dota/roi/top1``.
``run_tasks`` returns the same metrics plus per-task details (per-class accuracies, recall curves)
for tables and plots, the provenance of every number (``provenance``: data hashes, protocol, templates,
tie rule, model parameter hash, package versions) and notes for the table. Two guards keep numbers
honest: a training split is evaluated only with ``allow_train_split`` (``split_guard``), and with
``train_data`` each task's images are checked against the training images (``overlap``), optionally
leaving the overlapping ones out. The embedding backend is pluggable (``embed.JaxEmbedder`` by default,
``embed.OpenClipEmbedder`` for a torch export), so the same metrics code scores both.

Task syntax (CLI and ``parse_task``): ``KIND:NAME=PATH[,key=value...]``, see ``task_spec`` (``TaskSpec``,
``parse_task``, ``TaskError`` and ``TASK_KINDS`` live there and are importable from here).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence, Union

import numpy as np

from geoalign_jax.data import filesystem
from geoalign_jax.eval import (benchmark_root, classnames, datasets, embed, label_csv, long_text, metrics, overlap,
                               preprocess, prompts, provenance, regions, retrieval, seg_data, seg_task, segmentation,
                               zeroshot)

# The task syntax; re-exported because it is documented as runner.TaskSpec, runner.parse_task, ...
from geoalign_jax.eval.task_spec import TASK_KINDS, TaskError, TaskSpec, parse_task  # noqa: F401

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalReport:
    """metrics: flat name -> value; details: per task prefix, arrays for tables and plots; provenance: what
    the numbers were computed from (model, software, per task data hashes, see ``provenance``); notes: per
    task prefix, warnings the results table prints (training split evaluated, overlap with training data)."""

    metrics: dict[str, float]
    details: dict[str, dict[str, Any]]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)


TrainData = Union[overlap.TrainImages, str, os.PathLike, Sequence[Union[str, os.PathLike]], None]


def evaluate(model_config: Any, params: Any, tasks: Sequence[TaskSpec | str], *,
             embedder: embed.Embedder | None = None, batch_size: int = 64, progress: bool = True,
             ties: metrics.TieRule = "pessimistic", num_threads: int = 2, dense: str = "last",
             allow_train_split: bool = False, train_data: TrainData = None, train_split: str = "train",
             exclude_overlap: bool = False, results_path: str | os.PathLike | None = None,
             run_info: Mapping[str, Any] | None = None,
             skip_bad_records: bool = False) -> dict[str, float]:
    """Run the tasks on the model's weights (or on ``embedder``) and return the flat metrics dict.

    model_config / params: a ``models.clip.CLIPConfig`` and its parameter dict (ignored when an
    ``embedder`` is given). dense: patch tokens for region RoI features ("last" or FarSLIP's
    "segearth"). Compiled towers are cached per config, so calling this every N training steps
    compiles once. With ``results_path``, also writes results.json there (metrics, details,
    ``run_info`` and the provenance); the other options are those of ``run_tasks``. The parameter hash of
    the provenance reads every parameter, so it is computed only with ``results_path`` (when parameters
    are sharded across hosts it gathers them: then every process must pass ``results_path``).
    skip_bad_records: a record that cannot be read is skipped and counted
    (``<task>/skipped/unreadable_records``) instead of failing the task with TaskError.
    """
    report = run_tasks(model_config, params, tasks, embedder=embedder, batch_size=batch_size, progress=progress,
                       ties=ties, num_threads=num_threads, dense=dense, allow_train_split=allow_train_split,
                       train_data=train_data, train_split=train_split, exclude_overlap=exclude_overlap,
                       skip_bad_records=skip_bad_records, describe_model=results_path is not None)
    if results_path is not None:
        from geoalign_jax.eval import report as report_lib

        report_lib.write_results(results_path, report.metrics, report.details, dict(run_info or {}),
                                 provenance=report.provenance, notes=report.notes)
    return report.metrics


def run_tasks(model_config: Any, params: Any, tasks: Sequence[TaskSpec | str], *,
              embedder: embed.Embedder | None = None, batch_size: int = 64, progress: bool = True,
              ties: metrics.TieRule = "pessimistic", num_threads: int = 2, dense: str = "last",
              allow_train_split: bool = False, train_data: TrainData = None, train_split: str = "train",
              exclude_overlap: bool = False, skip_bad_records: bool = False,
              describe_model: bool = True) -> EvalReport:
    """``evaluate`` with per-task details, provenance and notes. Task strings are parsed with ``parse_task``.

    allow_train_split: evaluate a split that is a training split (``is_training_split``: "train",
    "train*", "restval"; also when it is the only split a manifest has); refused otherwise, so train-split
    numbers are never reported by accident (the table marks them when allowed).
    train_data: training images to check every task's images against (``overlap.TrainImages``, or
    prepared folders / shard globs whose ``train_split`` shards are fingerprinted here); the overlap
    is reported per task, and ``exclude_overlap`` evaluates without the overlapping images. skip_bad_records: see ``evaluate``.
    describe_model: record the model config and parameter hash in ``provenance["model"]`` (left out
    otherwise; hashing reads every parameter).
    """
    specs = [parse_task(task) if isinstance(task, str) else task for task in tasks]
    names = [spec.prefix for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskError(f"task names must be unique per kind; repeated: {duplicates}")
    if exclude_overlap and train_data is None:
        raise TaskError("exclude_overlap needs train_data (--exclude-overlap needs --train-data)")
    if embedder is None:
        if model_config is None or params is None:
            raise ValueError("evaluate needs model_config and params, or an embedder")
        embedder = embed.JaxEmbedder(model_config, params, batch_size=batch_size, dense=dense)
    train_images = _train_images(train_data, train_split)
    runner = _Runner(embedder, batch_size, progress, ties, num_threads, dense, allow_train_split, train_images,
                     exclude_overlap, skip_bad_records)
    report = EvalReport({}, {})
    task_provenance = {}
    for spec in specs:
        outcome = runner.run(spec)
        report.metrics.update({f"{spec.prefix}/{key}": float(value) for key, value in outcome.metrics.items()})
        report.details[spec.prefix] = outcome.details
        task_provenance[spec.prefix] = outcome.provenance
        if outcome.notes:
            report.notes[spec.prefix] = outcome.notes
    report.provenance = {"software": provenance.software_provenance(), "tasks": task_provenance}
    if describe_model:
        report.provenance = {"model": provenance.model_provenance(model_config, params, embedder),
                             **report.provenance}
    return report


def check_overlap(tasks: Sequence[TaskSpec | str], train_data: TrainData, *, train_split: str = "train"
                  ) -> dict[str, overlap.OverlapResult]:
    """Which images of each task also occur in the training data (no model needed): per task prefix, an
    ``overlap.OverlapResult`` (``.matches`` names each image and its training copy). For a trainer: call it
    with ``overlap.TrainImages.from_shards(<its training shard paths>)`` before the first evaluation."""
    specs = [parse_task(task) if isinstance(task, str) else task for task in tasks]
    train_images = _train_images(train_data, train_split)
    if train_images is None:
        raise TaskError("check_overlap needs train_data (training folders, shard globs or TrainImages)")
    results = {}
    for spec in specs:
        try:
            data = _load(spec, skip_bad_records=False)
        except (datasets.EvalDataError, FileNotFoundError) as error:
            raise TaskError(f"task {spec.kind}:{spec.name}: {error}") from error
        results[spec.prefix] = overlap.check_images(data.images, provenance.image_digests(data.images), train_images)
    return results


def _train_images(train_data: TrainData, train_split: str) -> overlap.TrainImages | None:
    if train_data is None or isinstance(train_data, overlap.TrainImages):
        return train_data
    try:
        return overlap.TrainImages.from_data(train_data, train_split)
    except overlap.OverlapError as error:
        raise TaskError(str(error)) from None


def training_overlap(tasks: Sequence[str], train_shards: str, train_split: str, *,
                     exclude: bool) -> overlap.TrainImages:
    """The training shards' image fingerprints (read once; every evaluation of a training run checks its tasks
    against them), after logging how many and which images of each task also occur in them. OverlapError when
    `exclude` would leave a task with no image."""
    from geoalign_jax.data import sources

    paths = sources.shard_paths(train_shards, train_split)
    train_images = overlap.TrainImages.from_shards(paths, locations=[filesystem.absolute(train_shards)], split=train_split)
    for prefix, result in check_overlap(list(tasks), train_images).items():
        if not result.matches:
            log.info("eval overlap: %s: none of its %d images occurs in the training shards", prefix, result.checked)
            continue
        if exclude and len(result.matches) == result.checked:
            raise overlap.OverlapError(
                f"eval.exclude_overlap: every one of the {result.checked} images of eval task {prefix} is also in "
                f"the training shards {train_shards}; nothing would be left to evaluate")
        shown = "; ".join(f"{m['eval']} = {m['train']} ({m['match']})" for m in result.matches[:5])
        more = f"; and {len(result.matches) - 5} more" if len(result.matches) > 5 else ""
        log.warning(
            "eval overlap: %s: %d of its %d images also occur in the training shards (%d exact, %d re-encoded), "
            "%s every evaluation (eval.exclude_overlap = %s; each results.json lists them): %s%s", prefix,
            len(result.matches), result.checked, result.exact, result.near_duplicates,
            "left out of" if exclude else "INCLUDED in", exclude, shown, more,
        )
    return train_images


# ---------------------------------------------------------------------------------------------------------
# Split guard.


def is_training_split(split: str) -> bool:
    """A split name that holds training data: "train", "train*" (trainval, train_2, ...) or Karpathy's
    "restval" (the part of val the Karpathy splits train on)."""
    name = split.lower()
    return name.startswith("train") or name == "restval"


def resolve_split(spec: TaskSpec) -> tuple[str | None, str, list[str]]:
    """(split that will be evaluated, dataset name, the manifest's splits) of a task; (None, folder name,
    []) for a tree of class folders, which has no splits, unless the folder is named like a training split
    (``UCM/train``): then that name is its split, so the split guard sees it."""
    from geoalign_jax.data import sources

    root = filesystem.path(spec.path)
    if spec.kind == "segmentation":
        try:
            return seg_data.resolve_split(root, spec.split)
        except datasets.EvalDataError as error:
            raise TaskError(f"task {spec.kind}:{spec.name}: {error}") from None
    if label_csv.is_csv_file(root):  # a benchmark CSV: its name says the split (aid_img_txt_pairs_test.csv)
        split = spec.split or label_csv.split_of_file(root)
        return split, root.absolute().parent.name, []
    if not datasets.is_record_dir(root):
        if is_training_split(root.name):
            return root.name, root.absolute().parent.name, []
        return None, root.name, []
    try:
        manifest = sources.read_manifest(root)
        split = datasets.choose_split(manifest, spec.split, root)
    except (sources.SourceError, datasets.EvalDataError) as error:
        raise TaskError(f"task {spec.kind}:{spec.name}: {error}") from None
    return split, str(manifest.get("name") or root.name), sorted(manifest["splits"])


def split_guard(spec: TaskSpec, split: str | None, splits: Sequence[str], allow: bool) -> str | None:
    """None for a test / val split; for a training split a TaskError, or with ``allow`` the note to print.
    A task naming whose split choice it follows (``split_by``) must be one of those authors' files on their split
    (a TaskError otherwise, whatever the split): then its training split is allowed, and said so."""
    if spec.split_by is not None and (
            problem := benchmark_root.authors_split_problem(spec.split_by, spec.path, split)) is not None:
        raise TaskError(f"task {spec.kind}:{spec.name}: split_by={spec.split_by}: {problem}")
    if split is None or not is_training_split(split):
        return None
    only = " (the only split in its manifest)" if list(splits) == [split] else ""
    if spec.split_by is not None:  # the paper's authors evaluate this split: allowed, and said so
        return benchmark_root.authors_split_note(spec.split_by, split)
    if not allow:
        raise TaskError(f"task {spec.kind}:{spec.name}: split {split!r}{only} is a training split; numbers on "
                        "training data are not test numbers. Name a test split (split=...), name the paper whose authors "
                        f"evaluate it (split_by=..., one of {sorted(benchmark_root.SPLIT_CHOICES)}), or pass "
                        "allow_train_split=True (CLI --allow-train-split) to evaluate it anyway")
    return f"TRAINING split {split!r}{only} evaluated (allowed by --allow-train-split): not a test result"


def _load(spec: TaskSpec, skip_bad_records: bool) -> Any:
    if spec.kind == "segmentation":
        return seg_data.load_segmentation(spec.path, split=spec.split, limit=spec.limit)
    if label_csv.is_csv_file(spec.path):
        return benchmark_root.load_csv_task(spec)
    if spec.kind == "zeroshot":
        return datasets.load_classification(spec.path, split=spec.split, dataset=spec.dataset or spec.name,
                                            limit=spec.limit, skip_bad_records=skip_bad_records)
    if spec.kind == "retrieval":
        return datasets.load_retrieval(spec.path, split=spec.split, limit=spec.limit,
                                       skip_bad_records=skip_bad_records, text=spec.text)
    return datasets.load_regions(spec.path, split=spec.split, limit=spec.limit, skip_bad_records=skip_bad_records)


@dataclasses.dataclass
class _TaskOutcome:
    metrics: dict[str, float]
    details: dict[str, Any]
    provenance: dict[str, Any]
    notes: list[str]


@dataclasses.dataclass
class _Runner:
    embedder: embed.Embedder
    batch_size: int
    progress: bool
    ties: metrics.TieRule
    num_threads: int
    dense: str
    allow_train_split: bool
    train_images: overlap.TrainImages | None
    exclude_overlap: bool
    skip_bad_records: bool = False

    def run(self, spec: TaskSpec) -> _TaskOutcome:
        split, dataset_name, splits = resolve_split(spec)
        notes = [note] if (note := split_guard(spec, split, splits, self.allow_train_split)) else []
        overlap_result: overlap.OverlapResult | None = None
        try:
            data = _load(spec, self.skip_bad_records)
            log.info("%s: %s", spec.prefix, data.description)
            digests = provenance.image_digests(data.images)
            if self.train_images is not None:
                overlap_result = overlap.check_images(data.images, digests, self.train_images)
                overlap_result.excluded = self.exclude_overlap
                data, digests = self._exclude(spec, data, digests, overlap_result)
                if (note := overlap_result.note()) is not None:
                    log.warning("%s: %s", spec.prefix, note)
                    notes.append(note)
            task_metrics, details = getattr(self, spec.kind)(spec, data)
            notes.extend(long_text.truncation_notes(task_metrics))
        except (datasets.EvalDataError, overlap.OverlapError, FileNotFoundError, segmentation.SegmentationOptionError
                ) as error:
            raise TaskError(f"task {spec.kind}:{spec.name}: {error}") from error
        if overlap_result is not None:
            task_metrics.update(overlap_result.metrics())
        templates = prompts.get_templates(spec.templates) if spec.kind in ("zeroshot", "regions") else None
        protocol = (details.pop("protocol") if spec.kind == "segmentation"
                    else provenance.protocol_description(spec, ties=self.ties, dense=self.dense))
        record = provenance.task_provenance(
            spec, data, digests, dataset=dataset_name, split=split, ties=self.ties, templates=templates,
            protocol=protocol)
        record["training_split_allowed"] = bool(split is not None and is_training_split(split))
        record["split_choice"] = benchmark_root.split_choice_record(spec.split_by, split)
        record["overlap"] = overlap_result.to_json() if overlap_result is not None else None
        return _TaskOutcome(task_metrics, details, record, notes)

    def _exclude(self, spec: TaskSpec, data: Any, digests: list[bytes], result: overlap.OverlapResult
                 ) -> tuple[Any, list[bytes]]:
        if not self.exclude_overlap or not result.matches:
            return data, digests
        drop = set(result.indices)
        if len(drop) == len(digests):
            raise TaskError(f"task {spec.kind}:{spec.name}: every one of its {len(digests)} images is also in the "
                            "training data; nothing is left to evaluate")
        without = seg_task.without_images if spec.kind == "segmentation" else overlap.without_images
        return without(data, sorted(drop)), [d for i, d in enumerate(digests) if i not in drop]

    def _embed_images(self, images: Any, count: int, desc: str) -> np.ndarray:
        size = self.embedder.image_size

        def load(index: int) -> np.ndarray:
            return preprocess.preprocess_bytes(images.image_bytes(index), size, "shortest",
                                               where=images.where(index),
                                               expected_size=images.expected_size(index))[None]

        return embed.embed_all(self.embedder, load, count, count, batch_size=self.batch_size, desc=desc,
                               progress=self.progress, num_threads=self.num_threads)

    @staticmethod
    def _skips(spec: TaskSpec, skipped: dict[str, int]) -> dict[str, float]:
        for reason, count in skipped.items():
            log.warning("%s: skipped %d (%s)", spec.prefix, count, reason)
        return {f"skipped/{reason}": float(count) for reason, count in skipped.items()}

    def zeroshot(self, spec: TaskSpec, data: Any) -> tuple[dict[str, float], dict[str, Any]]:
        classifier = zeroshot.build_classifier(self.embedder.embed_texts, data.class_names,
                                               prompts.get_templates(spec.templates))
        image_embeddings = self._embed_images(data.images, len(data.labels), f"{spec.prefix} images")
        logits = zeroshot.zeroshot_logits(image_embeddings, classifier)
        result = zeroshot.zeroshot_metrics(logits, data.labels, data.class_ids, ks=(1, 5), ties=self.ties)
        result.update(self._skips(spec, data.skipped))
        per_class = metrics.per_class_accuracy(logits, data.labels, ties=self.ties)
        details = {"kind": "zeroshot", "description": data.description, "templates": spec.templates,
                   "class_ids": data.class_ids, "class_names": data.class_names,
                   "per_class_accuracy": per_class.tolist()}
        return result, details

    def retrieval(self, spec: TaskSpec, data: Any) -> tuple[dict[str, float], dict[str, Any]]:
        image_embeddings = self._embed_images(data.images, len(data.image_keys), f"{spec.prefix} images")
        result: dict[str, float] = {}
        details: dict[str, Any] = {"kind": "retrieval", "description": data.description, "protocols": {}}
        for protocol_name in spec.protocols:
            protocol = retrieval.get_protocol(protocol_name)
            problem = retrieval.build_problem(data.image_keys, data.captions, protocol)
            text_embeddings = self.embedder.embed_texts(problem.texts)
            truncation = long_text.truncation_metrics(problem.texts, long_text.context_length_of(self.embedder))
            similarity = retrieval.similarity_matrix(image_embeddings[problem.image_indices], text_embeddings)
            protocol_metrics = retrieval.retrieval_metrics(similarity, problem.positives, protocol, ties=self.ties)
            protocol_metrics.update(self._skips(spec, {**data.skipped, **problem.skipped}))
            protocol_metrics.update(truncation)
            result.update({f"{protocol.name}/{key}": value for key, value in protocol_metrics.items()})
            details["protocols"][protocol.name] = {
                "ks": list(protocol.ks),
                "i2t": [protocol_metrics[f"i2t_R@{k}"] for k in protocol.ks],
                "t2i": [protocol_metrics[f"t2i_R@{k}"] for k in protocol.ks],
            }
        return result, details

    def regions(self, spec: TaskSpec, data: Any) -> tuple[dict[str, float], dict[str, Any]]:
        category_prompts = [classnames.readable_class_name(name) for name in data.category_names]
        classifier = zeroshot.build_classifier(self.embedder.embed_texts, category_prompts,
                                               prompts.get_templates(spec.templates))
        labels = np.asarray([category for image_regions in data.regions for _, category in image_regions])
        result: dict[str, float] = dict(self._skips(spec, data.skipped))
        details: dict[str, Any] = {"kind": "regions", "description": data.description,
                                   "class_ids": data.category_names, "class_names": category_prompts,
                                   "methods": {}}
        size = self.embedder.image_size
        for method in spec.methods:
            if method == "crop":
                features = embed.embed_all(
                    self.embedder, regions.crop_loader(data.images, data.regions, size), len(data.regions),
                    data.num_regions, batch_size=self.batch_size, desc=f"{spec.prefix} crops",
                    progress=self.progress, num_threads=self.num_threads)
            else:
                features = self._roi_features(data, spec)
            logits = zeroshot.zeroshot_logits(features, classifier)
            method_metrics = zeroshot.zeroshot_metrics(logits, labels, data.category_names, ks=(1, 5), ties=self.ties)
            result.update({f"{method}/{key}": value for key, value in method_metrics.items()})
            details["methods"][method] = metrics.per_class_accuracy(logits, labels, ties=self.ties).tolist()
        return result, details

    def segmentation(self, spec: TaskSpec, data: seg_data.SegmentationSet) -> tuple[dict[str, float], dict[str, Any]]:
        result, details = seg_task.run_task(self.embedder, data, dict(spec.options), self.progress, spec.prefix)
        return {**result, **self._skips(spec, data.skipped)}, details

    def _roi_features(self, data: datasets.RegionSet, spec: TaskSpec) -> np.ndarray:
        pooler = regions.RoiPooler(map_batch=self.batch_size)
        load = regions.whole_image_loader(data.images, self.embedder.image_size)
        features, first_image = [], 0
        for _, patch_tokens in embed.embed_stream(
                self.embedder, load, len(data.regions), len(data.regions), batch_size=self.batch_size,
                desc=f"{spec.prefix} images (RoI)", progress=self.progress, with_patches=True,
                num_threads=self.num_threads):
            assert patch_tokens is not None
            image_of_box, boxes = [], []
            for row in range(patch_tokens.shape[0]):
                image_regions = data.regions[first_image + row]
                pixel_boxes = np.asarray([box for box, _ in image_regions], np.float32)
                boxes.append(regions.normalised_boxes(pixel_boxes, data.sizes[first_image + row]))
                image_of_box.append(np.full(len(image_regions), row, np.int32))
            first_image += patch_tokens.shape[0]
            features.append(pooler(patch_tokens, np.concatenate(image_of_box), np.concatenate(boxes)))
        return np.concatenate(features)
