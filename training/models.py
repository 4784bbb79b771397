"""Fit and evaluate the one-vs-rest classifiers.

Each classifier is ``StandardScaler -> PolynomialFeatures(2) -> LogisticRegression``.
A plain linear model cannot separate versicolor (the middle class) from the rest; the
quadratic features can, and the pipeline stays smooth, deterministic and exactly
convertible to ONNX.

The solver is Newton's method (``newton-cholesky``), not scikit-learn's default L-BFGS. Both
fit the same strictly convex problem, but L-BFGS stops early on a flat stretch of it, and
where it stops depends on the BLAS kernel: measured on one AMD EPYC with OpenBLAS forced to
four kernels (Prescott, Sandybridge, Haswell, Zen), L-BFGS's probabilities differed by up to
2.1e-4 between kernels, Newton's by 3.6e-7, because it converges quadratically to the one
optimum. The same model, whichever CPU trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from training.data import CLASS_NAMES, one_vs_rest

DEFAULT_SEED = 20230312
TEST_SIZE = 0.3


@dataclass(frozen=True)
class ClassifierReport:
    name: str
    heldout_accuracy: float
    heldout_roc_auc: float
    all_rows_accuracy: float


@dataclass(frozen=True)
class TrainingResult:
    classifiers: dict[str, Pipeline]
    reports: list[ClassifierReport]
    heldout_label_accuracy: float
    all_rows_label_accuracy: float
    n_train: int
    n_test: int
    seed: int


def build_pipeline(seed: int) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("poly", PolynomialFeatures(degree=2, include_bias=False)),
            ("clf", LogisticRegression(C=10.0, solver="newton-cholesky", max_iter=200, random_state=seed)),
        ]
    )


#: A second version of versicolor's classifier, the example experiment's candidate
#: (``examples/compositions.yaml``, docs/experiments.md): trained with other settings, linear (no
#: quadratic features), on the same rows. Cheaper, and a little worse: the experiment's shadow
#: shows on which rows.
CANDIDATE = "versicolor_v2"
CANDIDATE_OF = "versicolor"


def build_candidate(seed: int) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=1.0, solver="newton-cholesky", max_iter=200, random_state=seed)),
        ]
    )


def train_candidate(x: NDArray[np.float32], y: NDArray[np.int64], seed: int = DEFAULT_SEED) -> Pipeline:
    """``CANDIDATE``, fitted on the training split ``train`` uses."""
    x_train, _, y_train, _ = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=seed)
    model = build_candidate(seed)
    model.fit(x_train, one_vs_rest(y_train, CLASS_NAMES.index(CANDIDATE_OF)))
    return model


def class_probabilities(classifiers: dict[str, Pipeline], x: NDArray[np.float32]) -> NDArray[np.float64]:
    """P(class) from each classifier, columns in ``CLASS_NAMES`` order: ``[N, 3]``."""
    # predict_proba column 0 is label 0, which is "this class".
    return np.stack([classifiers[name].predict_proba(x)[:, 0] for name in CLASS_NAMES], axis=1)


def train(x: NDArray[np.float32], y: NDArray[np.int64], seed: int = DEFAULT_SEED) -> TrainingResult:
    """Fit on a stratified 70 % split; report on the held-out 30 % and on all rows.

    The exported models are the ones fitted on the training split, so the held-out
    figures describe exactly what is served.
    """
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    classifiers: dict[str, Pipeline] = {}
    reports: list[ClassifierReport] = []
    for index, name in enumerate(CLASS_NAMES):
        model = build_pipeline(seed)
        model.fit(x_train, one_vs_rest(y_train, index))
        classifiers[name] = model
        p_class_test = model.predict_proba(x_test)[:, 0]
        target_test = one_vs_rest(y_test, index) == 0
        reports.append(
            ClassifierReport(
                name=name,
                heldout_accuracy=float(accuracy_score(one_vs_rest(y_test, index), model.predict(x_test))),
                heldout_roc_auc=float(roc_auc_score(target_test, p_class_test)),
                all_rows_accuracy=float(accuracy_score(one_vs_rest(y, index), model.predict(x))),
            )
        )
    heldout_labels = class_probabilities(classifiers, x_test).argmax(axis=1)
    all_labels = class_probabilities(classifiers, x).argmax(axis=1)
    return TrainingResult(
        classifiers=classifiers,
        reports=reports,
        heldout_label_accuracy=float((heldout_labels == y_test).mean()),
        all_rows_label_accuracy=float((all_labels == y).mean()),
        n_train=len(y_train),
        n_test=len(y_test),
        seed=seed,
    )
