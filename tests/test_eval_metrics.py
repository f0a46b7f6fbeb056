"""Ranking metrics on hand-built score matrices with known answers, ties included."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoalign_jax.eval import metrics, zeroshot


def test_ranks_without_ties():
    scores = np.array([[0.9, 0.1, 0.5],
                       [0.2, 0.3, 0.8],
                       [0.7, 0.6, 0.1]])
    positives = np.eye(3, dtype=bool)
    # query 0: its item is the best; query 1: 0.3 is below 0.8 only; query 2: 0.1 is below 0.7 and 0.6.
    np.testing.assert_array_equal(metrics.ranks_of_best_positive(scores, positives), [0, 1, 2])
    assert metrics.recall_at_k(scores, positives, (1, 2, 3)) == {
        1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}


def test_ties_pessimistic_versus_optimistic():
    # Row 0: the positive ties with two negatives; row 1: ties only with another positive.
    scores = np.array([[0.5, 0.5, 0.5, 0.1],
                       [0.4, 0.4, 0.9, 0.0]])
    positives = np.array([[False, True, False, False],
                          [True, True, False, False]])
    np.testing.assert_array_equal(metrics.ranks_of_best_positive(scores, positives, ties="pessimistic"), [2, 1])
    np.testing.assert_array_equal(metrics.ranks_of_best_positive(scores, positives, ties="optimistic"), [0, 1])
    assert metrics.recall_at_k(scores, positives, (1, 2, 3), ties="pessimistic") == {1: 0.0, 2: 50.0, 3: 100.0}
    assert metrics.recall_at_k(scores, positives, (1, 2, 3), ties="optimistic") == {1: 50.0, 2: 100.0, 3: 100.0}


def test_constant_scores_earn_no_credit_under_the_default_rule():
    scores = np.zeros((4, 10))
    positives = np.eye(4, 10, dtype=bool)
    assert metrics.recall_at_k(scores, positives, (1, 5, 9, 10)) == {1: 0.0, 5: 0.0, 9: 0.0, 10: 100.0}


def test_multiple_positives_take_the_best_one():
    scores = np.array([[0.1, 0.9, 0.8, 0.7]])
    positives = np.array([[True, False, False, True]])
    np.testing.assert_array_equal(metrics.ranks_of_best_positive(scores, positives), [2])


def test_topk_and_per_class_accuracy():
    logits = np.array([[3.0, 2.0, 1.0],   # label 0 -> top1
                       [3.0, 2.0, 1.0],   # label 1 -> top2
                       [1.0, 1.0, 1.0],   # label 2, all tied -> rank 2 (pessimistic)
                       [0.0, 5.0, 1.0]])  # label 1 -> top1
    labels = np.array([0, 1, 2, 1])
    assert metrics.topk_accuracy(logits, labels, (1, 2, 3)) == {1: 50.0, 2: 75.0, 3: 100.0}
    np.testing.assert_allclose(metrics.per_class_accuracy(logits, labels), [100.0, 50.0, 0.0])
    assert metrics.mean_per_class_accuracy(logits, labels) == pytest.approx(50.0)
    # A class without samples is NaN and is left out of the balanced mean.
    per_class = metrics.per_class_accuracy(np.c_[logits, np.zeros(4)], labels)
    assert np.isnan(per_class[3])


def test_zeroshot_metrics_names_each_class():
    logits = np.array([[2.0, 1.0], [2.0, 1.0], [0.0, 1.0]])
    result = zeroshot.zeroshot_metrics(logits, np.array([0, 1, 1]), ["Airport", "Beach"], ks=(1, 5))
    assert result["top1"] == pytest.approx(200 / 3)
    assert result["top5"] == 100.0
    assert result["class/Airport"] == 100.0 and result["class/Beach"] == 50.0
    assert result["mean_per_class"] == 75.0


def test_bad_inputs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="no correct candidate.*query 1"):
        metrics.ranks_of_best_positive(np.zeros((2, 2)), np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.ranks_of_best_positive(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError, match="label 3 at index 1"):
        metrics.topk_accuracy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="ties must be one of"):
        metrics.ranks_of_best_positive(np.zeros((1, 1)), np.ones((1, 1), bool), ties="random")
    with pytest.raises(ValueError, match="shape"):
        metrics.ranks_of_best_positive(np.zeros((2, 2)), np.ones((2, 3), bool))


def _brute_force_rank(row: list[float], positive: list[bool], pessimistic: bool) -> int:
    """Sort explicitly: by score descending, ties broken against (pessimistic) or for the positives."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], (positive[j] if pessimistic else not positive[j])))
    for position, j in enumerate(order):
        if positive[j]:
            return position
    raise AssertionError("no positive")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_ranks_match_an_explicit_sort(data):
    queries = data.draw(st.integers(1, 5))
    candidates = data.draw(st.integers(1, 7))
    # Few distinct values, so ties are frequent.
    scores = np.array(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=candidates, max_size=candidates),
                                         min_size=queries, max_size=queries)), dtype=np.float64)
    positives = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=candidates, max_size=candidates),
                                            min_size=queries, max_size=queries)))
    positives[np.arange(queries), data.draw(st.integers(0, candidates - 1))] = True
    for rule, pessimistic in (("pessimistic", True), ("optimistic", False)):
        expected = [_brute_force_rank(list(scores[q]), list(positives[q]), pessimistic) for q in range(queries)]
        np.testing.assert_array_equal(metrics.ranks_of_best_positive(scores, positives, ties=rule), expected)


def test_classifier_is_the_normalised_mean_of_normalised_prompts():
    vectors = {"a photo of x.": [3.0, 0.0], "an image of x": [0.0, 1.0],
               "a photo of y.": [1.0, 1.0], "an image of y": [-1.0, 1.0]}
    classifier = zeroshot.build_classifier(lambda texts: np.array([vectors[t] for t in texts]),
                                           ["x", "y"], ["a photo of {}.", "an image of {}"])
    # x: mean of (1,0) and (0,1) -> (1,1)/sqrt2: the norm 3 of the first prompt does not dominate.
    np.testing.assert_allclose(classifier[0], [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    np.testing.assert_allclose(classifier[1], [0.0, 1.0], atol=1e-6)
