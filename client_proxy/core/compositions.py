"""Compositions: several services answering one request, combined by a declared aggregator.

A compositions file (YAML, ``PROXY_COMPOSITIONS_FILE``) declares them::

    compositions:
      wine:
        description: three wine classifiers, soft vote
        services:
          wine_logreg: {target: "triton:8001/wine_logreg", weight: 2}
          wine_gbt: {target: "triton:8001/wine_gbt"}
          wine_knn: {target: "${TRITON_GRPC_URL:-localhost:8001}/wine_knn"}   # from the environment
        aggregator: mean               # one_vs_rest | mean | vote | max | none
        classes: [class_0, class_1, class_2]   # optional: else the models' class_names
        timeout_policy: partial        # optional: else PROXY_TIMEOUT_POLICY
        deadline_ms: 1500              # optional: else PROXY_DEADLINE_MS (never more)
        min_answers: 2                 # a partial answer needs at least this many services

A service's entry may also name the ``output`` it contributes, for a model with several, and
its ``hedge`` (``off``, ``20ms``, ``p95``; default ``PROXY_HEDGE``) when its target names replicas.
Errors in the file stop the start with a ``CompositionError`` naming the file and the line.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client_proxy.core import yamlfile
from client_proxy.core.aggregators import AGGREGATORS, Aggregated, AggregationError
from client_proxy.core.conditions import service_score
from client_proxy.core.features import FEATURE_SET
from client_proxy.core.outcomes import FanOutResult
from client_proxy.core.rules import Alert, AlertSink, Result, Rule, check, read_rules
from client_proxy.core.services import (
    ConfigError,
    Protocol,
    Service,
    TimeoutPolicy,
    parse_hedge,
    parse_service,
    time_left,
    valid_name,
)
from client_proxy.core.tensors import Inputs
from client_proxy.core.yamlfile import Node
from client_proxy.errors import AggregationFailed, ServicesFailed

AGGREGATOR_NAMES = (*AGGREGATORS, "none")
_KEYS = {
    "description",
    "services",
    "aggregator",
    "classes",
    "timeout_policy",
    "deadline_ms",
    "min_answers",
    "rules",
    "features",
    "keys",
}
#: What a composition does with a request's keys: the proxy reads their rows from the feature
#: store once (``fetch``), or sends the keys themselves to its services, models that read their
#: own features (``forward``).
KEY_MODES = ("fetch", "forward")
_MEMBER_KEYS = {"target", "weight", "output", "hedge"}


class CompositionError(ValueError):
    """An invalid compositions file; the message names the file and the line."""


@dataclass(frozen=True)
class Member:
    service: Service
    weight: float = 1.0


@dataclass(frozen=True)
class Composition:
    name: str
    description: str
    members: tuple[Member, ...]
    aggregator: str
    classes: tuple[str, ...] = ()
    """Empty: the models' own ``class_names`` (checked to agree) or, for ``one_vs_rest``, the services."""
    timeout_policy: TimeoutPolicy | None = None
    deadline_ms: float | None = None
    min_answers: int = 1
    rules: tuple[Rule, ...] = ()
    """Conditions on the answer that raise alerts (``rules.py``)."""
    features: str | None = None
    """The feature set a request by key reads (``features.py``); None: ``PROXY_FEATURE_SET``."""
    keys: str = "fetch"
    """``fetch``: the proxy reads a request's keys' rows; ``forward``: the services get the keys
    (a ``BYTES`` tensor ``[N, 1]``) and read the rows themselves."""

    services: tuple[Service, ...] = field(init=False, repr=False, compare=False)
    """The members' services, in order (read on every request: computed once)."""
    weights: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(m.service for m in self.members))
        object.__setattr__(self, "weights", {m.service.name: m.weight for m in self.members})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "services": {m.service.name: {"target": m.service.describe(), "weight": m.weight,
                                          "output": m.service.output,
                                          "hedge": m.service.hedge.describe() if m.service.hedge else None}
                         for m in self.members},
            "aggregator": self.aggregator,
            "classes": list(self.classes),
            "timeout_policy": self.timeout_policy.value if self.timeout_policy else None,
            "deadline_ms": self.deadline_ms,
            "min_answers": self.min_answers,
            "rules": [r.describe() for r in self.rules],
            "features": self.features,
            "keys": self.keys,
        }  # fmt: skip


