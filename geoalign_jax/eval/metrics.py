"""Ranking metrics on score matrices: recall@k, top-k accuracy, per-class accuracy.

Everything here works on plain numpy score matrices (queries x candidates) and a boolean mask of
which candidates are correct for each query, so the same code serves zero-shot classification
(one correct class per image), standard retrieval (one image per caption, five captions per image)
and de-duplicated retrieval (several correct candidates per query).

Tie rule (deterministic, documented because argsort-based evaluators leave it to the sort
implementation): the rank of a query is the 0-based position of its *best-scoring correct* candidate
where

- ``"pessimistic"`` (default): every candidate scoring strictly higher than that correct candidate,
  plus every *incorrect* candidate scoring exactly the same, is ranked before it. A model that gives
  all candidates the same score therefore earns no credit (rank = number of incorrect candidates).
- ``"optimistic"``: only candidates scoring strictly higher are ranked before it.

Correct candidates tied with the best correct one never push it down (any of them is a hit).
A query is a hit at k when its rank < k. Scores that are NaN are rejected, not ranked.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

TieRule = Literal["pessimistic", "optimistic"]
TIE_RULES: tuple[str, ...] = ("pessimistic", "optimistic")


def _check_scores_and_mask(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [queries, candidates] matrix, got shape {scores.shape}")
    if positives.shape != scores.shape:
        raise ValueError(f"positives mask shape {positives.shape} != scores shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; refusing to rank (check the embeddings)")
    missing = ~positives.any(axis=1)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"{int(missing.sum())} queries have no correct candidate (first: query {first}); "
            "every query needs at least one ground-truth match")
    return scores, positives


def ranks_of_best_positive(scores: np.ndarray, positives: np.ndarray, *,
                           ties: TieRule = "pessimistic") -> np.ndarray:
    """0-based rank of each query's best-scoring correct candidate, under the module's tie rule.

    Args:
      scores: [Q, N] similarity of each query to each candidate (higher = more similar).
      positives: [Q, N] bool, True where the candidate is a correct answer for the query.
      ties: "pessimistic" or "optimistic" (see the module docstring).
    Returns:
      [Q] int64 ranks; a query is a hit at k when rank < k.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    scores, positives = _check_scores_and_mask(scores, positives)
    best_positive = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)
    strictly_higher = (scores > best_positive).sum(axis=1)
    if ties == "optimistic":
        return strictly_higher.astype(np.int64)
    tied_negatives = ((scores == best_positive) & ~positives).sum(axis=1)
    return (strictly_higher + tied_negatives).astype(np.int64)


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
                ties: TieRule = "pessimistic") -> dict[int, float]:
    """Percentage of queries with a correct candidate among the top k, for each k."""
    ranks = ranks_of_best_positive(scores, positives, ties=ties)
    return {int(k): float(100.0 * np.mean(ranks < k)) for k in ks}


def one_hot_mask(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N] int labels -> [N, C] bool mask; rejects labels outside [0, C)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"label {int(labels[first])} at index {first} is outside [0, {num_classes})")
    mask = np.zeros((labels.shape[0], num_classes), dtype=bool)
    mask[np.arange(labels.shape[0]), labels] = True
    return mask


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5), *,
                  ties: TieRule = "pessimistic") -> dict[int, float]:
    """Top-k classification accuracy in percent; k larger than the class count counts every sample."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [samples, classes], got shape {logits.shape}")
    return recall_at_k(logits, one_hot_mask(labels, logits.shape[1]), ks, ties=ties)


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, *,
                       ties: TieRule = "pessimistic") -> np.ndarray:
    """Top-1 accuracy (percent) of each class over its own samples; NaN for a class with none."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    num_classes = logits.shape[1]
    correct = ranks_of_best_positive(logits, one_hot_mask(labels, num_classes), ties=ties) == 0
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, 100.0 * hits / np.maximum(counts, 1), np.nan)


def mean_per_class_accuracy(logits: np.ndarray, labels: np.ndarray, *,
                            ties: TieRule = "pessimistic") -> float:
    """Balanced accuracy: mean of per-class top-1 over the classes that have samples."""
    return float(np.nanmean(per_class_accuracy(logits, labels, ties=ties)))


def l2_normalize(embeddings: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (cosine similarity = dot product afterwards)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, eps)
