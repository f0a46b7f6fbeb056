"""The ``segmentation`` evaluation task: a segmentation folder scored with SegEarth-OV's protocol.

``evaluate_segmentation`` is the library entry point (model + folder + options in, metrics out); the task
kind ``segmentation:NAME=PATH[,split=...,limit=...,<option>=...]`` of ``eval.runner`` (CLI, trainer) calls
it. Options (``segmentation.OPTION_NAMES``): crop, stride, logit_scale, cls_token_lambda, threshold,
background, resize (N | NxM | none), dense (segearth | last), templates, window_batch; each defaults to
the folder's preset setting (threshold, background, resize), else SegEarth-OV's value. Metrics (percent):
``mIoU``, ``mAcc``, ``aAcc``, ``IoU/<class>``, ``Acc/<class>``, plus ``num_images``, ``num_pixels``, ``windows``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from geoalign_jax.eval import prompts, seg_data, seg_metrics, segmentation

log = logging.getLogger(__name__)

PROTOCOL_NAME = "open-vocabulary semantic segmentation (SegEarth-OV protocol, without FeatUp)"
PROTOCOL_SOURCE = "likyoo/SegEarth-OV@3e22a96:segearth_segmentor.py"


@dataclasses.dataclass
class SegmentationResult:
    metrics: dict[str, float]
    details: dict[str, Any]
    options: segmentation.SegEarthOptions
    data: seg_data.SegmentationSet


def dataset_protocol(data: seg_data.SegmentationSet) -> dict[str, Any]:
    """The folder's protocol settings as option defaults (its preset's threshold, background, resize)."""
    names = {"threshold": "threshold", "background_index": "background", "resize": "resize"}
    return {option: data.protocol[key] for key, option in names.items() if key in data.protocol}


def _prefetched(load: Callable[[int], Any], count: int, ahead: int = 2) -> Iterator[Any]:
    """load(0), load(1), ... with the next ``ahead`` decoded in a thread while the model runs."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(load, index) for index in range(min(ahead, count))]
        for index in range(count):
            result = futures[index].result()
            futures[index] = None  # type: ignore[call-overload]
            if index + ahead < count:
                futures.append(pool.submit(load, index + ahead))
            yield result


def evaluate_segmentation(model_config: Any, params: Any, data: str | pathlib.Path | seg_data.SegmentationSet, *,
                          split: str | None = None, limit: int | None = None,
                          options: Mapping[str, str] | segmentation.SegEarthOptions | None = None,
                          embed_texts: Callable[[Sequence[str]], np.ndarray] | None = None,
                          progress: bool = False, matmul_precision: str | None = None,
                          desc: str = "segmentation") -> SegmentationResult:
    """Score a segmentation folder (or a loaded split) with the SegEarth-OV protocol.

    options: task option strings (``{"threshold": "0.3"}``) over the folder's preset over SegEarth-OV's
    defaults, or a ready ``SegEarthOptions``. embed_texts: the text tower (default: a ``JaxEmbedder`` of
    the model; pass the evaluation's own to share its compiled towers).
    """
    if not isinstance(data, seg_data.SegmentationSet):
        data = seg_data.load_segmentation(data, split=split, limit=limit)
    if not isinstance(options, segmentation.SegEarthOptions):
        options = segmentation.make_options(dict(options or {}), dataset_protocol(data))
    if embed_texts is None:
        from geoalign_jax.eval import embed

        embed_texts = embed.JaxEmbedder(model_config, params, matmul_precision=matmul_precision).embed_texts
    queries, query_class = segmentation.class_queries(embed_texts, data.classes,
                                                      prompts.get_templates(options.templates))
    segmenter = segmentation.SegEarthSegmenter(model_config, params, queries, query_class, options,
                                               matmul_precision=matmul_precision)
    num_classes = len(data.classes)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    labels_of: dict[int, np.ndarray] = {}
    images_done = 0

    def load(index: int) -> np.ndarray:
        image, labels = data.pair(index)
        labels_of[index] = labels
        return image

    def score(index: int, first: int, predicted: np.ndarray) -> None:
        nonlocal images_done
        labels = labels_of[index]
        confusion[...] += seg_metrics.confusion_matrix(predicted, labels[first:first + predicted.shape[0]],
                                                       num_classes, data.ignore_index)
        if first + predicted.shape[0] == labels.shape[0]:
            del labels_of[index]
            images_done += 1
            bar.update(1)

    from geoalign_jax.eval.embed import progress_bar

    bar = progress_bar(len(data.images), desc, progress)
    try:
        segmenter.predict_stream(_prefetched(load, len(data.images)), score)
    finally:
        bar.close()
    if images_done != len(data.images):
        raise RuntimeError(f"{desc}: scored {images_done} of {len(data.images)} images")
    metrics = seg_metrics.segmentation_metrics(confusion, data.class_names)
    metrics.update({"num_images": float(len(data.images)), "windows": float(segmenter.windows_run)})
    details = {
        "kind": "segmentation", "description": data.description, "class_names": data.class_names,
        "class_queries": [list(names) for names in data.classes],
        "per_class_iou": [metrics[f"IoU/{name}"] for name in data.class_names],
        "confusion": confusion.tolist(), "options": options.to_json(),
        "window_shapes": sorted(list(shape) for shape in segmenter.compiled_shapes),
    }
    return SegmentationResult(metrics, details, options, data)


def run_task(embedder: Any, data: seg_data.SegmentationSet, options: Mapping[str, str], progress: bool,
             prefix: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The task kind's body in ``runner``: metrics and details (with ``protocol`` for the provenance) on the
    towers of a ``embed.JaxEmbedder`` (its compiled text tower encodes the queries)."""
    from geoalign_jax.eval import embed

    if not isinstance(embedder, embed.JaxEmbedder):  # SegEarth's dense last layer: JAX towers only
        raise segmentation.SegmentationOptionError(f"needs the JAX backend (model weights), not "
                                                   f"{type(embedder).__name__}")
    result = evaluate_segmentation(embedder.config, embedder.params, data, options=options,
                                   embed_texts=embedder.embed_texts, progress=progress, desc=f"{prefix} images",
                                   matmul_precision=embedder.matmul_precision)
    return dict(result.metrics), {**result.details, "protocol": protocol_description(result.options, data)}


def protocol_description(options: segmentation.SegEarthOptions, data: seg_data.SegmentationSet) -> dict[str, Any]:
    """What results.json records about how the numbers were made."""
    return {"name": PROTOCOL_NAME, "source": PROTOCOL_SOURCE, "options": options.to_json(),
            "templates": list(prompts.get_templates(options.templates)),
            "ignore_index": data.ignore_index, "reduce_zero_label": data.reduce_zero_label,
            "dataset_sources": data.sources, "feature_upsampler": None,
            "metrics": "mIoU / mAcc / aAcc over the split's summed confusion matrix (mmseg IoUMetric)"}


def without_images(data: seg_data.SegmentationSet, drop: Sequence[int]) -> seg_data.SegmentationSet:
    """The split without the images at ``drop`` (the train/test overlap exclusion)."""
    dropped = set(drop)
    entries = [entry for index, entry in enumerate(data.images.entries) if index not in dropped]
    return dataclasses.replace(data, images=seg_data.SegmentationImages(data.root, entries))
