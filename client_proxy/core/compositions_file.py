"""The compositions file: compositions (``compositions.py``) declared in YAML, loaded and checked.

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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client_proxy.core import yamlfile
from client_proxy.core.compositions import AGGREGATOR_NAMES, Composition, Member
from client_proxy.core.experiments_file import ExperimentSpec, read_experiments
from client_proxy.core.features import FEATURE_SET
from client_proxy.core.rules import read_rules
from client_proxy.core.services import (
    ConfigError,
    Protocol,
    Service,
    TimeoutPolicy,
    parse_hedge,
    parse_service,
    valid_name,
)
from client_proxy.core.yamlfile import Node

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


def load_compositions(
    path: Path,
    services: Mapping[str, Service],
    default_protocol: Protocol,
    environ: Mapping[str, str],
) -> dict[str, Composition]:
    """The compositions in ``path`` (``read_compositions_file``)."""
    return read_compositions_file(path, services, default_protocol, environ).compositions


def read_compositions_file(
    path: Path,
    services: Mapping[str, Service],
    default_protocol: Protocol,
    environ: Mapping[str, str],
) -> CompositionsFile:
    """The compositions and experiments in ``path``; ``CompositionError`` naming the line for
    anything invalid.

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

    def candidate_service(name: str, node: Node) -> Service:
        return _target(f"experiment candidate {name!r}", name, node, default_protocol, fail, environ)

    experiments = read_experiments(
        root.get("experiments"), fail, candidate_service, lambda text: expand(text, environ)
    )
    return CompositionsFile(found, experiments)


@dataclass(frozen=True)
class CompositionsFile:
    """What a compositions file declares."""

    compositions: dict[str, Composition]
    experiments: dict[str, ExperimentSpec]
    """Bound to the models once the pipelines are read too (``declared.load_configuration``)."""


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
        keys=read_key_mode(fields.get("keys"), f"composition {name!r}", fail),
    )


def read_key_mode(node: Node | None, owner: str, fail: Any) -> str:
    """A ``keys`` entry: ``fetch`` (the default) or ``forward``."""
    if node is None:
        return "fetch"
    if node.value not in KEY_MODES:
        raise fail(node, f"{owner}: keys must be fetch (the proxy reads the feature store) "
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
        owner = f"composition {composition!r}"
        service = _target(owner, name, fields["target"], default_protocol, fail, environ)
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


def _target(
    owner: str, name: str, node: Node, default_protocol: Protocol, fail: Any, environ: Mapping[str, str]
) -> Service:
    """The service ``name`` a ``target`` entry declares, its ``${VAR}`` read from ``environ``."""
    target = expand(str(node.value), environ)
    if target is None:
        raise fail(
            node, f"{owner}, service {name!r}: target {node.value!r} names an environment variable "
            "that is not set (and no default)"
        )  # fmt: skip
    try:
        return parse_service(name, target, default_protocol, f"service {name!r}")
    except ConfigError as exc:
        raise fail(node, f"{owner}: {exc}") from None
