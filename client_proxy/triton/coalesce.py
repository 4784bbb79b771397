"""Request coalescing: concurrent calls to one service share Triton calls.

One call per service is on its way to Triton at a time. A call that arrives meanwhile waits,
and when the one in flight returns, every waiting call (up to ``max_rows`` rows) goes out
together as one batched Triton call; each caller gets its own rows back. Under light load
nothing waits, so latency is unchanged; under heavy load the proxy sends far fewer, larger
requests, which is cheaper for the proxy and for Triton alike (Triton's dynamic batcher does
the same on its side of the wire).

A call that is late must not hold everyone behind it: when the calls in flight have all been
out longer than ``STALL_FACTOR`` times the service's usual call time (``MIN_STALL_S`` at
least), one more goes out with what waits, up to ``max_in_flight`` calls at once. (Two calls
always allowed, the earlier design, fell now and then into smaller batches: at concurrency 16
one call at a time answered a fifth more requests for a fifth less CPU per request.)

A batched call carries the first caller's request id to Triton; every caller still logs its
own id. A caller that gives up (deadline, cancellation) simply does not take its result.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from client_proxy import tracing
from client_proxy.core.services import Service
from client_proxy.core.tensors import Inputs, concatenate, row_count, signature
from client_proxy.errors import UpstreamError, UpstreamRejected

InferFn = Callable[[Service, Inputs, str, float], Awaitable[NDArray[Any]]]


@dataclass
class _Waiter:
    x: Inputs
    request_id: str
    timeout: float
    future: asyncio.Future[NDArray[Any]]
    #: The caller's trace context (tracing on): the batch's call is traced beneath it.
    trace: Any = None


#: Calls in flight this many times longer than the service's usual call time are late: one more
#: call may go out beside them.
STALL_FACTOR = 4.0
#: ... but never sooner than this (a usual call time of microseconds is only a fast loop).
MIN_STALL_S = 0.002
#: Weight of the newest call in the usual call time (an exponentially weighted mean).
LATENCY_WEIGHT = 0.1


@dataclass
class _Lane:
    """One service's calls: which are in flight since when, and who waits for the next one."""

    in_flight: int = 0
    waiting: list[_Waiter] = field(default_factory=list)
    #: When the calls in flight went out (the oldest first).
    started: list[float] = field(default_factory=list)
    #: The service's usual call time (seconds); 0 until a call has returned.
    latency: float = 0.0
    #: A timer that looks again when the calls in flight would become late.
    timer: asyncio.TimerHandle | None = None
    #: The batched calls in flight, each with its callers (to call one off when all gave up).
    batches: list[tuple[asyncio.Task[None], list[_Waiter]]] = field(default_factory=list)

    def stall_s(self) -> float:
        return max(STALL_FACTOR * self.latency, MIN_STALL_S)

    def may_send(self, max_in_flight: int, now: float) -> bool:
        """Whether a call may go out now: none is in flight, or all are late and a slot is free."""
        if self.in_flight == 0:
            return True
        # The instant compared as ``_look_again`` computes it: ``now - started >= stall`` can be
        # False by a rounding error at the very instant the timer was set for, and the timer
        # set again at once, and again, until the clock ticks.
        return self.in_flight < max_in_flight and now >= self.started[-1] + self.stall_s()

    def went_out(self, now: float) -> None:
        self.in_flight += 1
        self.started.append(now)

    def came_back(self, started: float, now: float) -> None:
        self.in_flight -= 1
        self.started.remove(started)
        elapsed = now - started
        self.latency += (elapsed - self.latency) * (LATENCY_WEIGHT if self.latency else 1.0)


