"""Results shaped into the JSON the routes answer with (the seed's shapes for the Iris API)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from client_proxy.core.dataplane import InferenceAnswer
from client_proxy.core.outcomes import FanOutResult, Outcome, failure
from client_proxy.core.pipelines import Pipeline, PipelineResult
from client_proxy.core.rules import Alert


def predictions_body(result: FanOutResult, one_row: bool) -> dict[str, Any]:
    """The seed's shape: ``{service: {"prediction": [p_class, p_other]}}`` for one row,
    ``{service: {"prediction": [[p_class, p_other], ...]}}`` for N rows. A service that did not
    answer (``partial``) has ``"prediction": null`` and an ``"error"``."""
    body: dict[str, Any] = {}
    for name, outcome in result.outcomes.items():
        if outcome.probabilities is not None:
            body[name] = {"prediction": outcome.probabilities[0] if one_row else outcome.probabilities}
        else:
            body[name] = {"prediction": None, "error": failure(outcome)}
    return body


@dataclass(frozen=True)
class Labels:
    """The seed's label per row: the service whose P(class) is highest, and that P (float32)."""

    names: list[str]
    proba: NDArray[np.float32]


def seed_labels(answer: InferenceAnswer) -> Labels:
    """The seed's labels from the default composition's (or the ensemble's) answer."""
    aggregated = answer.aggregated
    assert aggregated is not None
    return Labels(names=aggregated.labels, proba=aggregated.proba.astype(np.float32))


def label_body(labels: Labels, one_row: bool, result: FanOutResult | None) -> dict[str, Any]:
    """``{"prediction": {"proba": p, "label": name}}`` for one row, a list of those for N rows;
    ``"partial": true`` and ``"missing"`` (service -> reason) when some service did not answer."""
    if one_row:
        prediction: Any = {"proba": float(labels.proba[0]), "label": labels.names[0]}
    else:
        prediction = [
            {"proba": p, "label": n} for p, n in zip(labels.proba.tolist(), labels.names, strict=True)
        ]
    return with_missing({"prediction": prediction}, result)


def with_missing(body: dict[str, Any], result: FanOutResult | None) -> dict[str, Any]:
    """``body`` with ``"partial": true`` and ``"missing"`` (service -> reason) when some service
    did not answer; as it was otherwise."""
    if result is not None and result.partial:
        body["partial"] = True
        body["missing"] = result.missing
    return body


def line(content: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def service_line(outcome: Outcome, one_row: bool) -> bytes:
    """One stream line: a service's answer (or its error) and how long it took."""
    content: dict[str, Any] = {"service": outcome.service, "latency_ms": round(outcome.latency_s * 1000, 3)}
    if outcome.probabilities is not None:
        content["prediction"] = outcome.probabilities[0] if one_row else outcome.probabilities
    else:
        content["error"] = failure(outcome)
    return line(content)


def label_rows(answer: InferenceAnswer) -> list[dict[str, Any]]:
    """A composition's answer per row: ``{"label", "proba"}``, and ``"scores"`` per class when
    the aggregator gives them."""
    aggregated = answer.aggregated
    assert aggregated is not None
    rows = []
    for i, (winner, proba) in enumerate(zip(aggregated.labels, aggregated.proba.tolist(), strict=True)):
        row: dict[str, Any] = {"label": winner, "proba": proba}
        if aggregated.scores is not None:
            row["scores"] = dict(zip(answer.classes, aggregated.scores[i].tolist(), strict=True))
        rows.append(row)
    return rows


def with_alerts(body: dict[str, Any], alerts: Sequence[Alert]) -> dict[str, Any]:
    """``body`` with ``"alerts"``: each rule met, its severity and the rows that met it (none met:
    no key, the body as it was)."""
    if alerts:
        body["alerts"] = [alert.describe() for alert in alerts]
    return body


def finished(body: dict[str, Any], answer: InferenceAnswer) -> dict[str, Any]:
    """``body`` with, for a request by key, the key of each row (``keys``) and the keys not found
    (``missing_keys``, and ``partial``); for an experiment, the ``variant`` that answered."""
    fetched = answer.fetched
    if fetched is not None:
        body.update(fetched.describe())
        if fetched.missing:
            body["partial"] = True
    if answer.variant is not None:
        body["variant"] = answer.variant.name
    return body


# -- each door's answer, from the dataplane's ------------------------------------------------
def seed_predictions(answer: InferenceAnswer) -> dict[str, Any]:
    """``/predict``: every service's ``[P(class), P(other)]``, the keys for a request by key."""
    assert answer.result is not None
    return finished(predictions_body(answer.result, answer.one_row), answer)


def seed_label(answer: InferenceAnswer) -> dict[str, Any]:
    """``/predict/label``: the label per row (the fan-out's or the ensemble's), the keys."""
    return finished(label_body(seed_labels(answer), answer.one_row, answer.result), answer)


def composition_predictions(answer: InferenceAnswer) -> dict[str, Any]:
    """``/compositions/{name}/predict``: each service's output, the alerts, the keys."""
    assert answer.result is not None
    body = with_alerts(predictions_body(answer.result, answer.one_row), answer.alerts)
    return finished(body, answer)


def composition_label(answer: InferenceAnswer) -> dict[str, Any]:
    """``/compositions/{name}/label``: the aggregated answer per row, ``partial`` and ``missing``
    when some service did not answer, the alerts, the keys."""
    rows = label_rows(answer)
    body = with_missing({"prediction": rows[0] if answer.one_row else rows}, answer.result)
    return finished(with_alerts(body, answer.alerts), answer)


def pipeline_answer(answer: InferenceAnswer) -> dict[str, Any]:
    """``/pipelines/{name}``: the label per row, the path taken, each step's latency, the keys."""
    pipeline, report = answer.target, answer.report
    assert isinstance(pipeline, Pipeline) and report is not None
    return finished(report_body(pipeline, report, one_row=answer.one_row), answer)


def report_body(pipeline: Pipeline, result: PipelineResult, one_row: bool) -> dict[str, Any]:
    """A pipeline's answer: the label per row, the path its rows took and the Triton calls made."""
    predictions = []
    for i, (p, label, stop) in enumerate(
        zip(result.proba.tolist(), result.labels, result.stopped_at, strict=True)
    ):
        prediction: dict[str, Any] = {"proba": p, "label": label, "stopped_at": stop}
        if result.scores is not None:
            prediction["scores"] = dict(zip(result.classes, result.scores[i].tolist(), strict=True))
        predictions.append(prediction)
    return {
        "pipeline": pipeline.name,
        "prediction": predictions[0] if one_row else predictions,
        "path": [
            {
                "step": r.step,
                "status": r.status,
                "rows": r.rows,
                "stopped_rows": r.stopped_rows,
                "latency_ms": r.latency_ms,
                **({"missing": r.missing} if r.missing else {}),
            }
            for r in result.path
        ],
        "triton_calls": result.calls,
        **({"alerts": [alert.describe() for alert in result.alerts]} if result.alerts else {}),
    }
