"""The pipelines file: serial pipelines declared in YAML, loaded with line numbers (what a
pipeline is and how it runs: ``pipelines.py``).

A pipeline file (YAML, ``PROXY_PIPELINES_FILE``) declares::

    pipelines:
      iris_cascade:
        aggregator: one_vs_rest         # optional, the default; or mean | vote | max
        classes: [...]                  # optional: else the models' class_names
        features: iris                  # optional: the feature set of {"keys": [...]}
        keys: fetch                     # optional: fetch (the proxy reads the keys' rows) |
                                        # forward (the first steps' models get the keys)
        steps:
          - name: setosa
            services: [setosa]          # one service, or several called in parallel as one step
            input: request              # or "<earlier step>.<service>": that service's output
            stop_if: "setosa >= 0.9"    # per row: a condition (core/conditions.py), see below
            on_failure: skip            # skip: go on as if the step were not there; fail: 503/504
          - name: others
            services: [versicolor, virginica]

How the rows go through the steps is ``pipelines.py``'s to say. ``stop_if`` reads
``proba`` (that answer's probability), a class name (its score for that class), a service of
the step (its P(class) for ``one_vs_rest``, else its highest probability) or ``max`` (the
highest of those over the step's services), or ``label``; clauses may be joined by ``and`` and
``or`` (``conditions.py``). A step may name the ``SERVICE_*`` services and the
compositions' services.

Errors in the file stop the start with a ``PipelineError`` naming the file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from client_proxy.core import conditions, yamlfile
from client_proxy.core.aggregators import AGGREGATORS
from client_proxy.core.compositions_file import expand, read_classes, read_feature_set, read_key_mode
from client_proxy.core.pipelines import Pipeline, Step
from client_proxy.core.rules import read_rules
from client_proxy.core.services import Service
from client_proxy.core.yamlfile import Node

DEFAULT_FILE = Path(__file__).resolve().parent / "pipelines.yaml"
logger = logging.getLogger("client_proxy.core.pipelines_file")


_PIPELINE_KEYS = {"steps", "description", "aggregator", "classes", "rules", "features", "keys"}


class PipelineError(ValueError):
    """An invalid pipeline file; the message names the file and the line."""


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
        unknown = set(pnode.value) - _PIPELINE_KEYS
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
        keys = read_key_mode(pnode.value.get("keys"), f"pipeline {name!r}", fail)
        pipelines[name] = Pipeline(
            name, str(description or ""), tuple(steps), str(aggregator.value), classes, rules, features, keys
        ).bind(services)
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
