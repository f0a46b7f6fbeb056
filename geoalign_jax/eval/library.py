"""The evaluation entry point shared by the CLI and the trainer: parameters in, a metrics dict out.

``evaluate(model_config, params, tasks)`` runs zero-shot classification, retrieval and region
classification tasks and returns flat ``{"kind/name/...": value}`` metrics (percentages), e.g.
``zeroshot/aid/top1``, ``retrieval/rsicd/standard/mean_recall``, ``regions/dota/roi/top1``.
``run_tasks`` returns the same metrics plus per-task details (per-class accuracies, recall curves)
for tables and plots. The embedding backend is pluggable (``embed.JaxEmbedder`` by default,
``embed.OpenClipEmbedder`` for a torch export), so the same metrics code scores both.

Task syntax (CLI and ``parse_task``): ``KIND:NAME=PATH[,key=value...]`` with KIND in zeroshot,
retrieval, regions; keys: ``split``, ``limit`` (first N images), ``templates`` (farslip | rs | single),
``dataset`` (class table for zero-shot prompts, default NAME), ``protocol`` (retrieval: standard |
skyscript | both), ``methods`` (regions: crop+roi, crop, roi).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from geoalign_jax.eval import classnames, datasets, embed, metrics, preprocess, prompts, regions, retrieval, zeroshot

log = logging.getLogger(__name__)

TASK_KINDS = ("zeroshot", "retrieval", "regions")
_TASK_KEYS = {
    "zeroshot": {"split", "limit", "templates", "dataset"},
    "retrieval": {"split", "limit", "protocol"},
    "regions": {"split", "limit", "templates", "methods"},
}


class TaskError(ValueError):
    """A task description that cannot be run; the message names the task."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One evaluation: what kind, a name for the results, where the data are, and options."""

    kind: str
    name: str
    path: str
    split: str | None = None
    limit: int | None = None
    templates: str = prompts.DEFAULT_TEMPLATE_SET
    dataset: str | None = None
    protocol: str = "standard"
    methods: tuple[str, ...] = regions.REGION_METHODS

    def __post_init__(self) -> None:
        task = f"task {self.kind}:{self.name}"
        if self.kind not in TASK_KINDS:
            raise TaskError(f"{task}: unknown kind {self.kind!r} (known: {', '.join(TASK_KINDS)})")
        if not self.name or any(ch in self.name for ch in "/ "):
            raise TaskError(f"task name {self.name!r} must be non-empty without '/' or spaces")
        if self.limit is not None and self.limit < 1:
            raise TaskError(f"{task}: limit must be >= 1, got {self.limit}")
        if self.templates not in prompts.TEMPLATE_SETS:
            raise TaskError(f"{task}: unknown templates {self.templates!r} "
                            f"(known: {', '.join(sorted(prompts.TEMPLATE_SETS))})")
        if self.kind == "retrieval":
            for protocol in self.protocols:
                try:
                    retrieval.get_protocol(protocol)
                except ValueError as error:
                    raise TaskError(f"{task}: {error}") from None
        bad_methods = [m for m in self.methods if m not in regions.REGION_METHODS]
        if bad_methods or not self.methods:
            raise TaskError(f"{task}: methods must be among {regions.REGION_METHODS}, got {self.methods}")

    @property
    def protocols(self) -> tuple[str, ...]:
        return ("standard", "skyscript") if self.protocol == "both" else (self.protocol,)

    @property
    def prefix(self) -> str:
        return f"{self.kind}/{self.name}"


def parse_task(text: str) -> TaskSpec:
    """``KIND:NAME=PATH[,key=value...]`` -> TaskSpec, with errors that quote the offending task."""
    head, sep, rest = text.partition(":")
    if not sep:
        raise TaskError(f"task {text!r}: expected KIND:NAME=PATH[,key=value...], e.g. zeroshot:aid=/data/aid")
    kind = head.strip()
    if kind not in TASK_KINDS:
        raise TaskError(f"task {text!r}: unknown kind {kind!r} (known: {', '.join(TASK_KINDS)})")
    name, sep, rest = rest.partition("=")
    if not sep or not rest:
        raise TaskError(f"task {text!r}: missing '=PATH' after the task name")
    path, *options = rest.split(",")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep:
            raise TaskError(f"task {text!r}: option {option!r} is not key=value")
        if key not in _TASK_KEYS[kind]:
            raise TaskError(f"task {text!r}: unknown option {key!r} for {kind} (known: {sorted(_TASK_KEYS[kind])})")
        if key == "limit":
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise TaskError(f"task {text!r}: limit must be an integer, got {value!r}") from None
        elif key == "methods":
            kwargs[key] = tuple(m for m in value.replace("+", " ").split() if m)
        else:
            kwargs[key] = value
    return TaskSpec(kind=kind, name=name.strip(), path=path.strip(), **kwargs)


@dataclasses.dataclass
class EvalReport:
    """metrics: flat name -> value; details: per task prefix, arrays for tables and plots."""

    metrics: dict[str, float]
    details: dict[str, dict[str, Any]]


