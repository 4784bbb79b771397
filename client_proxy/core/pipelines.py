"""Serial pipelines: ordered steps, where a step's result decides whether to stop or go on.

A pipeline file (YAML, ``PROXY_PIPELINES_FILE``) declares::

    pipelines:
      iris_cascade:
        aggregator: one_vs_rest         # optional, the default; or mean | vote | max
        classes: [...]                  # optional: else the models' class_names
        steps:
          - name: setosa
            services: [setosa]          # one service, or several called in parallel as one step
            input: request              # or "<earlier step>.<service>": that service's output
            stop_if: "setosa >= 0.9"    # per row: a condition (core/conditions.py), see below
            on_failure: skip            # skip: go on as if the step were not there; fail: 503/504
          - name: others
            services: [versicolor, virginica]

Rows are routed one by one: a row that meets a step's ``stop_if`` is answered there, the others
go on to the next step (only they are sent). After each step, a row's answer is the pipeline's
aggregator (as in a composition) over every service that answered for it so far; with
``one_vs_rest``, the service with the highest P(class), as in the fan-out. ``stop_if`` reads
``proba`` (that answer's probability), a class name (its score for that class), a service of
the step (its P(class) for ``one_vs_rest``, else its highest probability) or ``max`` (the
highest of those over the step's services), or ``label``; clauses may be joined by ``and`` and
``or`` (``conditions.py``). A step may name the ``SERVICE_*`` services and the
compositions' services.

Errors in the file stop the start with a ``PipelineError`` naming the file and line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from client_proxy import tracing
from client_proxy.core import conditions, yamlfile
from client_proxy.core.aggregators import AGGREGATORS, Aggregated, AggregationError
from client_proxy.core.compositions import Gateway, resolve_classes
from client_proxy.core.compositions_file import expand, read_classes, read_feature_set
from client_proxy.core.conditions import Condition, service_score
from client_proxy.core.fanout import FanOut
from client_proxy.core.outcomes import FanOutResult
from client_proxy.core.rules import Alert, AlertSink, Result, Rule, check, read_rules
from client_proxy.core.services import OwnNothing, Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs, row_count, take_rows
from client_proxy.core.yamlfile import Node
from client_proxy.errors import AggregationFailed, Failure, ServicesFailed

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest

DEFAULT_FILE = Path(__file__).resolve().parent / "pipelines.yaml"
logger = logging.getLogger("client_proxy.core.pipelines")


class PipelineError(ValueError):
    """An invalid pipeline file; the message names the file and the line."""


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

    kind: ClassVar[Literal["pipeline"]] = "pipeline"

    @property
    def service_names(self) -> list[str]:
        return list(dict.fromkeys(name for step in self.steps for name in step.services))

    def inputs_go_to(self, services: Callable[[], Mapping[str, Service]]) -> list[Service]:
        known = services()
        return [known[n] for step in self.steps if step.input == "request" for n in step.services]

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        answer.report = await run_pipeline(
            self,
            x,
            plane.models.services(),
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
        }


# -- loading, with line numbers -----------------------------------------------------------------
def load_pipelines(
    path: Path, services: Mapping[str, Service], environ: Mapping[str, str]
) -> dict[str, Pipeline]:
    """The pipelines in ``path``; ``PipelineError`` naming the line for anything invalid.
    ``environ``: the variables the ``${VAR}`` of the rules' webhook URLs are read from (the
    caller's: the core reads no environment)."""
    where = str(path)
    document = yamlfile.read(path, "pipeline file", PipelineError)

    def fail(node: Node, message: str) -> PipelineError:
        return PipelineError(f"{where}: line {node.line}: {message}")

    if not isinstance(document.value, dict) or not isinstance(
        document.value.get("pipelines", Node(None, 1)).value, dict
    ):
        raise fail(document, "expected a mapping with a 'pipelines' mapping")
    pipelines = {}
    for name, pnode in document.value["pipelines"].value.items():
        if not isinstance(pnode.value, dict):
            raise fail(pnode, f"pipeline {name!r} must be a mapping with 'steps'")
        unknown = set(pnode.value) - {"steps", "description", "aggregator", "classes", "rules", "features"}
        if unknown:
            raise fail(pnode, f"pipeline {name!r}: unknown key(s) {sorted(unknown)}")
        aggregator = pnode.value.get("aggregator", Node("one_vs_rest", pnode.line))
        if aggregator.value not in AGGREGATORS:
            raise fail(
                aggregator, f"pipeline {name!r}: aggregator must be one of {', '.join(AGGREGATORS)}, "
                f"not {aggregator.value!r}"
            )  # fmt: skip
        classes = read_classes(pnode.value.get("classes"), f"pipeline {name!r}", fail)
        steps_node = pnode.value.get("steps")
        if steps_node is None or not isinstance(steps_node.value, list) or not steps_node.value:
            raise fail(pnode, f"pipeline {name!r} needs a non-empty list of steps")
        steps: list[Step] = []
        for snode in steps_node.value:
            steps.append(_step(snode, steps, services, fail, str(aggregator.value), classes))
        description = pnode.value.get("description", Node("", pnode.line)).value
        rules = read_rules(
            pnode.value.get("rules"),
            f"pipeline {name!r}",
            list(dict.fromkeys(s for step in steps for s in step.services)),
            classes,
            str(aggregator.value),
            fail,
            lambda text: expand(text, environ),
        )
        features = read_feature_set(pnode.value.get("features"), f"pipeline {name!r}", fail)
        pipelines[name] = Pipeline(
            name, str(description or ""), tuple(steps), str(aggregator.value), classes, rules, features
        )
    return pipelines