class Coalescer:
    def __init__(
        self,
        infer: InferFn,
        max_rows: int,
        max_in_flight: int = 2,
        on_batch: Callable[[str, int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_batch(service name, rows, requests)`` hears of every Triton call sent; ``clock``
        is ``time.monotonic``, as the event loop's timers are (a test's own clock stands in for
        both)."""
        self._infer = infer
        self._clock = clock
        self._on_batch = on_batch
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._lanes: dict[Service, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _lane(self, service: Service) -> _Lane:
        lane = self._lanes.get(service)
        if lane is None:
            lane = self._lanes[service] = _Lane()
        return lane

    async def infer(self, service: Service, x: Inputs, request_id: str, timeout: float) -> NDArray[Any]:
        lane = self._lane(service)
        now = self._clock()
        if not lane.waiting and lane.may_send(self._max_in_flight, now):
            lane.went_out(now)
            if self._on_batch is not None:
                self._on_batch(service.name, row_count(x), 1)
            try:
                return await self._infer(service, x, request_id, timeout)
            finally:
                lane.came_back(now, self._clock())
                self._next_batch(service, lane)
        future: asyncio.Future[NDArray[Any]] = asyncio.get_running_loop().create_future()
        trace = tracing.current() if tracing.ENABLED else None
        lane.waiting.append(_Waiter(x, request_id, timeout, future, trace))
        self._look_again(service, lane, now)
        return await future

    def submit(
        self, service: Service, x: Inputs, request_id: str, timeout: float
    ) -> asyncio.Future[NDArray[Any]]:
        """``infer`` without a task of the caller's own: a future for the caller's rows of the
        answer, resolved (or failed with the ``UpstreamError``) when its batch returns; give it
        up with ``give_up``. A call that can go out at once goes out in a task of its own, as a
        batch of one. (``FanOut`` waits on these futures directly: three tasks fewer per request.)"""
        lane = self._lane(service)
        future: asyncio.Future[NDArray[Any]] = asyncio.get_running_loop().create_future()
        waiting = lane.waiting
        trace = tracing.current() if tracing.ENABLED else None
        waiting.append(_Waiter(x, request_id, timeout, future, trace))
        now = self._clock()
        if len(waiting) == 1 and lane.may_send(self._max_in_flight, now):
            self._next_batch(service, lane)
        else:
            self._look_again(service, lane, now)
        return future

    def submit_all(
        self, services: Sequence[Service], x: Inputs, request_id: str, timeout: float
    ) -> list[asyncio.Future[NDArray[Any]]]:
        """``submit`` to each of ``services``, in order (a fan-out's calls, started at once)."""
        submit = self.submit
        return [submit(service, x, request_id, timeout) for service in services]

    def give_up(self, service: Service, future: asyncio.Future[NDArray[Any]]) -> None:
        """A caller of ``submit`` gives up: its future is cancelled, and a batched call whose
        callers have all given up is cancelled too (no work left behind for nobody)."""
        future.cancel()
        lane = self._lanes.get(service)
        if lane is None:
            return
        for task, batch in lane.batches:
            if any(w.future is future for w in batch) and all(w.future.done() for w in batch):
                task.cancel()

    def _look_again(self, service: Service, lane: _Lane, now: float) -> None:
        """While callers wait behind calls that are not late yet, look again when they would be."""
        if lane.timer is not None or lane.in_flight >= self._max_in_flight or not lane.in_flight:
            return
        due = lane.started[-1] + lane.stall_s() - now
        lane.timer = asyncio.get_running_loop().call_later(max(due, 0.0), self._stalled, service, lane)

    def _stalled(self, service: Service, lane: _Lane) -> None:
        lane.timer = None
        self._next_batch(service, lane)

    def _next_batch(self, service: Service, lane: _Lane) -> None:
        """Send what waits as one call, if a call may go out now (else look again later)."""
        lane.waiting = [w for w in lane.waiting if not w.future.done()]  # callers that gave up
        if not lane.waiting:
            return
        now = self._clock()
        if not lane.may_send(self._max_in_flight, now):
            self._look_again(service, lane, now)
            return
        # The first caller's input decides the batch; callers whose input cannot join it (other
        # tensor names, widths or types) wait for the next call, in their order.
        kind = signature(lane.waiting[0].x)
        batch: list[_Waiter] = []
        later: list[_Waiter] = []
        rows = 0
        for waiter in lane.waiting:
            size = row_count(waiter.x)
            if (not batch or rows + size <= self._max_rows) and signature(waiter.x) == kind:
                batch.append(waiter)
                rows += size
            else:
                later.append(waiter)
        lane.waiting = later
        lane.went_out(now)
        if self._on_batch is not None:
            self._on_batch(service.name, rows, len(batch))
        task = asyncio.get_running_loop().create_task(self._send(service, batch, now))
        self._tasks.add(task)
        # The lane's books are kept by a done-callback, not by the task's own ``finally``: a task
        # cancelled before its first step (every caller gave up at once) never runs its body, and
        # a slot it did not give back would close the lane for good.
        task.add_done_callback(functools.partial(self._sent, service, lane, batch, now))
        lane.batches.append((task, batch))
        if later:
            self._look_again(service, lane, now)

    async def _send(self, service: Service, batch: list[_Waiter], started: float) -> None:
        x = concatenate([w.x for w in batch])
        try:
            call = self._infer(service, x, batch[0].request_id, max(w.timeout for w in batch))
            if batch[0].trace is not None:
                with tracing.batch(service.name, [w.trace for w in batch], row_count(x)):
                    output = await call
            else:
                output = await call
        except UpstreamRejected as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
            else:  # one caller's input may be at fault (a key the store lacks): the others are not
                await asyncio.gather(*(self._alone(service, w, started) for w in batch))
            return
        except UpstreamError as exc:
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            return
        offset = 0
        for waiter in batch:
            size = row_count(waiter.x)
            if not waiter.future.done():
                waiter.future.set_result(output[offset : offset + size])
            offset += size

    def _sent(
        self, service: Service, lane: _Lane, batch: list[_Waiter], started: float, task: asyncio.Task[None]
    ) -> None:
        """A batched call ended, however it ended (answered, failed, or cancelled, even before it
        started): its slot is given back, its callers hear of it, and what waits may go out."""
        self._tasks.discard(task)
        for i, (_, sent) in enumerate(lane.batches):
            if sent is batch:
                del lane.batches[i]
                break
        if task.cancelled():
            for waiter in batch:
                waiter.future.cancel()
        elif (bug := task.exception()) is not None:  # every caller's request fails with it (a 500, logged)
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(bug)
        lane.came_back(started, self._clock())
        self._next_batch(service, lane)

    async def _alone(self, service: Service, waiter: _Waiter, started: float) -> None:
        """``waiter``'s input in a call of its own, within what is left of its time."""
        if waiter.future.done():
            return
        left = max(waiter.timeout - (self._clock() - started), 0.001)
        try:
            output = await self._infer(service, waiter.x, waiter.request_id, left)
        except UpstreamError as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        else:
            if not waiter.future.done():
                waiter.future.set_result(output)

    async def aclose(self) -> None:
        """Cancel the batched calls still in flight (at shutdown)."""
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
