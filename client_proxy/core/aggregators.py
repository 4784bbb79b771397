"""The built-in aggregators: how the answers of a composition's services become one answer per row.

Each is a small pure function of the services' outputs (``{service: [N, k] array}``, in the
composition's order) and knows nothing of HTTP, Triton or deadlines:

- ``one_vs_rest``: each service is one class's binary classifier answering ``[P(class),
  P(other)]``; the label is the service whose P(class) is highest (the seed's rule, the Iris
  composition). Ties go to the first service, as the seed's loop does.
- ``mean``: a soft vote. Multiclass services over the same classes; the weighted mean of their
  probability vectors, and its argmax. Ties go to the lowest class index (numpy's argmax).
- ``vote``: a majority vote of each service's argmax, each vote weighted; ties go to the lowest
  class index. ``proba`` is the winner's share of the votes.
- ``max``: per class the highest probability any service gave it, and the argmax of those.
- ``none``: no label; every service's output is the answer.

``AggregationError`` says which service's output does not fit (wrong width, mismatched rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


class AggregationError(ValueError):
    """The services' outputs cannot be aggregated as asked; the message names the service."""


@dataclass(frozen=True)
class Aggregated:
    """One answer per row."""

    labels: list[str]
    """Per row: the winning service (``one_vs_rest``) or class name."""
    proba: NDArray[np.float64]
    """Per row: the winner's score (a probability, or a share of the votes for ``vote``)."""
    scores: NDArray[np.float64] | None = None
    """Per row and class: the aggregated scores the label is the argmax of (None for ``one_vs_rest``)."""


Outputs = Mapping[str, NDArray[Any]]


def _rows(outputs: Outputs) -> int:
    if not outputs:
        raise AggregationError("no service answered")
    sizes = {name: len(output) for name, output in outputs.items()}
    if len(set(sizes.values())) != 1:
        raise AggregationError(f"the services answered different numbers of rows: {sizes}")
    return next(iter(sizes.values()))


def _matrix(outputs: Outputs, classes: Sequence[str]) -> NDArray[np.float64]:
    """``[services, N, classes]``, each service's output checked against the class count."""
    _rows(outputs)
    for name, output in outputs.items():
        if output.ndim != 2 or output.shape[1] != len(classes):
            raise AggregationError(
                f"{name}: output of shape {list(output.shape)}, expected [N, {len(classes)}] "
                f"(one column per class: {', '.join(classes)})"
            )
    return np.stack([np.asarray(o, dtype=np.float64) for o in outputs.values()])


def _weights(outputs: Outputs, weights: Mapping[str, float] | None) -> NDArray[np.float64]:
    if weights is None:
        return np.ones(len(outputs))
    return np.asarray([weights.get(name, 1.0) for name in outputs], dtype=np.float64)


def one_vs_rest(
    outputs: Outputs, classes: Sequence[str] = (), weights: Mapping[str, float] | None = None
) -> Aggregated:
    """The service with the highest P(class) (column 0 of its ``[N, 2]`` output) wins each row."""
    n = _rows(outputs)
    names = list(outputs)
    for name, output in outputs.items():
        if output.ndim != 2 or output.shape[1] < 1:
            raise AggregationError(f"{name}: output of shape {list(output.shape)}, expected [N, 2]")
    if n == 1:
        # One row, the common case: plain Python beats numpy's per-call overhead on a few numbers.
        scores = [float(outputs[name][0, 0]) for name in names]
        best = max(range(len(names)), key=scores.__getitem__)  # the first on ties
        return Aggregated([names[best]], np.asarray([scores[best]], dtype=np.float64))
    p_class = np.stack([np.asarray(outputs[name][:, 0], dtype=np.float64) for name in names], axis=1)
    winners = p_class.argmax(axis=1)
    return Aggregated([names[i] for i in winners], p_class[np.arange(n), winners])


def mean(outputs: Outputs, classes: Sequence[str], weights: Mapping[str, float] | None = None) -> Aggregated:
    """The weighted mean of the probability vectors, and its argmax."""
    stacked = _matrix(outputs, classes)
    w = _weights(outputs, weights)
    scores = np.tensordot(w, stacked, axes=1) / w.sum()
    winners = scores.argmax(axis=1)
    return Aggregated([classes[i] for i in winners], scores[np.arange(len(winners)), winners], scores)


def vote(outputs: Outputs, classes: Sequence[str], weights: Mapping[str, float] | None = None) -> Aggregated:
    """Each service votes for its argmax (with its weight); the most voted class wins."""
    stacked = _matrix(outputs, classes)
    w = _weights(outputs, weights)
    choices = stacked.argmax(axis=2)  # [services, N]
    tally = np.zeros((stacked.shape[1], len(classes)), dtype=np.float64)
    for service, weight in enumerate(w):
        np.add.at(tally, (np.arange(stacked.shape[1]), choices[service]), weight)
    shares = tally / w.sum()
    winners = shares.argmax(axis=1)
    return Aggregated([classes[i] for i in winners], shares[np.arange(len(winners)), winners], shares)


def max_(outputs: Outputs, classes: Sequence[str], weights: Mapping[str, float] | None = None) -> Aggregated:
    """Per class the highest probability any service gave it; the argmax of those."""
    scores = _matrix(outputs, classes).max(axis=0)
    winners = scores.argmax(axis=1)
    return Aggregated([classes[i] for i in winners], scores[np.arange(len(winners)), winners], scores)


Aggregator = Callable[[Outputs, Sequence[str], Mapping[str, float] | None], Aggregated]

#: By name, as a composition names them (``none`` is no aggregator: the outputs are the answer).
AGGREGATORS: dict[str, Aggregator] = {"one_vs_rest": one_vs_rest, "mean": mean, "vote": vote, "max": max_}