def _step(
    node: Node,
    earlier: list[Step],
    services: Mapping[str, Service],
    fail: Callable[[Node, str], PipelineError],
    aggregator: str,
    classes: tuple[str, ...],
) -> Step:
    if not isinstance(node.value, dict):
        raise fail(node, "a step must be a mapping")
    fields = node.value
    unknown = set(fields) - {"name", "services", "input", "stop_if", "on_failure"}
    if unknown:
        raise fail(node, f"unknown key(s) {sorted(unknown)}")
    name = fields.get("name", Node(None, node.line))
    if not isinstance(name.value, str) or not name.value:
        raise fail(name, "a step needs a 'name'")
    if any(s.name == name.value for s in earlier):
        raise fail(name, f"step name {name.value!r} is used twice")
    listed = fields.get("services", Node(None, node.line))
    names = [listed.value] if isinstance(listed.value, str) else listed.value
    if not isinstance(names, list) or not names:
        raise fail(listed, f"step {name.value!r} needs 'services': a service or a list of them")
    service_names = tuple(item.value if isinstance(item, Node) else item for item in names)
    for service in service_names:
        if service not in services:
            raise fail(
                listed,
                f"step {name.value!r}: unknown service {service!r} (known: {', '.join(sorted(services))}); "
                f"declare it (SERVICE_{service.upper()}, or in a composition of PROXY_COMPOSITIONS_FILE), "
                "or name a pipelines file of your own (PROXY_PIPELINES_FILE)",
            )
    source = fields.get("input", Node("request", node.line))
    if source.value != "request":
        step_name, _, service = str(source.value).partition(".")
        if step_name == name.value or step_name not in {s.name for s in earlier}:
            # A step can only read what an earlier step produced: anything else is a cycle
            # (itself, or a step that runs after it) or a dangling reference.
            raise fail(
                source,
                f"step {name.value!r}: input {source.value!r} is not an earlier step's output (a cycle?)",
            )
        producer = next(s for s in earlier if s.name == step_name)
        if service not in producer.services:
            raise fail(
                source,
                f"step {name.value!r}: input {source.value!r}: step {step_name!r} has no service {service!r}",
            )
    condition = None
    if "stop_if" in fields:
        try:
            condition = conditions.parse(str(fields["stop_if"].value))
        except conditions.ConditionSyntaxError as exc:
            raise fail(fields["stop_if"], f"stop_if {exc}") from None
        # A class name is checked here when the classes are declared, else against the models'
        # class names when the step runs (one_vs_rest: the classes are the services).
        operand = conditions.check_operands(condition, service_names, classes, aggregator)
        if operand is not None:
            raise fail(
                fields["stop_if"], f"stop_if {condition.text!r}: {operand!r} is not a service of "
                f"step {name.value!r}, one of the classes, 'proba', 'max' or 'label'"
            )  # fmt: skip
    on_failure = fields.get("on_failure", Node("fail", node.line))
    if on_failure.value not in ("skip", "fail"):
        raise fail(on_failure, f"on_failure must be 'skip' or 'fail', not {on_failure.value!r}")
    return Step(name.value, service_names, str(source.value), condition, on_failure.value, node.line)


def configured_pipelines(
    path: Path | None, services: Mapping[str, Service], environ: Mapping[str, str], warn: bool = True
) -> tuple[dict[str, Pipeline], str]:
    """The pipelines to serve, and from where.

    A file the operator named must be valid (``PipelineError`` otherwise). The shipped default
    is only a convenience: when the services are not the Iris ones it is left out, with a
    warning, rather than stopping a proxy whose services were changed on purpose.
    """
    if path is not None:
        return load_pipelines(path, services, environ), str(path)
    try:
        return load_pipelines(DEFAULT_FILE, services, environ), str(DEFAULT_FILE)
    except PipelineError as exc:
        if warn:
            logger.warning("the shipped pipelines are not served: %s", exc)
        return {}, f"{DEFAULT_FILE} (not served: {exc})"


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
