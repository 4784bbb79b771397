"""The built-in aggregators: pure functions, tested on their own (no Triton, no HTTP)."""

from __future__ import annotations

import numpy as np
import pytest

from client_proxy.core.aggregators import AggregationError, max_, mean, one_vs_rest, vote
from training import wine

CLASSES = ("a", "b", "c")


def _random_probabilities(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    raw = rng.random((n, k))
    return raw / raw.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rows", [1, 50])
def test_one_vs_rest_is_the_seeds_rule(rows: int) -> None:
    rng = np.random.default_rng(rows)
    outputs = {name: _random_probabilities(rng, rows, 2).astype(np.float32) for name in ("x", "y", "z")}
    got = one_vs_rest(outputs)
    # The seed's loop, row by row: the first service whose P(class) is the highest.
    names = list(outputs)
    for row in range(rows):
        scores = [float(outputs[name][row, 0]) for name in names]
        best = scores.index(max(scores))
        assert got.labels[row] == names[best] and got.proba[row] == scores[best]


def test_one_vs_rest_gives_a_tie_to_the_first_service() -> None:
    tie = {"x": np.array([[0.5, 0.5], [0.2, 0.8]]), "y": np.array([[0.5, 0.5], [0.7, 0.3]])}
    assert one_vs_rest(tie).labels == ["x", "y"]
    assert one_vs_rest({"x": tie["x"][:1], "y": tie["y"][:1]}).labels == ["x"]


def test_mean_and_vote_agree_with_what_the_training_report_counts() -> None:
    rng = np.random.default_rng(7)
    probabilities = [_random_probabilities(rng, 200, 3) for _ in wine.MODELS]
    outputs = {m.name: p for m, p in zip(wine.MODELS, probabilities, strict=True)}
    weights = {m.name: m.weight for m in wine.MODELS}
    soft = mean(outputs, CLASSES, weights)
    np.testing.assert_allclose(soft.scores, wine.soft_vote(probabilities, list(weights.values())))
    assert soft.labels == [
        CLASSES[i] for i in wine.soft_vote(probabilities, list(weights.values())).argmax(axis=1)
    ]
    hard = vote(outputs, CLASSES)  # unweighted, as the report's majority vote
    assert hard.labels == [CLASSES[i] for i in wine.majority_vote(probabilities)]


def test_vote_weights_and_ties() -> None:
    outputs = {
        "p": np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1]]),
        "q": np.array([[0.1, 0.9, 0.0], [0.1, 0.1, 0.8]]),
        "r": np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]),
    }
    assert vote(outputs, CLASSES).labels == ["b", "a"]  # row 1: one vote each, the lowest class wins
    weighted = vote(outputs, CLASSES, {"p": 3.0})
    assert weighted.labels == ["a", "b"] and weighted.proba.tolist() == [0.6, 0.6]


def test_max_takes_each_class_best_score() -> None:
    outputs = {"p": np.array([[0.6, 0.3, 0.1]]), "q": np.array([[0.2, 0.1, 0.7]])}
    got = max_(outputs, CLASSES)
    assert got.labels == ["c"] and got.proba.tolist() == [0.7]
    np.testing.assert_allclose(got.scores, [[0.6, 0.3, 0.7]])


@pytest.mark.parametrize("aggregator", [mean, vote, max_])
def test_an_output_of_the_wrong_width_is_named(aggregator) -> None:  # type: ignore[no-untyped-def]
    outputs = {"good": np.ones((2, 3)) / 3, "binary": np.ones((2, 2)) / 2}
    with pytest.raises(AggregationError, match=r"binary: output of shape \[2, 2\], expected \[N, 3\]"):
        aggregator(outputs, CLASSES, None)


def test_different_row_counts_and_no_answer_are_refused() -> None:
    with pytest.raises(AggregationError, match="different numbers of rows"):
        mean({"p": np.ones((2, 3)), "q": np.ones((3, 3))}, CLASSES)
    with pytest.raises(AggregationError, match="no service answered"):
        one_vs_rest({})
