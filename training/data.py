"""The Iris data as scikit-learn ships it (no download), and the one-vs-rest targets."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_iris

#: Class names in the order of the Iris targets (0, 1, 2) and of the aggregate's scores.
CLASS_NAMES: tuple[str, ...] = ("setosa", "versicolor", "virginica")
FEATURE_NAMES: tuple[str, ...] = (
    "sepal_length_cm",
    "sepal_width_cm",
    "petal_length_cm",
    "petal_width_cm",
)


def load() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """All 150 rows as float32 features ``[150, 4]`` and integer class indices ``[150]``."""
    iris = load_iris()
    return iris.data.astype(np.float32), iris.target.astype(np.int64)


def one_vs_rest(y: NDArray[np.int64], class_index: int) -> NDArray[np.int64]:
    """Binary target as in the seed: 0 means "this class", 1 means "other"."""
    return np.where(y == class_index, 0, 1).astype(np.int64)
