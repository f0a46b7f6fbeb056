"""Retrieval protocols against a brute-force reference written with plain Python loops."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from geoalign_jax.eval import retrieval


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _hit(scores: list[float], correct: set[int], k: int) -> bool:
    """Pessimistic top-k hit: explicit sort with incorrect candidates first among equal scores."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in correct))
    return any(j in correct for j in order[:k])


def brute_force_standard(image_vectors, captions_per_image, text_vector_of):
    """Every caption a T2I query; every image an I2T query hit by any of its captions."""
    texts, owner = [], []
    for image, captions in enumerate(captions_per_image):
        for caption in captions:
            texts.append(caption)
            owner.append(image)
    text_vectors = [text_vector_of(t) for t in texts]
    result = {}
    for k in (1, 5, 10):
        hits = 0
        for image, vector in enumerate(image_vectors):
            scores = [_cos(vector, tv) for tv in text_vectors]
            hits += _hit(scores, {t for t, o in enumerate(owner) if o == image}, k)
        result[f"i2t_R@{k}"] = 100.0 * hits / len(image_vectors)
        hits = 0
        for t, tv in enumerate(text_vectors):
            scores = [_cos(iv, tv) for iv in image_vectors]
            hits += _hit(scores, {owner[t]}, k)
        result[f"t2i_R@{k}"] = 100.0 * hits / len(text_vectors)
    result["mean_recall"] = sum(result.values()) / 6
    return result


def brute_force_skyscript(image_keys, image_vectors, captions_per_image, text_vector_of):
    """Group pairs by image key and by prefixed text, as SkyScript's notebook does with pandas groupby."""
    pairs = {(key, "a satellite image. " + c) for key, captions in zip(image_keys, captions_per_image)
             for c in captions}
    unique_images = sorted({key for key, _ in pairs})
    unique_texts = sorted({text for _, text in pairs})
    vector_of_image = {}
    for key, vector in zip(image_keys, image_vectors):
        vector_of_image.setdefault(key, vector)
    result = {}
    for k in (1, 5, 10, 100):
        hits = 0
        for key in unique_images:
            scores = [_cos(vector_of_image[key], text_vector_of(t)) for t in unique_texts]
            hits += _hit(scores, {j for j, t in enumerate(unique_texts) if (key, t) in pairs}, k)
        result[f"i2t_R@{k}"] = 100.0 * hits / len(unique_images)
        hits = 0
        for text in unique_texts:
            scores = [_cos(vector_of_image[key], text_vector_of(text)) for key in unique_images]
            hits += _hit(scores, {j for j, key in enumerate(unique_images) if (key, text) in pairs}, k)
        result[f"t2i_R@{k}"] = 100.0 * hits / len(unique_texts)
    result["i2t_mean"] = sum(result[f"i2t_R@{k}"] for k in (1, 5, 10)) / 3
    result["t2i_mean"] = sum(result[f"t2i_R@{k}"] for k in (1, 5, 10)) / 3
    return result


def _unit_vector(rng: random.Random, dim: int) -> list[float]:
    """Four entries of +-0.5: norm exactly 1 and dot products multiples of 1/4, so every score is exact
    in any float arithmetic and equal scores (frequent) really are ties."""
    vector = [0.0] * dim
    for position in rng.sample(range(dim), 4):
        vector[position] = rng.choice([-0.5, 0.5])
    return vector


def _random_set(seed: int, num_images: int = 23, dim: int = 8):
    rng = random.Random(seed)
    words = ["a", "b", "c", "d"]
    # Few distinct captions (so texts repeat inside and across images) and repeated image keys.
    captions = [[" ".join(rng.choice(words) for _ in range(2)) for _ in range(rng.randint(1, 5))]
                for _ in range(num_images)]
    keys = [f"img{rng.randint(0, num_images - 6)}" for _ in range(num_images)]
    vectors_by_key = {key: _unit_vector(rng, dim) for key in sorted(set(keys))}
    image_vectors = [vectors_by_key[key] for key in keys]
    text_cache: dict[str, list[float]] = {}

    def text_vector_of(text: str) -> list[float]:
        stripped = text.removeprefix("a satellite image. ")
        if stripped not in text_cache:
            text_cache[stripped] = _unit_vector(rng, dim)
        return text_cache[stripped]

    return keys, image_vectors, captions, text_vector_of


def _ours(keys, image_vectors, captions, text_vector_of, protocol_name):
    protocol = retrieval.get_protocol(protocol_name)
    problem = retrieval.build_problem(keys, captions, protocol)
    images = np.array([image_vectors[i] for i in problem.image_indices])
    texts = np.array([text_vector_of(t) for t in problem.texts])
    return retrieval.retrieval_metrics(retrieval.similarity_matrix(images, texts), problem.positives, protocol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_standard_protocol_matches_brute_force(seed):
    keys, image_vectors, captions, text_vector_of = _random_set(seed)
    expected = brute_force_standard(image_vectors, captions, text_vector_of)
    ours = _ours(keys, image_vectors, captions, text_vector_of, "standard")
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours["num_texts"] == sum(len(c) for c in captions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skyscript_protocol_matches_brute_force(seed):
    keys, image_vectors, captions, text_vector_of = _random_set(seed)
    expected = brute_force_skyscript(keys, image_vectors, captions, text_vector_of)
    ours = _ours(keys, image_vectors, captions, text_vector_of, "skyscript")
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours["num_images"] == len(set(keys)) < len(keys)


def test_protocols_build_the_expected_ground_truth():
    keys = ["x", "y", "x"]
    captions = [["a road .", "a road ."], ["a road .", " "], ["a port ."]]
    standard = retrieval.build_problem(keys, captions, retrieval.get_protocol("standard"))
    assert standard.texts == ["a road .", "a road .", "a road .", "a port ."]
    np.testing.assert_array_equal(standard.positives, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert standard.skipped == {"blank_captions": 1}
    sky = retrieval.build_problem(keys, captions, retrieval.get_protocol("farslip"))
    assert sky.texts == ["a satellite image. a road .", "a satellite image. a port ."]
    np.testing.assert_array_equal(sky.image_indices, [0, 1])
    # One text describing both images; the duplicate image x carries both of its texts.
    np.testing.assert_array_equal(sky.positives, [[1, 1], [1, 0]])


def test_hand_built_similarity_gives_known_recalls():
    # 2 images x 4 texts; image 0 owns texts 0,1; image 1 owns texts 2,3.
    similarity = np.array([[0.9, 0.1, 0.8, 0.0],
                           [0.5, 0.4, 0.3, 0.6]])
    positives = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    result = retrieval.retrieval_metrics(similarity, positives, retrieval.get_protocol("standard"))
    assert result["i2t_R@1"] == 100.0
    # text queries: t0 -> image0 (0.9 > 0.5) hit; t1 -> 0.1 < 0.4 miss; t2 -> 0.3 < 0.8 miss; t3 -> hit.
    assert result["t2i_R@1"] == 50.0
    assert result["t2i_R@5"] == 100.0
    assert result["mean_recall"] == pytest.approx((100 + 100 + 100 + 50 + 100 + 100) / 6)


def test_unknown_protocol_is_named():
    with pytest.raises(ValueError, match="'karpathy'"):
        retrieval.get_protocol("karpathy")
