"""Conditions on an answer, per row: a pipeline step's ``stop_if`` and a rule's ``when``.

One small language for both::

    virginica >= 0.9                       # a clause: <operand> <op> <number>
    label == virginica                     # the answer's label (== or !=)
    spam >= 0.8 or fraud >= 0.5            # any detector above its own threshold
    proba < 0.6 and label != setosa        # 'and' binds tighter than 'or'; no parentheses

The operands, read per row: ``proba`` (the answer's probability), ``label`` (its label), ``max``
(the highest score of the services), a service (its score: its P(class) for ``one_vs_rest``,
else its highest probability), or a class name (the answer's score for that class). A service
that did not answer meets no clause that reads it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_proxy.core.aggregators import Aggregated
from client_proxy.errors import AggregationFailed

_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_CLAUSE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|>|<=|<|==|!=)\s*(\S+)\s*$")
_NUMBER = re.compile(r"^-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_OR = re.compile(r"\s+or\s+")
_AND = re.compile(r"\s+and\s+")
SYNTAX = (
    "expected '<operand> <op> <number>' clauses joined by 'and' / 'or' (the operand 'proba', 'max', "
    "a service or a class; op one of >= > <= <), or 'label == <name>' / 'label != <name>'"
)


class ConditionSyntaxError(ValueError):
    """A condition that does not parse; the message says what was expected."""


@dataclass(frozen=True)
class Clause:
    operand: str
    op: str
    value: float | str
    """A number, or for ``label`` a name."""


@dataclass(frozen=True)
class Condition:
    """Clauses joined by ``or`` (``any_of``) of clauses joined by ``and`` (each tuple)."""

    any_of: tuple[tuple[Clause, ...], ...]
    text: str

    @property
    def operands(self) -> set[str]:
        return {c.operand for group in self.any_of for c in group}

    def rows(
        self,
        scores: Mapping[str, NDArray[np.float64]],
        answer: Aggregated,
        classes: Sequence[str],
        where: str,
    ) -> NDArray[np.bool_]:
        """Per row: does the condition hold? ``scores``: each service's score per row, NaN where
        it did not answer (a comparison with NaN holds for no row). ``AggregationFailed`` for an
        operand that is neither (a class name the models do not have, known once they answer)."""
        n = len(answer.labels)
        held = np.zeros(n, dtype=bool)
        for group in self.any_of:
            both = np.ones(n, dtype=bool)
            for clause in group:
                both &= _clause(clause, scores, answer, classes, n, self.text, where)
            held |= both
        return held


def parse(text: str) -> Condition:
    """The condition ``text`` says; ``ConditionSyntaxError`` when it does not parse."""
    groups = []
    for alternative in _OR.split(text.strip()):
        group = []
        for part in _AND.split(alternative):
            match = _CLAUSE.match(part)
            if match is None:
                raise ConditionSyntaxError(f"{part.strip()!r}: {SYNTAX}")
            operand, op, value = match[1], match[2], match[3]
            if operand == "label":
                if op not in ("==", "!=") or not _NAME.match(value):
                    raise ConditionSyntaxError(f"{part.strip()!r}: label takes == or != and a name")
                group.append(Clause(operand, op, value))
            elif op in ("==", "!=") or not _NUMBER.match(value):
                raise ConditionSyntaxError(f"{part.strip()!r}: {SYNTAX}")
            else:
                group.append(Clause(operand, op, float(value)))
        groups.append(tuple(group))
    return Condition(tuple(groups), text.strip())


def _clause(
    clause: Clause,
    scores: Mapping[str, NDArray[np.float64]],
    answer: Aggregated,
    classes: Sequence[str],
    n: int,
    text: str,
    where: str,
) -> NDArray[np.bool_]:
    operand = clause.operand
    values: Any
    if operand == "proba":
        values = np.asarray(answer.proba, dtype=np.float64)
    elif operand == "label":
        values = np.asarray(answer.labels, dtype=object)
    elif operand == "max":
        if not scores:
            return np.zeros(n, dtype=bool)
        values = np.fmax.reduce(np.stack(list(scores.values()), axis=1), axis=1)  # NaN: not answered
    elif operand in scores:
        values = scores[operand]
    elif answer.scores is not None and operand in classes:
        values = answer.scores[:, list(classes).index(operand)]
    elif answer.scores is None:  # one_vs_rest: a service that did not answer
        return np.zeros(n, dtype=bool)
    else:
        raise AggregationFailed(
            f"{where}: {text!r}: {operand!r} is not one of the classes ({', '.join(classes)})"
        )
    return np.asarray(_OPERATORS[clause.op](values, clause.value), dtype=bool)


def service_score(output: NDArray[Any], aggregator: str) -> NDArray[np.float64]:
    """A service's score per row: its P(class) (``one_vs_rest``), else its highest probability."""
    if aggregator == "one_vs_rest":
        return np.asarray(output[:, 0], dtype=np.float64)
    return np.asarray(output.max(axis=1), dtype=np.float64)


def check_operands(
    condition: Condition, services: Sequence[str], classes: Sequence[str], aggregator: str
) -> str | None:
    """The first operand that can be none of the things it may be, or None. A class name is
    checked when the classes are declared (``one_vs_rest``: the services are the classes), else
    when the models answer."""
    for operand in sorted(condition.operands):
        known_class = operand in classes or (aggregator != "one_vs_rest" and not classes)
        if operand not in ("proba", "max", "label") and operand not in services and not known_class:
            return operand
    return None
