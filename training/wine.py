"""The second example: three multiclass classifiers of different kinds on the wine data.

It exists to show that the proxy is not Iris-shaped: 13 features instead of 4, three classes
per model instead of a binary answer, and each model with its own tensor names and datatypes
(one takes FP64). All three are fitted on the same stratified split of the 178 rows that
scikit-learn ships, and answer the probabilities of the same three classes, so a composition
can average them (soft vote) or count their argmax (majority vote).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import ClassifierMixin
from sklearn.datasets import load_wine
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from training.models import DEFAULT_SEED, TEST_SIZE

#: The wine classes (three cultivars), in the order of every model's probabilities.
WINE_CLASSES: tuple[str, ...] = ("class_0", "class_1", "class_2")
N_FEATURES = 13


@dataclass(frozen=True)
class WineModel:
    """One served model: what it is, and the tensors Triton serves it with."""

    name: str
    kind: str
    build: Callable[[int], ClassifierMixin]
    input_name: str
    output_name: str
    #: numpy dtype of the input (and so of the probabilities skl2onnx exports).
    dtype: type[np.floating[Any]]
    #: Weight in the soft-vote composition.
    weight: float


def _logreg(seed: int) -> ClassifierMixin:
    # Newton's method, as for Iris: the same optimum on every CPU.
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(solver="newton-cholesky", random_state=seed)),
        ]
    )


def _gbt(seed: int) -> ClassifierMixin:
    return GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=seed)


def _knn(seed: int) -> ClassifierMixin:
    # Uniform weights: each probability is a count of 7 neighbours, which the float32 ONNX model
    # reproduces exactly (distance weights would differ in the last digits of float32 distances).
    return Pipeline([("scale", StandardScaler()), ("clf", KNeighborsClassifier(n_neighbors=7))])


MODELS: tuple[WineModel, ...] = (
    WineModel(
        "wine_logreg", "logistic regression", _logreg, "measurements", "class_probabilities", np.float64, 2.0
    ),
    WineModel("wine_gbt", "gradient-boosted trees", _gbt, "x", "proba", np.float32, 1.0),
    WineModel("wine_knn", "k-nearest neighbours (k=7)", _knn, "INPUT__0", "OUTPUT__0", np.float32, 1.0),
)


def load() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """All 178 rows, ``[178, 13]`` float64 features and class indices."""
    wine = load_wine()
    return wine.data.astype(np.float64), wine.target.astype(np.int64)


@dataclass(frozen=True)
class WineResult:
    classifiers: dict[str, ClassifierMixin]
    heldout_accuracy: dict[str, float]
    mean_accuracy: float
    vote_accuracy: float
    n_train: int
    n_test: int


def soft_vote(probabilities: list[NDArray[np.floating[Any]]], weights: list[float]) -> NDArray[np.float64]:
    """The weighted mean of the models' probability vectors, ``[N, classes]``."""
    total = sum(w * p.astype(np.float64) for w, p in zip(weights, probabilities, strict=True))
    return np.asarray(total, dtype=np.float64) / sum(weights)


def majority_vote(probabilities: list[NDArray[np.floating[Any]]]) -> NDArray[np.int64]:
    """Each row's most voted class among the models' argmax; a tie goes to the lowest class index."""
    votes = np.stack([p.argmax(axis=1) for p in probabilities], axis=1)
    counts = np.stack([(votes == c).sum(axis=1) for c in range(probabilities[0].shape[1])], axis=1)
    winners: NDArray[np.int64] = counts.argmax(axis=1).astype(np.int64)
    return winners


def split(
    seed: int = DEFAULT_SEED,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """The stratified split training and the report use: x_train, x_test, y_train, y_test."""
    x, y = load()
    parts = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=seed)
    return parts[0], parts[1], parts[2], parts[3]


def train(seed: int = DEFAULT_SEED) -> WineResult:
    x_train, x_test, y_train, y_test = split(seed)
    classifiers: dict[str, ClassifierMixin] = {}
    accuracy: dict[str, float] = {}
    held_out: list[NDArray[np.floating[Any]]] = []
    for model in MODELS:
        classifier = model.build(seed)
        classifier.fit(x_train.astype(model.dtype), y_train)
        classifiers[model.name] = classifier
        proba = classifier.predict_proba(x_test.astype(model.dtype))
        held_out.append(proba)
        accuracy[model.name] = float((proba.argmax(axis=1) == y_test).mean())
    mean = soft_vote(held_out, [m.weight for m in MODELS]).argmax(axis=1)
    return WineResult(
        classifiers=classifiers,
        heldout_accuracy=accuracy,
        mean_accuracy=float((mean == y_test).mean()),
        vote_accuracy=float((majority_vote(held_out) == y_test).mean()),
        n_train=len(y_train),
        n_test=len(y_test),
    )
