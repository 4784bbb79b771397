"""The parallel fan-out and the aggregation: no FastAPI here.

``FanOut.run`` calls every service at once and waits, within the request's deadline, as the
timeout policy says; ``FanOut.stream`` yields each service's outcome the moment it arrives
(the seed's asynchronous variant). The aggregators (``aggregators.py``) turn the answers into
labels.

Every call is bounded by ``min(service timeout, time left to the deadline)``, and every call
still running when a request is done (failed fast, or the client went away) is given up: a
task is cancelled and awaited; a caller's place in a coalesced batch (``Coalescer.submit``,
waited on as a future rather than a task per call) is given up (``Coalescer.give_up``), and
the batch goes on for the others, or is cancelled when no caller is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from numpy.typing import NDArray

from client_proxy import tracing
from client_proxy.core.outcomes import FanOutResult, Outcome, failure
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs
from client_proxy.errors import CallCancelled, ServicesFailed, UpstreamError, UpstreamTimeout

logger = logging.getLogger(__name__)

InferFn = Callable[[Service, Inputs, str, float], Awaitable[NDArray[Any]]]


class Submitter(Protocol):
    """Starts calls whose answers are futures (``Coalescer``)."""

    def submit(
        self, service: Service, x: Inputs, request_id: str, timeout: float
    ) -> asyncio.Future[NDArray[Any]]: ...

    def submit_all(
        self, services: Sequence[Service], x: Inputs, request_id: str, timeout: float
    ) -> list[asyncio.Future[NDArray[Any]]]: ...

    def give_up(self, service: Service, future: asyncio.Future[NDArray[Any]]) -> None: ...


OutcomeHook = Callable[[Outcome], None]
T = TypeVar("T")


class FanOut:
    """Calls a set of services concurrently, within a deadline."""

    def __init__(
        self,
        infer: InferFn,
        service_timeout_s: float,
        on_outcome: OutcomeHook | None = None,
        submitter: Submitter | None = None,
    ) -> None:
        """``submitter``, when given, starts the same calls as ``infer`` with futures for their
        answers (``Coalescer``): ``run`` then waits on those instead of a task per call."""
        self._infer = infer
        self._service_timeout_s = service_timeout_s
        self._on_outcome = on_outcome
        self._submitter = submitter

    def _start(
        self,
        services: Sequence[Service],
        x: Inputs,
        request_id: str,
        deadline: float,
        steps: tracing.Steps | None = None,
    ) -> tuple[float, float, list[asyncio.Task[Outcome]]]:
        """Start every call now: the start time, each call's time budget, and the tasks (none
        when the deadline has already passed). With ``steps``, each call runs in its step's span."""
        started = time.perf_counter()
        # Every call starts now, so the per-service timeout and the request's deadline are one bound.
        budget = min(self._service_timeout_s, deadline - time.monotonic())
        if budget <= 0:
            return started, budget, []
        if steps is not None:
            return (
                started,
                budget,
                [
                    asyncio.create_task(
                        self._call(s, x, request_id, budget), context=steps.task_context(s.name)
                    )
                    for s in services
                ],
            )
        return started, budget, [asyncio.create_task(self._call(s, x, request_id, budget)) for s in services]

    async def _call(self, service: Service, x: Inputs, request_id: str, budget: float) -> Outcome:
        started = time.perf_counter()
        try:
            probabilities = await self._infer(service, x, request_id, budget)
        except UpstreamError as exc:
            return Outcome(service.name, None, exc, time.perf_counter() - started)
        return Outcome(service.name, probabilities, None, time.perf_counter() - started)

    def _record(self, outcome: Outcome) -> Outcome:
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    def _late(self, service: Service, budget: float, started: float) -> Outcome:
        error = UpstreamTimeout(
            f"{service.name}: no answer within {budget * 1000:.0f} ms", service=service.name
        )
        return self._record(Outcome(service.name, None, error, time.perf_counter() - started))

    def _cancelled(self, service: Service, started: float) -> Outcome:
        return self._record(
            Outcome(service.name, None, _call_cancelled(service), time.perf_counter() - started)
        )

    async def run(
        self,
        services: Sequence[Service],
        x: Inputs,
        request_id: str,
        deadline: float,
        policy: TimeoutPolicy,
    ) -> FanOutResult:
        """Every service's outcome; ``deadline`` is a ``time.monotonic()`` instant.

        ``all_or_nothing`` raises ``ServicesFailed`` at the first failure (cancelling the rest);
        ``partial`` returns what arrived in time, and raises only when no service answered.
        """
        if tracing.ENABLED:
            return await self._run_traced(services, x, request_id, deadline, policy)
        if self._submitter is not None:
            return await self._run_submitted(self._submitter, services, x, request_id, deadline, policy)
        return await self._run_tasks(services, x, request_id, deadline, policy)

    async def _run_traced(
        self,
        services: Sequence[Service],
        x: Inputs,
        request_id: str,
        deadline: float,
        policy: TimeoutPolicy,
    ) -> FanOutResult:
        """``run`` with a span per service, beneath the current (request's) span, and the
        deadline, the policy and the outcome as the current span's attributes."""
        steps = tracing.Steps("service")
        tracing.annotate(
            {
                "proxy.policy": str(policy),
                "proxy.deadline_ms": round((deadline - time.monotonic()) * 1000, 1),
                "proxy.services": [s.name for s in services],
            }
        )
        outcomes: dict[str, Outcome] = {}
        try:
            if self._submitter is not None:
                result = await self._run_submitted(
                    self._submitter, services, x, request_id, deadline, policy, steps, outcomes
                )
            else:
                result = await self._run_tasks(services, x, request_id, deadline, policy, steps, outcomes)
            tracing.annotate({"proxy.partial": result.partial, "proxy.answered": result.answered})
            return result
        except ServicesFailed:
            tracing.annotate({"proxy.partial": False, "proxy.answered": []})
            raise
        finally:
            for name, outcome in outcomes.items():
                error = outcome.error.message if outcome.error is not None else ""
                steps.end(name, outcome.reason, outcome.latency_s, error)
            steps.close()

    async def _run_tasks(
        self,
        services: Sequence[Service],
        x: Inputs,
        request_id: str,
        deadline: float,
        policy: TimeoutPolicy,
        steps: tracing.Steps | None = None,
        seen: dict[str, Outcome] | None = None,
    ) -> FanOutResult:
        """``run`` with a task per call; ``seen`` (when given) receives every outcome."""
        started, budget, tasks = self._start(services, x, request_id, deadline, steps)
        outcomes: dict[str, Outcome] = {}
        failed_fast = completed = False
        try:
            pending: set[asyncio.Task[Outcome]] = set(tasks)
            until = time.monotonic() + budget
            mode = (
                asyncio.FIRST_COMPLETED if policy is TimeoutPolicy.ALL_OR_NOTHING else asyncio.ALL_COMPLETED
            )
            while pending and not failed_fast:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=remaining, return_when=mode)
                if not done:
                    break
                for task in done:
                    outcome = self._record(task.result())
                    outcomes[outcome.service] = outcome
                    failed_fast = failed_fast or (not outcome.ok and policy is TimeoutPolicy.ALL_OR_NOTHING)
            completed = True
        finally:
            unfinished = await _cancel(tasks)
            if tasks and (failed_fast or not completed):  # not needed any more, rather than late
                for service, task in zip(services, tasks, strict=True):
                    if task in unfinished:
                        self._cancelled(service, started)
                    elif seen is not None and not task.cancelled() and service.name not in outcomes:
                        seen[service.name] = task.result()  # answered before the request was given up
        for service in services:
            if service.name not in outcomes and not failed_fast:
                outcomes[service.name] = self._late(service, max(budget, 0), started)
        if seen is not None:
            seen.update(outcomes)
        return self._result(services, outcomes, failed_fast, policy)

    async def _run_submitted(
        self,
        submitter: Submitter,
        services: Sequence[Service],
        x: Inputs,
        request_id: str,
        deadline: float,
        policy: TimeoutPolicy,
        steps: tracing.Steps | None = None,
        seen: dict[str, Outcome] | None = None,
    ) -> FanOutResult:
        """``run`` on futures from ``submitter``: one future that wakes the request when every call
        has ended (or one failed, under ``all_or_nothing``), and one timer for the deadline.
        With ``steps``, each call is submitted in its step's span; ``seen`` receives the outcomes."""
        started = time.perf_counter()
        budget = min(self._service_timeout_s, deadline - time.monotonic())
        outcomes: dict[str, Outcome] = {}
        failed_fast = False
        if budget > 0:
            loop = asyncio.get_running_loop()
            woken = loop.create_future()
            ended: dict[asyncio.Future[NDArray[Any]], float] = {}
            fail_fast = policy is TimeoutPolicy.ALL_OR_NOTHING
            if steps is None:
                futures = submitter.submit_all(services, x, request_id, budget)
            else:
                futures = []
                for service in services:
                    with steps.current(service.name):
                        futures.append(submitter.submit(service, x, request_id, budget))
            count = len(futures)

            def on_end(future: asyncio.Future[NDArray[Any]]) -> None:
                ended[future] = time.perf_counter()
                if not woken.done() and (
                    len(ended) == count
                    or (fail_fast and (future.cancelled() or future.exception() is not None))
                ):
                    woken.set_result(None)

            for future in futures:
                future.add_done_callback(on_end)
            timer = loop.call_later(budget, _wake, woken)
            given_up: list[Service] = []
            interrupted = True  # until woken: the request itself may be cancelled meanwhile
            try:
                await woken
                interrupted = False
            finally:
                timer.cancel()
                for service, future in zip(services, futures, strict=True):
                    if future not in ended:
                        future.remove_done_callback(on_end)
                        submitter.give_up(service, future)
                        given_up.append(service)
                        if interrupted:
                            self._cancelled(service, started)
            bug: Exception | None = None
            for service, future in zip(services, futures, strict=True):
                end = ended.get(future)
                if end is None:
                    continue
                try:
                    outcome = self._record(_outcome(service, future, end - started))
                except Exception as exc:  # a bug: raised once every call is accounted for
                    bug = bug or exc
                    continue
                outcomes[service.name] = outcome
                failed_fast = failed_fast or (fail_fast and not outcome.ok)
            if failed_fast:
                for service in given_up:  # not needed any more, rather than late
                    self._cancelled(service, started)
            if bug is not None:
                raise bug
        if not failed_fast:
            for service in services:
                if service.name not in outcomes:
                    outcomes[service.name] = self._late(service, max(budget, 0), started)
        if seen is not None:
            seen.update(outcomes)
        return self._result(services, outcomes, failed_fast, policy)

    def _result(
        self,
        services: Sequence[Service],
        outcomes: dict[str, Outcome],
        failed_fast: bool,
        policy: TimeoutPolicy,
    ) -> FanOutResult:
        if failed_fast:
            raise _services_failed([o for o in outcomes.values() if not o.ok], policy)
        result = FanOutResult.of({s.name: outcomes[s.name] for s in services})
        if not result.answered or (result.missing and policy is TimeoutPolicy.ALL_OR_NOTHING):
            raise _services_failed(list(result.outcomes.values()), policy)
        return result

    async def call_alone(
        self, service: Service, call: Callable[[float], Awaitable[T]], deadline: float
    ) -> tuple[T, Outcome]:
        """One call to one service (``call(budget)``), bounded like each call of a fan-out and
        recorded as one; ``UpstreamError`` (``UpstreamTimeout`` when late) when it fails."""
        if tracing.ENABLED:
            steps = tracing.Steps("service")
            try:
                with steps.current(service.name):
                    result, outcome = await self._call_alone(service, call, deadline)
                steps.end(service.name, outcome.reason)
                return result, outcome
            except UpstreamError as exc:
                steps.end(service.name, exc.reason, error=exc.message)
                raise
            finally:
                steps.close()
        return await self._call_alone(service, call, deadline)

    async def _call_alone(
        self, service: Service, call: Callable[[float], Awaitable[T]], deadline: float
    ) -> tuple[T, Outcome]:
        budget = min(self._service_timeout_s, deadline - time.monotonic())
        started = time.perf_counter()
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                result = await call(budget)
        except TimeoutError:
            late = self._late(service, max(budget, 0), started)
            assert late.error is not None
            raise late.error from None
        except UpstreamError as exc:
            self._record(Outcome(service.name, None, exc, time.perf_counter() - started))
            raise
        return result, self._record(Outcome(service.name, None, None, time.perf_counter() - started))

    async def stream(
        self, services: Sequence[Service], x: Inputs, request_id: str, deadline: float
    ) -> AsyncGenerator[Outcome, None]:
        """Each service's outcome in completion order (late ones last, as timeouts); the caller
        may stop early, and what is still running is then cancelled."""
        steps = tracing.steps("service")
        started, budget, tasks = self._start(services, x, request_id, deadline, steps)
        seen: set[str] = set()
        try:
            if tasks:
                try:
                    for next_done in asyncio.as_completed(tasks, timeout=budget):
                        outcome = self._record(await next_done)
                        seen.add(outcome.service)
                        if steps is not None:
                            steps.end(outcome.service, outcome.reason, outcome.latency_s)
                        yield outcome
                except TimeoutError:
                    pass
            await _cancel(tasks)
            for service in services:
                if service.name not in seen:
                    seen.add(service.name)
                    late = self._late(service, max(budget, 0), started)
                    if steps is not None:
                        steps.end(service.name, late.reason, late.latency_s)
                    yield late
        finally:
            if steps is not None:
                steps.close()
            unfinished = await _cancel(tasks)  # the caller stopped early
            # No tasks when the deadline had already passed: nothing was started, nothing to cancel.
            for service, task in zip(services, tasks, strict=bool(tasks)):
                if task in unfinished and service.name not in seen:
                    self._cancelled(service, started)


