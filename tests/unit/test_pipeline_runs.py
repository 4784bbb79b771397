"""A pipeline run with a fake gateway: rows routed step by step, each row's answer the
aggregator over every service that answered for it, ``stop_if`` reading that answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from client_proxy.core import conditions
from client_proxy.core.fanout import FanOut
from client_proxy.core.pipelines import Pipeline, PipelineResult, Step, run_pipeline
from client_proxy.core.services import Service
from client_proxy.errors import AggregationFailed, UpstreamUnavailable

CLASSES = ("a", "b", "c")
SERVICES = {n: Service(n, "grpc", "x:1", n) for n in ("first", "second", "third")}
# Per service, each row's probabilities over CLASSES (the rows are 0, 1 and 2).
OUTPUTS = {
    "first": np.array([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]),
    "second": np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]),
    "third": np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]]),
}


class FakeGateway:
    """Answers each service's rows from OUTPUTS (the rows' first feature is the row number)."""

    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.down = down

    async def infer(self, service: Service, x: Any, request_id: str, timeout: float) -> np.ndarray:
        rows = [int(r) for r in x[:, 0]]
        self.calls.append((service.name, rows))
        if service.name in self.down:
            raise UpstreamUnavailable(f"{service.name}: down", service=service.name)
        return OUTPUTS[service.name][rows].astype(np.float32)

    def fits(self, services: list[Service], x: Any) -> bool:
        return True

    async def ensure_fit(self, services: list[Service], x: Any, timeout: float) -> None:
        return None

    async def class_names(self, service: Service, x: Any, timeout: float) -> tuple[str, ...]:
        return CLASSES


def _pipeline(stop_if: str | None, aggregator: str = "mean", on_failure: str = "fail") -> Pipeline:
    condition = conditions.parse(stop_if) if stop_if else None
    return Pipeline(
        "p",
        "",
        (
            Step("one", ("first",), "request", condition, on_failure, 1),  # type: ignore[arg-type]
            Step("two", ("second", "third"), "request", None, "fail", 2),
        ),
        aggregator,
    )


def _run(pipeline: Pipeline, gateway: FakeGateway) -> PipelineResult:
    async def main() -> PipelineResult:
        x = np.arange(3, dtype=np.float64).reshape(3, 1)
        fanout = FanOut(gateway.infer, 5.0)
        return await run_pipeline(pipeline, x, SERVICES, fanout, gateway, "rid", time.monotonic() + 5)

    return asyncio.run(main())


def test_a_row_stopped_early_is_answered_by_the_services_so_far_the_others_by_all() -> None:
    gateway = FakeGateway()
    result = _run(_pipeline("proba >= 0.95"), gateway)
    assert result.stopped_at == ["one", "two", "two"]
    assert gateway.calls == [("first", [0, 1, 2]), ("second", [1, 2]), ("third", [1, 2])]
    everyone = (OUTPUTS["first"] + OUTPUTS["second"] + OUTPUTS["third"]) / 3
    assert result.labels == ["a", "b", "c"]
    np.testing.assert_allclose(result.proba, [0.97, everyone[1, 1], everyone[2, 2]], atol=1e-6)
    assert result.scores is not None and result.classes == CLASSES
    np.testing.assert_allclose(result.scores[1:], everyone[1:], atol=1e-6)
    assert result.calls == 3


def test_stop_if_reads_a_class_score_of_the_answer() -> None:
    result = _run(_pipeline("c >= 0.65"), FakeGateway())
    assert result.stopped_at == ["two", "two", "one"]


def test_a_vote_pipeline_answers_with_the_votes_share() -> None:
    result = _run(_pipeline(None, aggregator="vote"), FakeGateway())
    assert result.labels == ["a", "b", "c"]
    np.testing.assert_allclose(result.proba, [1.0, 2 / 3, 1.0])


def test_a_skipped_step_leaves_the_rows_to_the_next() -> None:
    gateway = FakeGateway(down=frozenset({"first"}))
    result = _run(_pipeline("proba >= 0.95", on_failure="skip"), gateway)
    assert [r.status for r in result.path] == ["skipped", "ran"]
    assert result.path[0].missing["first"].reason == "unavailable"
    assert result.stopped_at == ["two", "two", "two"]
    both = (OUTPUTS["second"] + OUTPUTS["third"]) / 2
    np.testing.assert_allclose(result.proba, both.max(axis=1), atol=1e-6)


def test_a_class_the_answer_does_not_have_is_an_aggregation_error() -> None:
    with pytest.raises(AggregationFailed, match="'d' is not one of the classes"):
        _run(_pipeline("d >= 0.5"), FakeGateway())
