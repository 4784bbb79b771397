"""Serial pipelines: ordered steps, where a step's result decides whether to stop or go on.

A pipeline file (YAML, ``PROXY_PIPELINES_FILE``) declares::

    pipelines:
      iris_cascade:
        steps:
          - name: setosa
            services: [setosa]          # one service, or several called in parallel as one step
            input: request              # or "<earlier step>.<service>": that service's output
            stop_if: "setosa >= 0.9"    # per row: "<service of this step>|max <op> <number>"
            on_failure: skip            # skip: go on as if the step were not there; fail: 503/504
          - name: others
            services: [versicolor, virginica]

Rows are routed one by one: a row that meets a step's ``stop_if`` is answered there, the others
go on to the next step (only they are sent). The label of a row is the service with the highest
P(class) among every service that answered for it, as in the fan-out.

Errors in the file stop the start with a ``PipelineError`` naming the file and line.
"""

from __future__ import annotations

import logging
import operator
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from client_proxy import yamlfile
from client_proxy.config import Service, TimeoutPolicy
from client_proxy.errors import ServicesFailed
from client_proxy.fanout import FanOut
from client_proxy.yamlfile import Node

DEFAULT_FILE = Path(__file__).resolve().parent / "pipelines.yaml"
logger = logging.getLogger("client_proxy.pipelines")
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_CONDITION = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|>|<=|<)\s*([0-9]*\.?[0-9]+)\s*$")


class PipelineError(ValueError):
    """An invalid pipeline file; the message names the file and the line."""


@dataclass(frozen=True)
class Condition:
    operand: str
    """A service of the step (its P(class)), or ``max`` (the step's highest P(class))."""
    op: str
    threshold: float
    text: str

    def rows(self, p_class: dict[str, NDArray[np.float32]]) -> NDArray[np.bool_]:
        """Per row: does the condition hold? Rows where the operand did not answer: no."""
        if self.operand == "max":
            if not p_class:
                return np.zeros(0, dtype=bool)
            values = np.max(np.stack(list(p_class.values()), axis=1), axis=1)
        elif self.operand in p_class:
            values = p_class[self.operand]
        else:
            return np.zeros(0, dtype=bool)
        return np.asarray(_OPERATORS[self.op](values, self.threshold), dtype=bool)


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
class Pipeline:
    name: str
    description: str
    steps: tuple[Step, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "steps": [s.describe() for s in self.steps],
        }


# -- loading, with line numbers -----------------------------------------------------------------
def load_pipelines(path: Path, services: Mapping[str, Service]) -> dict[str, Pipeline]:
    """The pipelines in ``path``; ``PipelineError`` naming the line for anything invalid."""
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
        unknown = set(pnode.value) - {"steps", "description"}
        if unknown:
            raise fail(pnode, f"pipeline {name!r}: unknown key(s) {sorted(unknown)}")
        steps_node = pnode.value.get("steps")
        if steps_node is None or not isinstance(steps_node.value, list) or not steps_node.value:
            raise fail(pnode, f"pipeline {name!r} needs a non-empty list of steps")
        steps: list[Step] = []
        for snode in steps_node.value:
            steps.append(_step(snode, steps, services, fail))
        description = pnode.value.get("description", Node("", pnode.line)).value
        pipelines[name] = Pipeline(name, str(description or ""), tuple(steps))
    return pipelines


