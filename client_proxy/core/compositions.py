"""Compositions: several services answering one request, combined by a declared aggregator
(declared in the compositions file, ``compositions_file.py``): what one is, and its answer from
its services' outcomes (``Composition.answer_from``: enough of them, aggregated, the rules'
alerts). To the dataplane a composition is a model like any other (``served.Model``)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from client_proxy.core.aggregators import AGGREGATORS, Aggregated, AggregationError
from client_proxy.core.conditions import service_score
from client_proxy.core.outcomes import FanOutResult
from client_proxy.core.rules import Alert, AlertSink, Result, Rule, check
from client_proxy.core.services import (
    Service,
    TimeoutPolicy,
    time_left,
)
from client_proxy.core.tensors import Inputs
from client_proxy.errors import AggregationFailed, ServicesFailed

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest

AGGREGATOR_NAMES = (*AGGREGATORS, "none")


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
    kind: ClassVar[Literal["composition"]] = "composition"

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(m.service for m in self.members))
        object.__setattr__(self, "weights", {m.service.name: m.weight for m in self.members})

    def inputs_go_to(self) -> tuple[Service, ...]:
        return self.services

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        """Every service called at once (``fanout.py``), then ``answer_from`` their outcomes."""
        result = await plane.fanout.run(self.services, x, request.request_id, deadline, answer.policy)
        await self.answer_from(result, plane, answer, x, request.request_id, deadline)

    async def answer_from(
        self,
        result: FanOutResult,
        plane: DataPlane,
        answer: InferenceAnswer,
        x: Inputs,
        request_id: str,
        deadline: float,
    ) -> None:
        """Its answer from its services' outcomes: ``ServicesFailed`` unless enough answered; the
        aggregate (None with ``aggregator: none``) over its classes (the models' own, read once
        with ``input x``, when the file names none); the alerts of its rules."""
        answer.result, answer.outcomes = result, result.outcomes.values()
        enough_answers(self, result, answer.policy)
        aggregated: Aggregated | None = None
        classes: tuple[str, ...] = ()
        if self.aggregator != "none":
            found = known_classes(self.classes, self.aggregator, result.answered)
            if found is None:
                answered = [s for s in self.services if s.name in result.answered]
                found = await resolve_classes(
                    f"composition {self.name!r}",
                    (),
                    self.aggregator,
                    answered,
                    plane.gateway,
                    lambda _: x,
                    deadline,
                )
            aggregated, classes = aggregate(self, result, found), found
        answer.aggregated, answer.classes = aggregated, classes
        answer.alerts = check_rules(self, result, aggregated, classes, request_id, plane.sink)

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
