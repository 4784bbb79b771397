"""Rules on results: the proxy acts on an answer, not only gives it.

A composition or a pipeline may declare ``rules``, each a condition on the answer's rows
(``conditions.py``: ``virginica >= 0.9``, ``spam >= 0.8 or fraud >= 0.5``) and what to do when
a row meets it::

    rules:
      - name: virginica_sure
        when: "virginica >= 0.9"
        severity: critical               # optional, free text (default: warning), in the alert
        webhook: "${ALERT_WEBHOOK_URL}"  # optional: POST the alert there (signed, retried)

Every rule that some row meets is an ``Alert``: named in the response (``alerts``), counted,
logged, and posted to its webhook, by the ``AlertSink`` the app wires in. Evaluating the rules
is pure and cheap (a comparison per clause over the rows); nothing here does I/O.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from numpy.typing import NDArray

from client_proxy.core import conditions
from client_proxy.core.aggregators import Aggregated
from client_proxy.core.conditions import Condition
from client_proxy.core.services import valid_name
from client_proxy.core.yamlfile import Node
from client_proxy.errors import AggregationFailed

logger = logging.getLogger("client_proxy.alerts")
_RULE_KEYS = {"name", "when", "severity", "webhook"}
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Rule:
    name: str
    when: Condition
    severity: str = "warning"
    webhook: str | None = None
    """A URL the alert is posted to; None: no webhook."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "when": self.when.text, "severity": self.severity, "webhook": self.webhook}


@dataclass(frozen=True)
class Alert:
    """A rule some rows of one answer met."""

    rule: Rule
    rows: tuple[int, ...]
    """Indices into the request's rows."""

    def describe(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "severity": self.rule.severity, "rows": list(self.rows)}


@dataclass(frozen=True)
class Result:
    """An answer as rules read it, and as an alert reports it."""

    answer: Aggregated
    classes: Sequence[str]
    scores: Mapping[str, NDArray[np.float64]]
    """Each service's score per row (NaN where it did not answer)."""
    labelled: bool = True
    """False for a composition with no aggregator: no label, probability or class scores."""

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` of the answer, for an alert's payload."""
        found: dict[str, Any] = {}
        if self.labelled:
            found["label"] = self.answer.labels[i]
            found["proba"] = float(self.answer.proba[i])
            if self.answer.scores is not None and self.classes:
                found["scores"] = dict(zip(self.classes, self.answer.scores[i].tolist(), strict=True))
        found["services"] = {
            name: (None if np.isnan(v[i]) else float(v[i])) for name, v in self.scores.items()
        }
        return found


class AlertSink(typing.Protocol):
    """What is done with the alerts of one answer (``client_proxy.alerts.Alerter``)."""

    def raised(self, source: str, alerts: Sequence[Alert], request_id: str, result: Result) -> None: ...


def check(
    rules: Sequence[Rule], source: str, result: Result, request_id: str, sink: AlertSink | None
) -> tuple[Alert, ...]:
    """The rules' alerts for ``result`` (``source``: ``composition/<name>`` or ``pipeline/<name>``),
    handed to ``sink``. A rule whose operand turns out not to be one of the models' classes (known
    only once they answer) raises nothing, and is logged once."""
    alerts = []
    for rule in rules:
        try:
            held = rule.when.rows(
                result.scores, result.answer, result.classes, f"{source}, rule {rule.name!r}"
            )
        except AggregationFailed as exc:
            if (source, rule.name) not in _warned:
                _warned.add((source, rule.name))
                logger.warning("the rule is never met: %s", exc.message)
            continue
        if held.any():
            alerts.append(Alert(rule, tuple(np.flatnonzero(held).tolist())))
    if alerts and sink is not None:
        sink.raised(source, alerts, request_id, result)
    return tuple(alerts)


def read_rules(
    node: Node | None,
    owner: str,
    services: Sequence[str],
    classes: Sequence[str],
    aggregator: str,
    fail: Callable[[Node, str], ValueError],
    expand: Callable[[str], str | None],
) -> tuple[Rule, ...]:
    """The ``rules`` list of a composition or pipeline (``owner`` names it in errors), checked:
    each operand must be able to mean something for these services, classes and aggregator;
    ``expand`` reads ``${VAR}`` in a webhook URL (None: a variable is unset, with no default)."""
    if node is None:
        return ()
    if not isinstance(node.value, list) or not node.value:
        raise fail(node, f"{owner}: rules must be a list of rules, each with a 'name' and a 'when'")
    rules: list[Rule] = []
    for item in node.value:
        if not isinstance(item.value, dict):
            raise fail(item, f"{owner}: a rule must be a mapping with a 'name' and a 'when'")
        fields = item.value
        unknown = set(fields) - _RULE_KEYS
        if unknown:
            raise fail(item, f"{owner}: rule: unknown key(s) {sorted(unknown)}")
        name = fields.get("name", Node(None, item.line))
        if not isinstance(name.value, str) or not valid_name(name.value):
            raise fail(name, f"{owner}: a rule needs a 'name' of lower-case letters, digits and '_'")
        if any(r.name == name.value for r in rules):
            raise fail(name, f"{owner}: rule name {name.value!r} is used twice")
        where = f"{owner}, rule {name.value!r}"
        when = fields.get("when")
        if when is None or not isinstance(when.value, str | int | float):
            raise fail(item, f"{where}: needs 'when', a condition such as 'proba >= 0.9'")
        try:
            condition = conditions.parse(str(when.value))
        except conditions.ConditionSyntaxError as exc:
            raise fail(when, f"{where}: when {exc}") from None
        unusable = _unusable(condition, services, classes, aggregator)
        if unusable:
            raise fail(when, f"{where}: when {condition.text!r}: {unusable}")
        severity = fields.get("severity", Node("warning", item.line))
        if not isinstance(severity.value, str) or not severity.value:
            raise fail(severity, f"{where}: severity must be a word, such as 'warning' or 'critical'")
        rules.append(
            Rule(
                name.value,
                condition,
                severity.value,
                read_webhook(fields.get("webhook"), where, fail, expand),
            )
        )
    return tuple(rules)


def _unusable(condition: Condition, services: Sequence[str], classes: Sequence[str], aggregator: str) -> str:
    """Why the condition cannot be read from such an answer, or ''."""
    if aggregator == "none":
        for operand in sorted(condition.operands):
            if operand != "max" and operand not in services:
                return (
                    f"{operand!r}: with no aggregator a rule reads only the services "
                    f"({', '.join(services)}) and 'max'"
                )
        return ""
    unknown = conditions.check_operands(condition, services, classes, aggregator)
    if unknown is not None:
        return f"{unknown!r} is not a service, one of the classes, 'proba', 'max' or 'label'"
    return ""


def read_webhook(
    node: Node | None,
    where: str,
    fail: Callable[[Node, str], ValueError],
    expand: Callable[[str], str | None],
) -> str | None:
    """A ``webhook`` entry (a rule's, an experiment's): an http(s) URL, its ``${VAR}`` read by
    ``expand``; None when there is none, or its optional variable is empty."""
    if node is None:
        return None
    url = expand(str(node.value))
    if url is None:
        raise fail(
            node, f"{where}: webhook {node.value!r} names an environment variable that is not set "
            "(and no default; '${VAR:-}' makes it optional)"
        )  # fmt: skip
    if not url:
        return None  # an optional webhook whose variable is empty
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(node, f"{where}: webhook {url!r} is not an http:// or https:// URL")
    return url