def load_compositions(
    path: Path,
    services: Mapping[str, Service],
    default_protocol: Protocol,
    environ: Mapping[str, str],
) -> dict[str, Composition]:
    """The compositions in ``path``; ``CompositionError`` naming the line for anything invalid.

    A service is the one ``services`` (the ``SERVICE_*`` variables) names, or its own ``target``,
    in which ``${VAR}`` and ``${VAR:-default}`` are read from ``environ`` (the caller's: the
    core reads no environment).
    """
    where = str(path)
    document = yamlfile.read(path, "compositions file", CompositionError)

    def fail(node: Node, message: str) -> CompositionError:
        return CompositionError(f"{where}: line {node.line}: {message}")

    root = document.value
    if not isinstance(root, dict) or not isinstance(root.get("compositions", Node(None, 1)).value, dict):
        raise fail(document, "expected a mapping with a 'compositions' mapping")
    found = {}
    for name, node in root["compositions"].value.items():
        found[name] = _composition(name, node, services, default_protocol, fail, environ)
    return found


def _composition(
    name: str,
    node: Node,
    services: Mapping[str, Service],
    default_protocol: Protocol,
    fail: Any,
    environ: Mapping[str, str],
) -> Composition:
    if not isinstance(node.value, dict):
        raise fail(node, f"composition {name!r} must be a mapping with 'services'")
    if not valid_name(name):
        raise fail(node, f"composition name {name!r} must be lower-case letters, digits and '_'")
    fields = node.value
    unknown = set(fields) - _KEYS
    if unknown:
        raise fail(node, f"composition {name!r}: unknown key(s) {sorted(unknown)}")
    listed = fields.get("services", Node(None, node.line))
    if not isinstance(listed.value, dict) or not listed.value:
        raise fail(listed, f"composition {name!r} needs 'services': a mapping of service names")
    members = []
    for service_name, entry in listed.value.items():
        members.append(_member(name, service_name, entry, services, default_protocol, fail, environ))
    aggregator = fields.get("aggregator", Node(None, node.line))
    if aggregator.value not in AGGREGATOR_NAMES:
        raise fail(
            aggregator, f"composition {name!r}: aggregator must be one of {', '.join(AGGREGATOR_NAMES)}, "
            f"not {aggregator.value!r}"
        )  # fmt: skip
    classes = read_classes(fields.get("classes"), f"composition {name!r}", fail)
    policy = None
    if "timeout_policy" in fields:
        try:
            policy = TimeoutPolicy(fields["timeout_policy"].value)
        except ValueError:
            raise fail(
                fields["timeout_policy"],
                f"composition {name!r}: timeout_policy must be 'partial' or 'all_or_nothing'",
            ) from None
    deadline = None
    if "deadline_ms" in fields:
        deadline = fields["deadline_ms"].value
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not 50 <= deadline <= 600_000
        ):
            raise fail(
                fields["deadline_ms"], f"composition {name!r}: deadline_ms must be a number from 50 to 600000"
            )
    minimum = fields.get("min_answers", Node(1, node.line))
    if (
        isinstance(minimum.value, bool)
        or not isinstance(minimum.value, int)
        or not 1 <= minimum.value <= len(members)
    ):
        raise fail(
            minimum, f"composition {name!r}: min_answers must be a whole number from 1 to {len(members)}"
        )
    description = fields.get("description", Node("", node.line)).value
    rules = read_rules(
        fields.get("rules"),
        f"composition {name!r}",
        [m.service.name for m in members],
        classes,
        str(aggregator.value),
        fail,
        lambda text: expand(text, environ),
    )
    return Composition(
        name=name,
        description=str(description or ""),
        members=tuple(members),
        aggregator=str(aggregator.value),
        classes=classes,
        timeout_policy=policy,
        deadline_ms=float(deadline) if deadline is not None else None,
        min_answers=minimum.value,
        rules=rules,
        features=read_feature_set(fields.get("features"), f"composition {name!r}", fail),
        keys=_read_key_mode(fields.get("keys"), name, fail),
    )


