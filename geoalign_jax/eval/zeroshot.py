"""Zero-shot scene classification: prompt-ensembled class embeddings and accuracy metrics.

Kept free of I/O and of any model: it receives an ``embed_texts`` callable (the embedding backend)
and image embeddings already computed, so the same code scores JAX and open_clip embeddings.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from geoalign_jax.eval import metrics
from geoalign_jax.eval.prompts import fill_templates

EmbedTexts = Callable[[Sequence[str]], np.ndarray]


def build_classifier(embed_texts: EmbedTexts, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """[C, E] unit-norm class embeddings by prompt ensembling, as open_clip and FarSLIP do.

    Every prompt embedding is normalised first, so that no template dominates the mean by norm;
    the per-class mean is then normalised again.
    """
    if not class_names:
        raise ValueError("no class names to build a classifier from")
    if not templates:
        raise ValueError("no prompt templates")
    prompts = [prompt for name in class_names for prompt in fill_templates(name, templates)]
    prompt_embeddings = metrics.l2_normalize(np.asarray(embed_texts(prompts)))
    if prompt_embeddings.shape[0] != len(prompts):
        raise ValueError(f"text backend returned {prompt_embeddings.shape[0]} embeddings for {len(prompts)} prompts")
    per_class = prompt_embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return metrics.l2_normalize(per_class)


def zeroshot_logits(image_embeddings: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """[N, C] cosine similarities x 100 (the usual CLIP scale; ranking does not depend on it)."""
    return 100.0 * metrics.l2_normalize(image_embeddings) @ classifier.T


def zeroshot_metrics(logits: np.ndarray, labels: np.ndarray, class_ids: Sequence[str], *,
                     ks: Sequence[int] = (1, 5), ties: metrics.TieRule = "pessimistic") -> dict[str, float]:
    """top-k accuracy, balanced (mean per-class) accuracy and each class's top-1, in percent.

    Keys: ``top1``, ``top5``, ``mean_per_class``, ``num_samples``, ``class/<class_id>``.
    """
    logits = np.asarray(logits)
    if logits.shape[1] != len(class_ids):
        raise ValueError(f"logits have {logits.shape[1]} classes but {len(class_ids)} class ids were given")
    results: dict[str, float] = {}
    for k, value in metrics.topk_accuracy(logits, labels, ks, ties=ties).items():
        results[f"top{k}"] = value
    per_class = metrics.per_class_accuracy(logits, labels, ties=ties)
    results["mean_per_class"] = float(np.nanmean(per_class))
    results["num_samples"] = float(len(labels))
    for class_id, value in zip(class_ids, per_class):
        if not np.isnan(value):
            results[f"class/{class_id}"] = float(value)
    return results