def evaluate(model_config: Any, params: Any, tasks: Sequence[TaskSpec | str], *,
             embedder: embed.Embedder | None = None, batch_size: int = 64, progress: bool = True,
             ties: metrics.TieRule = "pessimistic", num_threads: int = 2, dense: str = "last",
             skip_bad_records: bool = False) -> dict[str, float]:
    """Run the tasks on the model's weights (or on ``embedder``) and return the flat metrics dict.

    model_config / params: a ``models.clip.CLIPConfig`` and its parameter dict (ignored when an
    ``embedder`` is given). dense: patch tokens for region RoI features ("last" or FarSLIP's
    "segearth"). Compiled towers are cached per config, so calling this every N training steps
    compiles once. skip_bad_records: a record that cannot be read is skipped and counted
    (``<task>/skipped/unreadable_records``) instead of failing the task with TaskError.
    """
    return run_tasks(model_config, params, tasks, embedder=embedder, batch_size=batch_size, progress=progress,
                     ties=ties, num_threads=num_threads, dense=dense, skip_bad_records=skip_bad_records).metrics


def run_tasks(model_config: Any, params: Any, tasks: Sequence[TaskSpec | str], *,
              embedder: embed.Embedder | None = None, batch_size: int = 64, progress: bool = True,
              ties: metrics.TieRule = "pessimistic", num_threads: int = 2, dense: str = "last",
              skip_bad_records: bool = False) -> EvalReport:
    """``evaluate`` with per-task details. Task strings are parsed with ``parse_task``."""
    specs = [parse_task(task) if isinstance(task, str) else task for task in tasks]
    names = [spec.prefix for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskError(f"task names must be unique per kind; repeated: {duplicates}")
    if embedder is None:
        if model_config is None or params is None:
            raise ValueError("evaluate needs model_config and params, or an embedder")
        embedder = embed.JaxEmbedder(model_config, params, batch_size=batch_size, dense=dense)
    runner = _Runner(embedder, batch_size, progress, ties, num_threads, skip_bad_records)
    report = EvalReport({}, {})
    for spec in specs:
        task_metrics, details = runner.run(spec)
        report.metrics.update({f"{spec.prefix}/{key}": float(value) for key, value in task_metrics.items()})
        report.details[spec.prefix] = details
    return report


@dataclasses.dataclass
class _Runner:
    embedder: embed.Embedder
    batch_size: int
    progress: bool
    ties: metrics.TieRule
    num_threads: int
    skip_bad_records: bool = False

    def run(self, spec: TaskSpec) -> tuple[dict[str, float], dict[str, Any]]:
        try:
            if spec.kind == "zeroshot":
                return self.zeroshot(spec)
            if spec.kind == "retrieval":
                return self.retrieval(spec)
            return self.regions(spec)
        except (datasets.EvalDataError, FileNotFoundError) as error:
            raise TaskError(f"task {spec.kind}:{spec.name}: {error}") from error

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

    def zeroshot(self, spec: TaskSpec) -> tuple[dict[str, float], dict[str, Any]]:
        data = datasets.load_classification(spec.path, split=spec.split, dataset=spec.dataset or spec.name,
                                            limit=spec.limit, skip_bad_records=self.skip_bad_records)
        log.info("%s: %s", spec.prefix, data.description)
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

    def retrieval(self, spec: TaskSpec) -> tuple[dict[str, float], dict[str, Any]]:
        data = datasets.load_retrieval(spec.path, split=spec.split, limit=spec.limit,
                                       skip_bad_records=self.skip_bad_records)
        log.info("%s: %s", spec.prefix, data.description)
        image_embeddings = self._embed_images(data.images, len(data.image_keys), f"{spec.prefix} images")
        result: dict[str, float] = {}
        details: dict[str, Any] = {"kind": "retrieval", "description": data.description, "protocols": {}}
        for protocol_name in spec.protocols:
            protocol = retrieval.get_protocol(protocol_name)
            problem = retrieval.build_problem(data.image_keys, data.captions, protocol)
            text_embeddings = self.embedder.embed_texts(problem.texts)
            similarity = retrieval.similarity_matrix(image_embeddings[problem.image_indices], text_embeddings)
            protocol_metrics = retrieval.retrieval_metrics(similarity, problem.positives, protocol, ties=self.ties)
            protocol_metrics.update(self._skips(spec, {**data.skipped, **problem.skipped}))
            result.update({f"{protocol.name}/{key}": value for key, value in protocol_metrics.items()})
            details["protocols"][protocol.name] = {
                "ks": list(protocol.ks),
                "i2t": [protocol_metrics[f"i2t_R@{k}"] for k in protocol.ks],
                "t2i": [protocol_metrics[f"t2i_R@{k}"] for k in protocol.ks],
            }
        return result, details

    def regions(self, spec: TaskSpec) -> tuple[dict[str, float], dict[str, Any]]:
        data = datasets.load_regions(spec.path, split=spec.split, limit=spec.limit,
                                     skip_bad_records=self.skip_bad_records)
        log.info("%s: %s", spec.prefix, data.description)
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