def _read_key_mode(node: Node | None, name: str, fail: Any) -> str:
    if node is None:
        return "fetch"
    if node.value not in KEY_MODES:
        raise fail(node, f"composition {name!r}: keys must be fetch (the proxy reads the feature store) "
                         "or forward (the services get the keys)")  # fmt: skip
    return str(node.value)


def read_feature_set(node: Node | None, owner: str, fail: Any) -> str | None:
    """A ``features`` entry: the name of a feature set; None when there is none."""
    if node is None:
        return None
    if not isinstance(node.value, str) or not FEATURE_SET.match(node.value):
        raise fail(node, f"{owner}: features must name a feature set (lower-case letters, digits and '_')")
    return node.value


def read_classes(node: Node | None, owner: str, fail: Any) -> tuple[str, ...]:
    """A ``classes`` list of distinct names; empty when there is none."""
    if node is None:
        return ()
    values = [item.value for item in node.value] if isinstance(node.value, list) else None
    if not values or not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
        raise fail(node, f"{owner}: classes must be a list of distinct names")
    return tuple(values)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, environ: Mapping[str, str]) -> str | None:
    """``${VAR}`` and ``${VAR:-default}`` from the environment; None when one is unset with no default."""
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        if match[1] in environ:
            return environ[match[1]]
        if match[2] is not None:
            return match[2]
        missing = True
        return ""

    expanded = _VARIABLE.sub(value, text)
    return None if missing else expanded


def _member(
    composition: str,
    name: str,
    entry: Node,
    services: Mapping[str, Service],
    default_protocol: Protocol,
    fail: Any,
    environ: Mapping[str, str],
) -> Member:
    fields = entry.value if entry.value is not None else {}
    if not isinstance(fields, dict):
        raise fail(entry, f"composition {composition!r}, service {name!r}: expected a mapping (or nothing)")
    unknown = set(fields) - _MEMBER_KEYS
    if unknown:
        raise fail(entry, f"composition {composition!r}, service {name!r}: unknown key(s) {sorted(unknown)}")
    if "target" in fields:
        target = expand(str(fields["target"].value), environ)
        if target is None:
            raise fail(
                fields["target"], f"composition {composition!r}, service {name!r}: target "
                f"{fields['target'].value!r} names an environment variable that is not set (and no default)"
            )  # fmt: skip
        try:
            service = parse_service(name, target, default_protocol, f"service {name!r}")
        except ConfigError as exc:
            raise fail(fields["target"], f"composition {composition!r}: {exc}") from None
    elif name in services:
        service = services[name]
    else:
        known = ", ".join(sorted(services)) or "none"
        raise fail(
            entry, f"composition {composition!r}: service {name!r} has no 'target' and no SERVICE_ variable "
            f"(known: {known})"
        )  # fmt: skip
    weight = fields.get("weight", Node(1.0, entry.line))
    if isinstance(weight.value, bool) or not isinstance(weight.value, int | float) or not weight.value > 0:
        raise fail(weight, f"composition {composition!r}, service {name!r}: weight must be a positive number")
    if "output" in fields:
        output = fields["output"].value
        if not isinstance(output, str) or not output:
            raise fail(
                fields["output"], f"composition {composition!r}, service {name!r}: output must be a name"
            )
        service = replace(service, output=output)
    if "hedge" in fields:
        try:
            where = f"composition {composition!r}, service {name!r}: hedge"
            hedge = parse_hedge(str(fields["hedge"].value), where)
        except ConfigError as exc:
            raise fail(fields["hedge"], str(exc)) from None
        service = replace(service, hedge=hedge)
    return Member(service, float(weight.value))


# -- running ------------------------------------------------------------------------------------
class Gateway(typing.Protocol):
    """What aggregating a composition's answers needs of the Triton side (``TritonGateway``)."""

    async def class_names(self, service: Service, x: Inputs, timeout: float) -> tuple[str, ...]: ...


