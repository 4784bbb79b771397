"""Request coalescing: concurrent calls to one service share Triton calls.

At most ``max_in_flight`` calls per service are on their way to Triton at any time. A call
that arrives while they are all busy waits, and when one of them returns, every waiting call
(up to ``max_rows`` rows) goes out together as one batched Triton call; each caller gets its
own rows back. Under light load nothing waits, so latency is unchanged; under heavy load the
proxy sends far fewer, larger requests, which is cheaper for the proxy and for Triton alike
(Triton's dynamic batcher does the same on its side of the wire).

A batched call carries the first caller's request id to Triton; every caller still logs its
own id. A caller that gives up (deadline, cancellation) simply does not take its result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from client_proxy.core.services import Service
from client_proxy.core.tensors import Inputs, concatenate, row_count, signature
from client_proxy.errors import UpstreamError

InferFn = Callable[[Service, Inputs, str, float], Awaitable[NDArray[Any]]]


@dataclass
class _Waiter:
    x: Inputs
    request_id: str
    timeout: float
    future: asyncio.Future[NDArray[Any]]


@dataclass
class _Lane:
    """One service's calls: how many are in flight, and who waits for the next one."""

    in_flight: int = 0
    waiting: list[_Waiter] = field(default_factory=list)


class Coalescer:
    def __init__(self, infer: InferFn, max_rows: int, max_in_flight: int = 2) -> None:
        self._infer = infer
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._lanes: dict[Service, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def infer(self, service: Service, x: Inputs, request_id: str, timeout: float) -> NDArray[Any]:
        lane = self._lanes.setdefault(service, _Lane())
        if lane.in_flight < self._max_in_flight:
            lane.in_flight += 1
            try:
                return await self._infer(service, x, request_id, timeout)
            finally:
                lane.in_flight -= 1
                self._next_batch(service, lane)
        future: asyncio.Future[NDArray[Any]] = asyncio.get_running_loop().create_future()
        lane.waiting.append(_Waiter(x, request_id, timeout, future))
        return await future

    def _next_batch(self, service: Service, lane: _Lane) -> None:
        """Send what waits as one call, if a call slot is free."""
        lane.waiting = [w for w in lane.waiting if not w.future.done()]  # callers that gave up
        if not lane.waiting or lane.in_flight >= self._max_in_flight:
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
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(service, lane, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, service: Service, lane: _Lane, batch: list[_Waiter]) -> None:
        try:
            x = concatenate([w.x for w in batch])
            try:
                output = await self._infer(service, x, batch[0].request_id, max(w.timeout for w in batch))
            except UpstreamError as exc:
                for waiter in batch:
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
                return
            except asyncio.CancelledError:
                for waiter in batch:
                    waiter.future.cancel()
                raise
            offset = 0
            for waiter in batch:
                size = row_count(waiter.x)
                if not waiter.future.done():
                    waiter.future.set_result(output[offset : offset + size])
                offset += size
        finally:
            lane.in_flight -= 1
            self._next_batch(service, lane)

    async def aclose(self) -> None:
        """Cancel the batched calls still in flight (at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