def _call_cancelled(service: Service) -> CallCancelled:
    return CallCancelled(f"{service.name}: cancelled", service=service.name)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _outcome(service: Service, future: asyncio.Future[NDArray[Any]], latency_s: float) -> Outcome:
    """The outcome of a call that ended: its answer, its ``UpstreamError``, or cancelled by the
    one who made it (the coalescer, at shutdown). Any other exception is a bug and propagates."""
    if future.cancelled():
        return Outcome(service.name, None, _call_cancelled(service), latency_s)
    exc = future.exception()
    if exc is None:
        return Outcome(service.name, future.result(), None, latency_s)
    if isinstance(exc, UpstreamError):
        return Outcome(service.name, None, exc, latency_s)
    raise exc


def _services_failed(outcomes: list[Outcome], policy: TimeoutPolicy) -> ServicesFailed:
    failed = {o.service: failure(o) for o in outcomes if not o.ok}
    names = ", ".join(f"{name} ({info.reason})" for name, info in failed.items())
    if policy is TimeoutPolicy.ALL_OR_NOTHING:
        message = f"all_or_nothing: service {names} did not answer"
    else:
        message = f"no service answered: {names}"
    return ServicesFailed(message, failed)


async def _cancel(tasks: list[asyncio.Task[Outcome]]) -> set[asyncio.Task[Outcome]]:
    """Cancel and await what is still running; the tasks that were."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return pending
