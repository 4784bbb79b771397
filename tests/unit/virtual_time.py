"""A clock for unit tests of timing logic (hedges, ejections, deadlines), and an event loop that
runs on it: nothing waits for real, and a test's outcome does not hang on how busy the machine is.

The loop's time is the clock's. When the loop has nothing ready and would wait for its next
timer, the clock jumps to that timer instead; real I/O (a thread waking the loop) is still
looked at first, without waiting. Code under test takes the clock where it would call
``time.monotonic`` (``TritonGateway(..., clock=clock)``), so that it and ``asyncio``'s timers
(``asyncio.sleep``, ``asyncio.wait(timeout=)``, ``asyncio.timeout``) read the same time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Clock:
    """Seconds, from 1000 (not 0: nothing mistakes it for "never"); only moved by ``advance``
    and by a ``run`` loop with nothing else to do."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock does not go back"
        self.now += seconds


class _Selector(selectors.DefaultSelector):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer: only real I/O can wake the loop
            return super().select(None)
        ready = super().select(0)
        if not ready and timeout > 0:
            self._clock.advance(timeout)
        return ready


class _Loop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Clock) -> None:
        super().__init__(_Selector(clock))
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.now


def run_on(clock: Clock, coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)`` on ``clock``'s time."""
    with asyncio.Runner(loop_factory=lambda: _Loop(clock)) as runner:
        return runner.run(coroutine)
