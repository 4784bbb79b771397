"""``python -m training``: train, export, check and write the Triton model repository.

Exits 1, naming the model, when an ONNX export does not reproduce scikit-learn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from sklearn.pipeline import Pipeline

from training import data, export, features, models, repository, wine
from training.data import CLASS_NAMES

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
REPORT_NAME = "TRAINING.md"
#: How far a model retrained on another CPU or BLAS kernel may move a probability. Measured:
#: 3.6e-7 at most between four OpenBLAS kernels (see training/models.py); 1e-5 leaves a wide margin
#: and is still far below anything that moves a label or a reported figure.
REPRODUCIBLE_WITHIN = 1e-5


def render_wine_report(result: wine.WineResult) -> list[str]:
    best_name = max(result.heldout_accuracy, key=lambda n: result.heldout_accuracy[n])
    best = result.heldout_accuracy[best_name]
    lines = [
        "## The wine models",
        "",
        "The second example, unlike Iris in every way the proxy sees: three multiclass classifiers",
        "of different kinds on the wine data that scikit-learn ships (13 features, 3 classes), each",
        "with its own tensor names and input datatype, and the class names in a `labels.txt` that",
        f"each config names. Stratified split: {result.n_train} training rows, {result.n_test} held out,",
        "the same seed.",
        "",
        "| model | kind | input | output | held-out accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in wine.MODELS:
        datatype = "FP64" if m.dtype == np.float64 else "FP32"
        lines.append(
            f"| {m.name} | {m.kind} | `{m.input_name}` {datatype} [N, {wine.N_FEATURES}] | "
            f"`{m.output_name}` {datatype} [N, {len(wine.WINE_CLASSES)}] | "
            f"{result.heldout_accuracy[m.name]:.4f} |"
        )
    weights = ", ".join(f"{m.name} {m.weight:g}" for m in wine.MODELS)
    lines += [
        "",
        "Compositions, on the same held-out rows:",
        "",
        f"- weighted mean of the probabilities ({weights}): {result.mean_accuracy:.4f}",
        f"- majority vote of the argmax (ties to the lowest class): {result.vote_accuracy:.4f}",
        "",
    ]
    for label, value in (("The weighted mean", result.mean_accuracy), ("The vote", result.vote_accuracy)):
        if value > best:
            verdict = f"beats the best single model ({best_name}, {best:.4f})"
        elif value == best:
            verdict = f"equals the best single model ({best_name}, {best:.4f}), and is no better"
        else:
            verdict = f"is worse than the best single model ({best_name}, {best:.4f})"
        lines.append(f"{label} {verdict}.")
    lines.append("")
    return lines


def render_candidate_report(
    result: models.TrainingResult, candidate: Pipeline, x: NDArray[np.float32], y: NDArray[np.int64]
) -> list[str]:
    """What the example experiment's shadow measures, computed here: the rows whose label the
    candidate changes."""
    served = models.class_probabilities(result.classifiers, x)
    replaced = served.copy()
    replaced[:, CLASS_NAMES.index(models.CANDIDATE_OF)] = candidate.predict_proba(x)[:, 0]
    changed = int((served.argmax(axis=1) != replaced.argmax(axis=1)).sum())
    accuracy = float((replaced.argmax(axis=1) == y).mean())
    return [
        f"## The candidate {models.CANDIDATE}",
        "",
        f"A second version of {models.CANDIDATE_OF}'s classifier, for the example experiment",
        "(docs/experiments.md): linear (`StandardScaler -> LogisticRegression`, C=1), trained on",
        f"the same rows. With it in place of {models.CANDIDATE_OF}, the combined label changes on",
        f"{changed} of the {len(y)} rows, and the accuracy on all rows is {accuracy:.4f}",
        f"(against {result.all_rows_label_accuracy:.4f}).",
        "",
    ]


def render_report(
    result: models.TrainingResult,
    wine_result: wine.WineResult,
    candidate: Pipeline,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
) -> str:
    """The committed report: only figures that every CPU reproduces (no floating-point noise digits)."""
    lines = [
        "# Training report",
        "",
        "Written by `python -m training`; do not edit. Three one-vs-rest classifiers",
        "(`StandardScaler -> PolynomialFeatures(2) -> LogisticRegression`) on the Iris data that",
        f"scikit-learn ships, stratified split: {result.n_train} training rows, {result.n_test} held out,",
        f"seed {result.seed}. The served models are the ones fitted on the training rows.",
        "",
        "| model | held-out accuracy | held-out ROC AUC | accuracy, all 150 rows | ONNX = scikit-learn |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result.reports:
        lines.append(
            f"| {r.name} | {r.heldout_accuracy:.4f} | {r.heldout_roc_auc:.4f} | "
            f"{r.all_rows_accuracy:.4f} | within {export.TOLERANCE:.0e} |"
        )
    lines += [
        "",
        "Combined label (argmax of the three P(class)):",
        "",
        f"- held-out accuracy: {result.heldout_label_accuracy:.4f}",
        f"- all_rows_label_accuracy: {result.all_rows_label_accuracy:.4f}",
        "",
        "Reproducible across machines: retrained with another CPU or BLAS kernel, the models give",
        f"the same labels on all 150 rows and probabilities within {REPRODUCIBLE_WITHIN:.0e} of the",
        "committed ones (tests/test_training.py retrains under several OpenBLAS kernels to check",
        "it). On one machine, retraining writes the same bytes.",
        "",
    ]
    lines += render_candidate_report(result, candidate, x, y)
    lines += render_wine_report(wine_result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help="model repository to write (default: %(default)s)",
    )
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="where the feature sets' CSV files go (default: features/ beside the model repository)",
    )
    parser.add_argument("--seed", type=int, default=models.DEFAULT_SEED, help="split and solver seed")
    args = parser.parse_args(argv)

    x, y = data.load()
    result = models.train(x, y, seed=args.seed)

    onnx_models = {}
    diffs: dict[str, float] = {}
    for name in CLASS_NAMES:
        onnx_models[name] = export.classifier_to_onnx(result.classifiers[name], name)
        try:
            diffs[name] = export.check_classifier(result.classifiers[name], onnx_models[name], name, x)
        except export.ExportMismatchError as exc:
            print(f"error: ONNX export check failed for model {exc}", file=sys.stderr)
            return 1
    candidate = models.train_candidate(x, y, seed=args.seed)
    onnx_models[models.CANDIDATE] = export.classifier_to_onnx(candidate, models.CANDIDATE)
    try:
        diffs[models.CANDIDATE] = export.check_classifier(
            candidate, onnx_models[models.CANDIDATE], models.CANDIDATE, x
        )
    except export.ExportMismatchError as exc:
        print(f"error: ONNX export check failed for model {exc}", file=sys.stderr)
        return 1
    aggregate = export.aggregate_model()
    _check_aggregate(aggregate, result, x)

    wine_result = wine.train(seed=args.seed)
    wine_x, _ = wine.load()
    wine_models = {}
    for m in wine.MODELS:
        wine_models[m.name] = export.renamed_classifier_to_onnx(
            wine_result.classifiers[m.name], m.name, m.input_name, m.output_name, wine.N_FEATURES, m.dtype
        )
        try:
            diffs[m.name] = export.check_probabilities(
                wine_result.classifiers[m.name],
                wine_models[m.name],
                m.name,
                wine_x.astype(m.dtype),
                m.input_name,
            )
        except export.ExportMismatchError as exc:
            print(f"error: ONNX export check failed for model {exc}", file=sys.stderr)
            return 1

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    for name in (*CLASS_NAMES, models.CANDIDATE):
        repository.write_model(out, name, repository.classifier_config(name), onnx_models[name])
    repository.write_model(out, repository.AGGREGATE, repository.aggregate_config(), aggregate)
    repository.write_model(out, repository.ENSEMBLE, repository.ensemble_config(), None)
    for m in wine.MODELS:
        repository.write_model(
            out, m.name, repository.wine_config(m), wine_models[m.name], labels=wine.WINE_CLASSES
        )
    report = render_report(result, wine_result, candidate, x, y)
    (out / REPORT_NAME).write_text(report)
    print(report)
    for name, diff in diffs.items():
        print(f"{name}: max |ONNX - scikit-learn| on every row = {diff:.1e}")
    written = [
        *CLASS_NAMES,
        models.CANDIDATE,
        repository.AGGREGATE,
        repository.ENSEMBLE,
        *(m.name for m in wine.MODELS),
    ]
    print(f"wrote {', '.join(written)} to {out}")
    csvs = features.write_csvs(args.features or out.resolve().parent / "features")
    print(f"wrote {', '.join(str(p) for p in csvs)} (the feature sets of requests by key)")
    return 0


def _check_aggregate(
    aggregate: onnx.ModelProto, result: models.TrainingResult, x: NDArray[np.float32]
) -> None:
    """The aggregator's labels must be the argmax the training report counts."""
    feeds = {n: result.classifiers[n].predict_proba(x).astype(np.float32) for n in CLASS_NAMES}
    _, label, _, _ = export.run_onnx(aggregate, feeds)
    expected = models.class_probabilities(result.classifiers, x).argmax(axis=1)
    mismatched = int((label.ravel() != expected).sum())
    if mismatched:
        # Float32 rounding can only flip near-exact ties; more than that is a bug.
        raise SystemExit(f"error: aggregate model disagrees with the argmax on {mismatched} rows")


if __name__ == "__main__":
    sys.exit(main())