def _step(
    node: Node,
    earlier: list[Step],
    services: Mapping[str, Service],
    fail: Callable[[Node, str], PipelineError],
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
                f"step {name.value!r}: unknown service {service!r} (known: {', '.join(sorted(services))})",
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
        text = str(fields["stop_if"].value)
        match = _CONDITION.match(text)
        if match is None:
            raise fail(
                fields["stop_if"],
                f"stop_if {text!r}: expected '<service>|max <op> <number>', op one of >= > <= <",
            )
        if match[1] != "max" and match[1] not in service_names:
            raise fail(
                fields["stop_if"], f"stop_if {text!r}: {match[1]!r} is not a service of step {name.value!r}"
            )
        condition = Condition(match[1], match[2], float(match[3]), text.strip())
    on_failure = fields.get("on_failure", Node("fail", node.line))
    if on_failure.value not in ("skip", "fail"):
        raise fail(on_failure, f"on_failure must be 'skip' or 'fail', not {on_failure.value!r}")
    return Step(name.value, service_names, str(source.value), condition, on_failure.value, node.line)


def configured_pipelines(
    path: Path | None, services: Mapping[str, Service]
) -> tuple[dict[str, Pipeline], str]:
    """The pipelines to serve, and from where.

    A file the operator named must be valid (``PipelineError`` otherwise). The shipped default
    is only a convenience: when the services are not the Iris ones it is left out, with a
    warning, rather than stopping a proxy whose services were changed on purpose.
    """
    if path is not None:
        return load_pipelines(path, services), str(path)
    try:
        return load_pipelines(DEFAULT_FILE, services), str(DEFAULT_FILE)
    except PipelineError as exc:
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
    missing: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class PipelineResult:
    labels: list[str]
    proba: NDArray[np.float32]
    stopped_at: list[str]
    """Per row: the step whose condition answered it, or the last step run."""
    path: list[StepReport]
    calls: int
    """Triton calls made (one per service per step run)."""


async def run_pipeline(
    pipeline: Pipeline,
    x: NDArray[np.float32],
    services: Mapping[str, Service],
    fanout: FanOut,
    request_id: str,
    deadline: float,
) -> PipelineResult:
    n = x.shape[0]
    active = np.ones(n, dtype=bool)
    best = np.full(n, -1.0, dtype=np.float64)
    labels = [""] * n
    stopped_at = [""] * n
    outputs: dict[str, NDArray[np.float32]] = {}  # "<step>.<service>" -> [n, 2], full size
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
            result = await fanout.run(
                [services[s] for s in step.services],
                np.ascontiguousarray(source[rows]),
                request_id,
                deadline,
                TimeoutPolicy.PARTIAL if step.on_failure == "skip" else TimeoutPolicy.ALL_OR_NOTHING,
            )
        except ServicesFailed as exc:
            calls += len(step.services)
            if step.on_failure == "fail":
                raise ServicesFailed(
                    f"pipeline {pipeline.name!r}, step {step.name!r}: {exc.message}",
                    exc.details.get("services", {}),
                    timed_out=exc.status_code == 504,
                ) from None
            path.append(
                StepReport(
                    step.name, "skipped", int(rows.size), 0, _ms(started), exc.details.get("services", {})
                )
            )
            continue
        calls += len(step.services)
        p_class: dict[str, NDArray[np.float32]] = {}
        for name in result.answered:
            probabilities = result.outcomes[name].probabilities
            assert probabilities is not None
            full = np.zeros((n, probabilities.shape[1]), dtype=np.float32)
            full[rows] = probabilities
            outputs[f"{step.name}.{name}"] = full
            p_class[name] = probabilities[:, 0]
            better = probabilities[:, 0] > best[rows]
            for i in rows[better]:
                labels[i] = name
            best[rows[better]] = probabilities[better, 0]
        for i in rows:
            stopped_at[i] = step.name
        stop = step.stop_if.rows(p_class) if step.stop_if else np.zeros(0, dtype=bool)
        stopped = rows[stop] if stop.size == rows.size else np.zeros(0, dtype=int)
        active[stopped] = False
        path.append(
            StepReport(step.name, "ran", int(rows.size), int(stopped.size), _ms(started), result.missing)
        )
    if any(label == "" for label in labels):
        raise ServicesFailed(
            f"pipeline {pipeline.name!r}: no step answered",
            {
                r.step: {"reason": r.status, "message": ", ".join(r.missing)}
                for r in path
                if r.status == "skipped"
            },
            timed_out=False,
        )
    return PipelineResult(labels, best.astype(np.float32), stopped_at, path, calls)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def report_body(pipeline: Pipeline, result: PipelineResult, one_row: bool) -> dict[str, Any]:
    predictions = [
        {"proba": float(p), "label": label, "stopped_at": stop}
        for p, label, stop in zip(result.proba.tolist(), result.labels, result.stopped_at, strict=True)
    ]
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
    }
