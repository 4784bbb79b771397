"""Routing a call to a service's replicas: which replica takes it (``ReplicaSet.pick``, the
balancer), sending a fast failure once more to another one, hedging a slow one, and keeping
each replica's health (ejection and return), latencies and hedge budget.

A call is any ``call(client, target, budget)``: an inference, a classification, a metadata read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from client_proxy import tracing
from client_proxy.config import Settings
from client_proxy.core.services import Service, Target
from client_proxy.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from client_proxy.triton.clients import Client, Clients
from client_proxy.triton.errors import translate
from client_proxy.triton.replicas import Listener, Replica, ReplicaSet

logger = logging.getLogger("client_proxy.triton.gateway")

T = TypeVar("T")

#: A call that failed fast is sent to another replica only if this much time is left.
MIN_RETRY_S = 0.005


class Routing:
    """The replica sets of every service (shared by services with the same targets), and the
    calls routed through them."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        listener: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: seconds, as ``time.monotonic`` (and the event loop's ``time``, by which
        ``asyncio`` waits: a test's own clock stands in for both)."""
        self._settings = settings
        self._clock = clock
        self._clients = clients
        self._listener = listener
        self._hedge = settings.default_hedge
        self._replica_sets: dict[tuple[Target, ...], ReplicaSet] = {}

    def replicas(self, service: Service) -> ReplicaSet:
        """The service's replicas and their health (shared by services with the same targets)."""
        key = service.targets
        found = self._replica_sets.get(key)
        if found is None:
            settings = self._settings
            found = self._replica_sets[key] = ReplicaSet(
                service.name,
                key,
                self._listener,
                failures_to_eject=settings.ejection_failures,
                base_ejection_s=settings.ejection_base_ms / 1000,
                max_ejection_s=settings.ejection_max_ms / 1000,
                balancer=settings.balancer,
                hedge_budget=settings.hedge_budget,
                clock=self._clock,
            )
        return found

    def hedging(self, service: Service) -> dict[str, object]:
        """The service's hedging: its policy, current delay, calls and hedges so far."""
        return self.replicas(service).hedging(service.hedge or self._hedge)

    async def call(
        self,
        service: Service,
        timeout: float,
        call: Callable[[Client, Target, float], Awaitable[T]],
        operation: str = "infer",
    ) -> T:
        """``call`` on one replica, chosen by ``ReplicaSet.pick``. A fast failure (unreachable,
        model not ready) is sent once more, to another replica, if there is one and time is left;
        a late or failed call is not (inference is read-only, so sending it again is safe; a slow
        replica is what hedging is for: see ``_hedged``)."""
        replicas = self.replicas(service)
        replicas.calls += 1
        replicas.budget.deposit()
        delay = replicas.hedge_delay(service.hedge or self._hedge)
        if delay is not None and delay < timeout:
            return await self._hedged(service, replicas, timeout, delay, call, operation)
        clock = self._clock
        started = clock()
        tried: list[Replica] = []
        while True:
            replica = replicas.pick(tried)
            tried.append(replica)
            replica.outstanding += 1
            sent = clock()
            budget = timeout - (sent - started)
            try:
                if tracing.ENABLED:
                    result = await self._traced(service, replica, operation, len(tried), False, call, budget)
                else:
                    result = await call(self._clients(replica.target), replica.target, budget)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = translate(exc, service)
                left = timeout - (clock() - started)
                if not self._retry(service, replicas, replica, error, tried, left):
                    raise error from exc
            else:
                replicas.latencies.add(clock() - sent)
                replicas.succeeded(replica)
                return result
            finally:
                replica.outstanding -= 1

    def _traced(
        self,
        service: Service,
        replica: Replica,
        operation: str,
        attempt: int,
        hedge: bool,
        call: Callable[[Client, Target, float], Awaitable[T]],
        budget: float,
    ) -> Awaitable[T]:
        """``call`` on ``replica`` in a span of its own (tracing on)."""
        target = replica.target
        return tracing.triton_call(
            lambda: call(self._clients(target), target, budget),
            operation,
            service.name,
            target.model,
            target.url,
            target.protocol,
            attempt,
            hedge,
        )

    def _retry(
        self, service: Service, replicas: ReplicaSet, replica: Replica, error: UpstreamError,
        tried: list[Replica], left: float,
    ) -> bool:  # fmt: skip
        """Record a failed call; True when it is to be sent once more, to another replica."""
        if isinstance(error, UpstreamRejected):  # the replica answered: the input was at fault
            replicas.succeeded(replica, error.reason)
            return False
        fatal = isinstance(error, UpstreamUnavailable)
        replicas.failed(replica, error.reason, fatal, error.message)
        if fatal and len(tried) < min(len(replicas), 2) and left > MIN_RETRY_S:
            if self._listener is not None:
                self._listener.retry(service.name)
            logger.info("%s: %s; sent again to another replica", service.name, error.message)
            return True
        return False

    async def _hedged(
        self,
        service: Service,
        replicas: ReplicaSet,
        timeout: float,
        delay: float,
        call: Callable[[Client, Target, float], Awaitable[T]],
        operation: str = "infer",
    ) -> T:
        """``call`` on one replica and, if it has not answered after ``delay``, on another one
        too: the first answer wins and the other call is cancelled. No hedge when the budget is
        spent, when no other replica may take calls, or when the deadline leaves less than the
        service's median latency (a hedge that cannot finish in time is only load). A fast
        failure is sent again as in ``call``."""
        clock = self._clock
        deadline = clock() + timeout
        pending: dict[asyncio.Task[T], tuple[Replica, float, bool]] = {}
        tried: list[Replica] = []

        def send(replica: Replica, hedge: bool) -> None:
            tried.append(replica)
            replica.outstanding += 1
            now = clock()
            if tracing.ENABLED:
                started_call = self._traced(
                    service, replica, operation, len(tried), hedge, call, deadline - now
                )
            else:
                started_call = call(self._clients(replica.target), replica.target, deadline - now)
            task = asyncio.ensure_future(started_call)
            pending[task] = (replica, now, hedge)

        send(replicas.pick(), False)
        # From the call going out: making a server's client on first use is not the replica's delay.
        hedge_at: float | None = clock() + delay
        error: UpstreamError | None = None
        cause: BaseException | None = None
        try:
            while pending:
                wait = None if hedge_at is None else max(hedge_at - clock(), 0.0)
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedge_at = None
                    self._hedge_one(service, replicas, tried, deadline, send)
                    continue
                for task in done:
                    replica, sent, hedge = pending.pop(task)
                    replica.outstanding -= 1
                    exc = task.exception()
                    if exc is None:
                        replicas.latencies.add(clock() - sent)
                        replicas.succeeded(replica)
                        if hedge:
                            replicas.hedges_won += 1
                            if self._listener is not None:
                                self._listener.hedge(service.name, "won")
                        return task.result()
                    error, cause = translate(exc, service), exc
                    left = deadline - clock()
                    if self._retry(service, replicas, replica, error, tried, left) and not pending:
                        other = replicas.pick(tried)
                        send(other, False)
            assert error is not None
            raise error from cause
        finally:
            for task, (replica, _, _) in pending.items():
                replica.outstanding -= 1
                if task.done():
                    if not task.cancelled():
                        task.exception()  # retrieved: a loser's failure is no one's error
                else:
                    task.cancel()
                    replicas.cancelled(replica)

    def _hedge_one(
        self,
        service: Service,
        replicas: ReplicaSet,
        tried: list[Replica],
        deadline: float,
        send: Callable[[Replica, bool], None],
    ) -> None:
        """The hedge delay passed with no answer: send the call to another replica, if allowed."""
        other = replicas.other(tried)
        median = replicas.latencies.percentile(50) or 0.0
        if other is None:
            outcome = "no_replica"
        elif deadline - self._clock() < max(median, MIN_RETRY_S):
            outcome = "deadline"
        elif not replicas.budget.take():
            outcome = "budget"
        else:
            outcome = "sent"
            replicas.hedges += 1
            send(other, True)
        if self._listener is not None:
            self._listener.hedge(service.name, outcome)