def known_classes(
    declared: tuple[str, ...], aggregator: str, answered: Sequence[str]
) -> tuple[str, ...] | None:
    """The class names when no model need be asked: those declared, else (``one_vs_rest``) the
    services that answered; None: the models' own must be read (``resolve_classes``)."""
    if declared:
        return declared
    if aggregator == "one_vs_rest":
        return tuple(answered)
    return None


async def resolve_classes(
    owner: str,
    declared: tuple[str, ...],
    aggregator: str,
    answered: Sequence[Service],
    gateway: Gateway,
    input_of: Callable[[Service], Inputs],
    deadline: float,
) -> tuple[str, ...]:
    """The class names a label is one of: those declared, else (``one_vs_rest``) the services,
    else the models' own (a ``class_names`` parameter or a label file), which must agree across
    the services that answered. ``input_of(service)``: an input the service was sent, in case its
    label file must be read. ``owner`` names the composition or
    pipeline in the error."""
    known = known_classes(declared, aggregator, [s.name for s in answered])
    if known is not None:
        return known
    timeout = time_left(deadline)
    found = [await gateway.class_names(s, input_of(s), timeout) for s in answered]
    named = {names for names in found if names}
    if len(named) > 1:
        raise AggregationFailed(
            f"{owner}: the services' class names differ "
            f"({'; '.join(', '.join(n) for n in sorted(named))}): name the classes in the file"
        )
    if not named:
        raise AggregationFailed(
            f"{owner}: no class names (neither 'classes' in the file nor a 'class_names' parameter "
            "or a label file in the models' configs)"
        )
    return named.pop()


def check_rules(
    composition: Composition,
    result: FanOutResult,
    aggregated: Aggregated | None,
    classes: tuple[str, ...],
    request_id: str,
    sink: AlertSink | None,
) -> tuple[Alert, ...]:
    """The alerts of the composition's rules on this answer, handed to ``sink`` (none: no rules)."""
    if not composition.rules:
        return ()
    aggregator = composition.aggregator
    n = next(len(o.probabilities) for o in result.outcomes.values() if o.probabilities is not None)
    scores = {
        s.name: (
            service_score(outcome.probabilities, aggregator)
            if (outcome := result.outcomes.get(s.name)) is not None and outcome.probabilities is not None
            else np.full(n, np.nan)
        )
        for s in composition.services
    }
    labelled = aggregated is not None
    answer = aggregated if aggregated is not None else Aggregated([""] * n, np.full(n, np.nan))
    rule_result = Result(answer, classes, scores, labelled)
    return check(composition.rules, f"composition/{composition.name}", rule_result, request_id, sink)


def enough_answers(composition: Composition, result: FanOutResult, policy: TimeoutPolicy) -> None:
    """``ServicesFailed`` (503, or 504 when one was late) when the answer may not be given:
    fewer services answered than ``min_answers``, or any failed under ``all_or_nothing``."""
    n = len(composition.members)
    if policy is TimeoutPolicy.ALL_OR_NOTHING and result.missing:
        missing = len(result.missing)
        message = f"composition {composition.name!r}: all_or_nothing, and {missing} of {n} did not answer"
    elif len(result.answered) < composition.min_answers:
        message = (
            f"composition {composition.name!r}: {len(result.answered)} of {n} services answered, "
            f"{composition.min_answers} needed"
        )
    else:
        return
    raise ServicesFailed(message, result.missing)


def aggregate(composition: Composition, result: FanOutResult, classes: tuple[str, ...]) -> Aggregated:
    """The composition's aggregator over the outputs of the services that answered, as ``classes``
    (``known_classes``, else ``resolve_classes``)."""
    outcomes = result.outcomes
    outputs = {name: outcomes[name].probabilities for name in result.answered}
    try:
        return AGGREGATORS[composition.aggregator](outputs, classes, composition.weights)  # type: ignore[arg-type]
    except AggregationError as exc:
        raise AggregationFailed(f"composition {composition.name!r}: {exc}") from None
