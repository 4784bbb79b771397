"""Serial pipelines: ordered steps, where a step's result decides whether to stop or go on
(their file is ``pipelines_file.py``, which describes it): what one is, and how it runs.

Rows are routed one by one: a row that meets a step's ``stop_if`` is answered there, the others
go on to the next step (only they are sent). After each step, a row's answer is the pipeline's
aggregator (as in a composition) over every service that answered for it so far; with
``one_vs_rest``, the service with the highest P(class), as in the fan-out. To the dataplane a
pipeline is a model like any other (``served.Model``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from client_proxy import tracing
from client_proxy.core.aggregators import AGGREGATORS, Aggregated, AggregationError
from client_proxy.core.compositions import Gateway, resolve_classes
from client_proxy.core.conditions import Condition, service_score
from client_proxy.core.fanout import FanOut
from client_proxy.core.outcomes import FanOutResult
from client_proxy.core.rules import Alert, AlertSink, Result, Rule, check
from client_proxy.core.services import OwnNothing, Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs, row_count, take_rows
from client_proxy.errors import AggregationFailed, Failure, ServicesFailed

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest


@dataclass(frozen=True)
class Step:
    name: str
    services: tuple[str, ...]
    input: str
    """``request``, or ``<step>.<service>``: that earlier service's output."""
    stop_if: Condition | None
    on_failure: Literal["skip", "fail"]
    line: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "services": list(self.services),
            "input": self.input,
            "stop_if": self.stop_if.text if self.stop_if else None,
            "on_failure": self.on_failure,
        }


@dataclass(frozen=True)
class Pipeline(OwnNothing):
    name: str
    description: str
    steps: tuple[Step, ...]
    aggregator: str = "one_vs_rest"
    """How the answers of every service that answered for a row make its answer (as in a
    composition): after each step, over the services of that step and of the steps before it."""
    classes: tuple[str, ...] = ()
    """Empty: the models' ``class_names`` (``one_vs_rest``: the services)."""
    rules: tuple[Rule, ...] = ()
    """Conditions on the answer that raise alerts (``rules.py``)."""
    features: str | None = None
    """The feature set a request by key reads; None: ``PROXY_FEATURE_SET``."""
    keys: str = "fetch"
    """``fetch``: the proxy reads a request's keys' rows; ``forward``: the steps that take the
    request get the keys (a ``BYTES`` tensor ``[N, 1]``), models that read their own features."""
    services: tuple[Service, ...] = ()
    """The services its steps name, in ``service_names``' order (``bind``): a pipeline holds what
    it calls, as a composition does, so that a request runs on one whole configuration."""

    by_name: dict[str, Service] = field(init=False, repr=False, compare=False)
    kind: ClassVar[Literal["pipeline"]] = "pipeline"

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", dict(zip(self.service_names, self.services, strict=False)))

    @property
    def service_names(self) -> list[str]:
        return list(dict.fromkeys(name for step in self.steps for name in step.services))

    def bind(self, services: Mapping[str, Service]) -> Pipeline:
        """This pipeline calling the services of ``services`` its steps name (KeyError: one missing)."""
        return replace(self, services=tuple(services[name] for name in self.service_names))

    def inputs_go_to(self) -> list[Service]:
        known = self.by_name
        return [known[n] for step in self.steps if step.input == "request" for n in step.services]

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        answer.report = await run_pipeline(
            self,
            x,
            self.by_name,
            plane.fanout,
            plane.gateway,
            request.request_id,
            deadline,
            plane.sink,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "aggregator": self.aggregator,
            "classes": list(self.classes),
            "steps": [s.describe() for s in self.steps],
            "rules": [r.describe() for r in self.rules],
            "features": self.features,
            "keys": self.keys,
        }


# -- running ------------------------------------------------------------------------------------
@dataclass
class StepReport:
    step: str
    status: Literal["ran", "skipped", "failed", "not_needed"]
    rows: int
    stopped_rows: int = 0
    latency_ms: float = 0.0
    missing: dict[str, Failure] = field(default_factory=dict)


@dataclass
class PipelineResult:
    labels: list[str]
    proba: NDArray[np.float64]
    stopped_at: list[str]
    """Per row: the step whose condition answered it, or the last step run."""
    path: list[StepReport]
    calls: int
    """Triton calls made (one per service per step run)."""
    scores: NDArray[np.float64] | None = None
    """Per row and class, when the aggregator gives scores (not ``one_vs_rest``)."""
    classes: tuple[str, ...] = ()
    alerts: tuple[Alert, ...] = ()
    """The pipeline's rules that some rows met."""


