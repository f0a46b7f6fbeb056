"""Image<->text retrieval under the two protocols in use, chosen by name.

``standard`` (RemoteCLIP retrieval.py, clip_benchmark; RSITMD/RSICD/UCM numbers in most papers):
every caption is a text query whose single correct image is its own; every image is a query whose
correct texts are its captions (hit when any of them is in the top k). R@1/5/10 in both directions
and ``mean_recall`` = the mean of those six numbers.

``skyscript`` (SkyScript / FarSLIP tests/test_retrieval.py): captions are prefixed with
"a satellite image. ", identical images (same key, e.g. a hash of the bytes) are merged into one
candidate, and identical caption strings are merged into one text whose correct images are all the
images it describes. R@1/5/10/100; ``i2t_mean`` / ``t2i_mean`` = mean(R@1, R@5, R@10) per direction
(the numbers FarSLIP's README reports), and ``mean_recall`` = the mean of the six.

Ties follow ``metrics`` (pessimistic by default).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from geoalign_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class RetrievalProtocol:
    """How captions and images become queries and candidates."""

    name: str
    caption_prefix: str
    dedup_images: bool
    dedup_texts: bool
    ks: tuple[int, ...]
    per_direction_means: bool


PROTOCOLS: dict[str, RetrievalProtocol] = {
    "standard": RetrievalProtocol("standard", "", False, False, (1, 5, 10), False),
    "skyscript": RetrievalProtocol("skyscript", "a satellite image. ", True, True, (1, 5, 10, 100), True),
    # FarSLIP tests/test_retrieval.py scores SkyScript retrieval itself without the caption prefix.
    "skyscript-raw": RetrievalProtocol("skyscript-raw", "", True, True, (1, 5, 10, 100), True),
}


def get_protocol(name: str) -> RetrievalProtocol:
    """Protocol by name ('standard' or 'skyscript'; 'farslip' is an alias of 'skyscript')."""
    key = {"farslip": "skyscript", "clip_benchmark": "standard", "remoteclip": "standard"}.get(name, name)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {name!r}; known: {sorted(PROTOCOLS)} (+ alias 'farslip')")
    return PROTOCOLS[key]


@dataclasses.dataclass(frozen=True)
class RetrievalProblem:
    """What to embed and which pairs are correct.

    image_indices: [I] indices into the caller's image list to embed (after de-duplication).
    texts: [T] caption strings to embed (prefixed, de-duplicated as the protocol says).
    positives: [I, T] bool, True where text t describes image i.
    skipped: counts of dropped inputs by reason (blank captions, images without any caption).
    """

    image_indices: np.ndarray
    texts: list[str]
    positives: np.ndarray
    skipped: dict[str, int]


def build_problem(image_keys: Sequence[str], captions: Sequence[Sequence[str]],
                  protocol: RetrievalProtocol) -> RetrievalProblem:
    """Turn per-image caption lists into queries, candidates and the ground-truth mask.

    Blank captions are dropped and counted; an image left without captions is dropped and counted
    (it could never be a correct I2T query, and the standard protocol has no place for it).
    """
    if len(image_keys) != len(captions):
        raise ValueError(f"{len(image_keys)} image keys but {len(captions)} caption lists")
    skipped = {"blank_captions": 0, "images_without_captions": 0}
    image_slot: dict[str, int] = {}
    image_indices: list[int] = []
    text_slot: dict[str, int] = {}
    texts: list[str] = []
    pairs: set[tuple[int, int]] = set()
    for index, (key, image_captions) in enumerate(zip(image_keys, captions)):
        kept = [caption.strip() for caption in image_captions if caption and caption.strip()]
        skipped["blank_captions"] += len(image_captions) - len(kept)
        if not kept:
            skipped["images_without_captions"] += 1
            continue
        if protocol.dedup_images and key in image_slot:
            image_row = image_slot[key]
        else:
            image_row = len(image_indices)
            image_indices.append(index)
            image_slot.setdefault(key, image_row)
        for caption in kept:
            text = protocol.caption_prefix + caption
            if protocol.dedup_texts and text in text_slot:
                text_column = text_slot[text]
            else:
                text_column = len(texts)
                texts.append(text)
                text_slot.setdefault(text, text_column)
            pairs.add((image_row, text_column))
    positives = np.zeros((len(image_indices), len(texts)), dtype=bool)
    for image_row, text_column in pairs:
        positives[image_row, text_column] = True
    return RetrievalProblem(np.asarray(image_indices, dtype=np.int64), texts, positives,
                            {reason: count for reason, count in skipped.items() if count})


def retrieval_metrics(similarity: np.ndarray, positives: np.ndarray, protocol: RetrievalProtocol, *,
                      ties: metrics.TieRule = "pessimistic") -> dict[str, float]:
    """Recall@k both ways from an [I, T] image-text similarity matrix.

    Keys: ``i2t_R@k``, ``t2i_R@k`` for the protocol's ks, ``mean_recall`` (mean over k in 1/5/10 of
    both directions) and, for per-direction protocols, ``i2t_mean`` and ``t2i_mean``.
    """
    similarity = np.asarray(similarity)
    image_to_text = metrics.recall_at_k(similarity, positives, protocol.ks, ties=ties)
    text_to_image = metrics.recall_at_k(similarity.T, np.asarray(positives).T, protocol.ks, ties=ties)
    results: dict[str, float] = {}
    for k in protocol.ks:
        results[f"i2t_R@{k}"] = image_to_text[k]
    for k in protocol.ks:
        results[f"t2i_R@{k}"] = text_to_image[k]
    core = (1, 5, 10)
    results["mean_recall"] = float(np.mean([image_to_text[k] for k in core] + [text_to_image[k] for k in core]))
    if protocol.per_direction_means:
        results["i2t_mean"] = float(np.mean([image_to_text[k] for k in core]))
        results["t2i_mean"] = float(np.mean([text_to_image[k] for k in core]))
    results["num_images"] = float(similarity.shape[0])
    results["num_texts"] = float(similarity.shape[1])
    return results


def similarity_matrix(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """[I, T] cosine similarities of (unnormalised) embeddings."""
    return metrics.l2_normalize(image_embeddings) @ metrics.l2_normalize(text_embeddings).T
