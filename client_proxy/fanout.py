"""The parallel fan-out and the aggregation: no FastAPI here.

``FanOut.run`` calls every service at once and waits, within the request's deadline, as the
timeout policy says; ``FanOut.stream`` yields each service's outcome the moment it arrives
(the seed's asynchronous variant). ``aggregate`` turns the answers into labels.

Every call is a task bounded by ``min(service timeout, time left to the deadline)``, and every
task still running when a request is done (failed fast, or the client went away) is cancelled
and awaited: no request leaves work behind in the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from client_proxy.config import Service, TimeoutPolicy
from client_proxy.errors import ServicesFailed, UpstreamError, UpstreamTimeout

logger = logging.getLogger(__name__)

InferFn = Callable[[Service, NDArray[np.float32], str, float], Awaitable[NDArray[np.float32]]]
OutcomeHook = Callable[["Outcome"], None]


@dataclass(frozen=True)
class Outcome:
    """One service's part of one request."""

    service: str
    probabilities: NDArray[np.float32] | None
    """``[N, 2]``: ``[P(class), P(other)]`` per row; None when the service did not answer."""
    error: UpstreamError | None
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        return "ok" if self.error is None else self.error.reason


@dataclass(frozen=True)
class FanOutResult:
    outcomes: dict[str, Outcome]
    """By service name, in the services' order."""
    answered: list[str] = field(default_factory=list)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    """Service name -> ``{"reason", "message"}`` for each service that did not answer."""

    @property
    def partial(self) -> bool:
        return bool(self.missing)


@dataclass(frozen=True)
class Labels:
    """The aggregated answer for N rows."""

    names: list[str]
    """Per row: the service whose P(class) is highest (the first one on ties, as in the seed)."""
    proba: NDArray[np.float32]
    """Per row: that highest P(class)."""


def aggregate(probabilities: dict[str, NDArray[np.float32]]) -> Labels:
    """The seed's rule, for N rows at once: the label is the service with the highest P(class)."""
    if not probabilities:
        raise ValueError("no service answered")
    names = list(probabilities)
    p_class = np.stack([probabilities[name][:, 0] for name in names], axis=1)
    best = p_class.argmax(axis=1)
    return Labels(names=[names[i] for i in best], proba=p_class[np.arange(len(best)), best])


def failure(outcome: Outcome) -> dict[str, str]:
    assert outcome.error is not None
    return {"reason": outcome.error.reason, "message": outcome.error.message}


class FanOut:
    """Calls a set of services concurrently, within a deadline."""

    def __init__(
        self, infer: InferFn, service_timeout_s: float, on_outcome: OutcomeHook | None = None
    ) -> None:
        self._infer = infer
        self._service_timeout_s = service_timeout_s
        self._on_outcome = on_outcome

    async def _call(
        self, service: Service, x: NDArray[np.float32], request_id: str, deadline: float
    ) -> Outcome:
        started = time.perf_counter()
        budget = min(self._service_timeout_s, deadline - time.monotonic())
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                probabilities = await self._infer(service, x, request_id, budget)
            outcome = Outcome(service.name, probabilities, None, time.perf_counter() - started)
        except TimeoutError:
            error = UpstreamTimeout(
                f"{service.name}: no answer within {budget * 1000:.0f} ms", service=service.name
            )
            outcome = Outcome(service.name, None, error, time.perf_counter() - started)
        except UpstreamError as exc:
            outcome = Outcome(service.name, None, exc, time.perf_counter() - started)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    async def run(
        self,
        services: Sequence[Service],
        x: NDArray[np.float32],
        request_id: str,
        deadline: float,
        policy: TimeoutPolicy,
    ) -> FanOutResult:
        """Every service's outcome; ``deadline`` is a ``time.monotonic()`` instant.

        ``all_or_nothing`` raises ``ServicesFailed`` at the first failure (cancelling the rest);
        ``partial`` returns what arrived, and raises only when no service answered.
        """
        tasks = [asyncio.create_task(self._call(s, x, request_id, deadline)) for s in services]
        outcomes: dict[str, Outcome] = {}
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                outcomes[outcome.service] = outcome
                if not outcome.ok and policy is TimeoutPolicy.ALL_OR_NOTHING:
                    raise _services_failed([outcome], policy)
        finally:
            await _cancel(tasks)
        ordered = {s.name: outcomes[s.name] for s in services}
        answered = [name for name, o in ordered.items() if o.ok]
        missing = {name: failure(o) for name, o in ordered.items() if not o.ok}
        if not answered:
            raise _services_failed(list(ordered.values()), policy)
        return FanOutResult(outcomes=ordered, answered=answered, missing=missing)

    async def stream(
        self, services: Sequence[Service], x: NDArray[np.float32], request_id: str, deadline: float
    ) -> AsyncIterator[Outcome]:
        """Each service's outcome in completion order; the caller may stop early."""
        tasks = [asyncio.create_task(self._call(s, x, request_id, deadline)) for s in services]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            await _cancel(tasks)


def _services_failed(outcomes: list[Outcome], policy: TimeoutPolicy) -> ServicesFailed:
    failed = {o.service: failure(o) for o in outcomes if not o.ok}
    timed_out = any(info["reason"] == "timeout" for info in failed.values())
    names = ", ".join(f"{name} ({info['reason']})" for name, info in failed.items())
    if policy is TimeoutPolicy.ALL_OR_NOTHING:
        message = f"all_or_nothing: service {names} did not answer"
    else:
        message = f"no service answered: {names}"
    return ServicesFailed(message, failed, timed_out=timed_out)


async def _cancel(tasks: list[asyncio.Task[Outcome]]) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