async def run_pipeline(
    pipeline: Pipeline,
    x: Inputs,
    services: Mapping[str, Service],
    fanout: FanOut,
    gateway: Gateway,
    request_id: str,
    deadline: float,
    sink: AlertSink | None = None,
) -> PipelineResult:
    """Run the steps in order on the rows still open; each row's answer is the pipeline's
    aggregator over every service that answered for it, up to the step that stopped it. The
    alerts of its rules (on the final answers) go to ``sink``. The request's input has been
    checked against its first steps' models (the dataplane's)."""
    where = f"pipeline {pipeline.name!r}"
    n = row_count(x)
    active = np.ones(n, dtype=bool)
    labels = [""] * n
    proba = np.zeros(n, dtype=np.float64)
    scores: NDArray[np.float64] | None = None
    classes: tuple[str, ...] = ()
    stopped_at = [""] * n
    outputs: dict[str, NDArray[Any]] = {}  # "<step>.<service>" -> full size
    answered: dict[str, NDArray[Any]] = {}  # service -> its latest output, full size
    sent: dict[str, Inputs] = {}  # service -> one row of what it was sent
    service_scores: dict[str, NDArray[np.float64]] = {}  # service -> its latest score per row, NaN: none
    path: list[StepReport] = []
    calls = 0
    for step in pipeline.steps:
        rows = np.flatnonzero(active)
        if rows.size == 0:
            path.append(StepReport(step.name, "not_needed", 0))
            continue
        source = x if step.input == "request" else outputs[step.input]
        started = time.perf_counter()
        try:
            result = await _run_step(
                fanout,
                step,
                [services[s] for s in step.services],
                take_rows(source, rows),
                request_id,
                deadline,
            )
        except ServicesFailed as exc:
            calls += len(step.services)
            if step.on_failure == "fail":
                raise ServicesFailed(f"{where}, step {step.name!r}: {exc.message}", exc.failures) from None
            path.append(StepReport(step.name, "skipped", int(rows.size), 0, _ms(started), exc.failures))
            continue
        calls += len(step.services)
        # A service of the step that did not answer: NaN, which meets no clause.
        step_scores = {name: np.full(rows.size, np.nan) for name in step.services}
        for name in result.answered:
            output = result.outcomes[name].probabilities
            assert output is not None
            full = np.zeros((n, *output.shape[1:]), dtype=output.dtype)
            full[rows] = output
            outputs[f"{step.name}.{name}"] = answered[name] = full
            sent[name] = take_rows(source, rows[:1])  # what the service takes, should its labels be read
            step_scores[name] = service_score(output, pipeline.aggregator)
            if pipeline.rules:  # only rules read them after the last step
                service_scores.setdefault(name, np.full(n, np.nan))[rows] = step_scores[name]
        # Every service in ``answered`` answered for every row still open (rows only ever leave).
        classes = await resolve_classes(
            where,
            pipeline.classes,
            pipeline.aggregator,
            [services[name] for name in answered],
            gateway,
            lambda service: sent[service.name],
            deadline,
        )
        try:
            answer = AGGREGATORS[pipeline.aggregator](
                {k: v[rows] for k, v in answered.items()}, classes, None
            )
        except AggregationError as exc:
            raise AggregationFailed(f"{where}, step {step.name!r}: {exc}") from None
        for i, row in enumerate(rows.tolist()):
            labels[row] = answer.labels[i]
            stopped_at[row] = step.name
        proba[rows] = answer.proba
        if answer.scores is not None:
            if scores is None or scores.shape[1] != answer.scores.shape[1]:
                scores = np.zeros((n, answer.scores.shape[1]), dtype=np.float64)
            scores[rows] = answer.scores
        stop = (
            step.stop_if.rows(step_scores, answer, classes, f"{where}, step {step.name!r}")
            if step.stop_if
            else np.zeros(rows.size, dtype=bool)
        )
        stopped = rows[stop]
        active[stopped] = False
        path.append(
            StepReport(step.name, "ran", int(rows.size), int(stopped.size), _ms(started), result.missing)
        )
    if any(label == "" for label in labels):
        raise ServicesFailed(
            f"{where}: no step answered",
            {r.step: Failure(r.status, ", ".join(r.missing)) for r in path if r.status == "skipped"},
            timed_out=False,
        )
    alerts: tuple[Alert, ...] = ()
    if pipeline.rules:
        for name in pipeline.service_names:
            service_scores.setdefault(name, np.full(n, np.nan))
        answer = Aggregated(labels, proba, scores)
        result_of_rules = Result(answer, classes, service_scores)
        alerts = check(pipeline.rules, f"pipeline/{pipeline.name}", result_of_rules, request_id, sink)
    return PipelineResult(
        labels, proba, stopped_at, path, calls, scores, classes if scores is not None else (), alerts
    )


async def _run_step(
    fanout: FanOut, step: Step, services: list[Service], x: Inputs, request_id: str, deadline: float
) -> FanOutResult:
    """One step's fan-out (in a span of its own beneath the request's, tracing on)."""
    policy = TimeoutPolicy.PARTIAL if step.on_failure == "skip" else TimeoutPolicy.ALL_OR_NOTHING
    if not tracing.ENABLED:
        return await fanout.run(services, x, request_id, deadline, policy)
    steps = tracing.Steps("step")
    try:
        with steps.current(step.name):
            result = await fanout.run(services, x, request_id, deadline, policy)
        steps.end(step.name, "ok")
        return result
    except ServicesFailed as exc:
        steps.end(step.name, "skipped" if step.on_failure == "skip" else "failed", error=exc.message)
        raise
    finally:
        steps.close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
