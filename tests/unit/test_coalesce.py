"""The coalescer's logic with a fake Triton call (pure unit tests; the real path is covered by
the proxy's concurrency tests against the embedded Triton). The fake's pauses and the
coalescer's "late" are read on a test clock (``virtual_time``): a 10 ms call is 10 ms, however
busy the machine running the test is."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from client_proxy.core.services import Service
from client_proxy.errors import UpstreamRejected, UpstreamUnavailable
from client_proxy.triton import coalesce
from client_proxy.triton.coalesce import Coalescer

from .virtual_time import Clock, run_on

#: The tests' clock: each test has its own coalescer, and the clock only goes forward.
CLOCK = Clock()
SERVICE = Service("s", "grpc", "x:1", "s")


class FakeTriton:
    """Answers each row with [row id, -row id] after a short pause, recording every call."""

    def __init__(self, pause: float = 0.01, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.pause = pause
        self.fail = fail

    async def infer(self, service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        self.calls.append(x.shape[0])
        await asyncio.sleep(self.pause)
        if self.fail:
            raise UpstreamUnavailable("s: down", service="s")
        return np.stack([x[:, 0], -x[:, 0]], axis=1).astype(np.float32)


def rows(ident: int, n: int = 1) -> np.ndarray:
    return np.full((n, 4), ident, dtype=np.float32)


def test_light_load_goes_straight_through() -> None:
    fake = FakeTriton()
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=2, clock=CLOCK)

    async def main() -> None:
        for i in range(3):
            out = await coalescer.infer(SERVICE, rows(i), "r", 1.0)
            assert out.tolist() == [[i, -i]]

    run_on(CLOCK, main())
    assert fake.calls == [1, 1, 1]


def test_concurrent_calls_share_batches_and_get_their_own_rows() -> None:
    fake = FakeTriton()
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=2, clock=CLOCK)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(
            *(coalescer.infer(SERVICE, rows(i, 1 + i % 3), f"r{i}", 1.0) for i in range(40))
        )

    outputs = run_on(CLOCK, main())
    for i, out in enumerate(outputs):
        assert out.tolist() == [[i, -i]] * (1 + i % 3)
    assert len(fake.calls) < 10  # 40 callers, far fewer calls
    assert sum(fake.calls) == sum(1 + i % 3 for i in range(40))


def test_batches_respect_max_rows() -> None:
    fake = FakeTriton()
    coalescer = Coalescer(fake.infer, max_rows=5, max_in_flight=1, clock=CLOCK)

    async def main() -> None:
        await asyncio.gather(*(coalescer.infer(SERVICE, rows(i, 2), "r", 1.0) for i in range(9)))

    run_on(CLOCK, main())
    assert max(fake.calls) <= 5 and sum(fake.calls) == 18


def test_a_failed_batch_fails_each_of_its_callers() -> None:
    fake = FakeTriton(fail=True)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=1, clock=CLOCK)

    async def main() -> list[object]:
        return await asyncio.gather(
            *(coalescer.infer(SERVICE, rows(i), "r", 1.0) for i in range(5)), return_exceptions=True
        )

    results = run_on(CLOCK, main())
    assert all(isinstance(r, UpstreamUnavailable) for r in results)


def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    fake = FakeTriton(pause=0.05)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=1, clock=CLOCK)

    async def main() -> None:
        first = asyncio.create_task(coalescer.infer(SERVICE, rows(1), "r", 1.0))
        await asyncio.sleep(0)
        quitter = asyncio.create_task(coalescer.infer(SERVICE, rows(2), "r", 1.0))
        stayer = asyncio.create_task(coalescer.infer(SERVICE, rows(3), "r", 1.0))
        await asyncio.sleep(0.01)
        quitter.cancel()
        assert (await first).tolist() == [[1, -1]]
        assert (await stayer).tolist() == [[3, -3]]
        with pytest.raises(asyncio.CancelledError):
            await quitter
        await coalescer.aclose()

    run_on(CLOCK, main())
    assert fake.calls == [1, 1]  # the quitter's row was never sent


def test_only_inputs_of_one_signature_share_a_batch() -> None:
    """Waiting callers whose inputs cannot be joined (another width, named tensors) wait for a
    call of their own; each still gets its own rows back."""
    seen: list[object] = []

    async def infer(service: Service, x: object, request_id: str, timeout: float) -> np.ndarray:
        await asyncio.sleep(0.01)
        if isinstance(x, dict):
            seen.append(("named", len(x["a"])))
            first = x["a"][:, 0]
        else:
            assert isinstance(x, np.ndarray)
            seen.append((x.shape[1], len(x)))
            first = x[:, 0]
        return np.stack([first, -first], axis=1).astype(np.float32)

    coalescer = Coalescer(infer, max_rows=1024, max_in_flight=1, clock=CLOCK)

    def named(ident: int) -> dict[str, np.ndarray]:
        return {"a": np.full((2, 3), ident, dtype=np.float32), "b": np.zeros((2, 1), dtype=np.int64)}

    async def main() -> list[np.ndarray]:
        calls = [coalescer.infer(SERVICE, rows(0), "first", 1.0)]  # takes the only slot
        calls += [coalescer.infer(SERVICE, rows(i), "r", 1.0) for i in (1, 2)]
        calls += [coalescer.infer(SERVICE, np.full((1, 6), 3, dtype=np.float32), "r", 1.0)]
        calls += [coalescer.infer(SERVICE, named(i), "r", 1.0) for i in (4, 5)]
        return await asyncio.gather(*calls)

    outputs = run_on(CLOCK, main())
    assert [o[:, 0].tolist() for o in outputs] == [[0], [1], [2], [3], [4, 4], [5, 5]]
    # The first alone; then the two 4-wide rows together, the 6-wide row, the two named inputs.
    assert seen == [(4, 1), (4, 2), (6, 1), ("named", 4)]


class Gauged(FakeTriton):
    """Also records how many calls were in flight at once, and lets the first call hang."""

    def __init__(self, pause: float = 0.01, first_pause: float | None = None) -> None:
        super().__init__(pause)
        self.first_pause = first_pause
        self.in_flight = 0
        self.most_in_flight = 0

    async def infer(self, service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        first = not self.calls
        self.calls.append(x.shape[0])
        try:
            await asyncio.sleep(self.first_pause if first and self.first_pause else self.pause)
        finally:
            self.in_flight -= 1
        return np.stack([x[:, 0], -x[:, 0]], axis=1).astype(np.float32)


def test_calls_that_answer_as_usual_go_out_one_at_a_time_in_bigger_batches() -> None:
    fake = Gauged(pause=0.01)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=2, clock=CLOCK)

    async def wave(start: int) -> list[np.ndarray]:
        return await asyncio.gather(*(coalescer.infer(SERVICE, rows(start + i), "r", 1.0) for i in range(20)))

    async def main() -> None:
        await coalescer.infer(SERVICE, rows(0), "r", 1.0)  # learns the usual call time (10 ms)
        for start in (100, 200, 300):
            outputs = await wave(start)
            assert [o.tolist() for o in outputs] == [[[start + i, -(start + i)]] for i in range(20)]

    run_on(CLOCK, main())
    # No call was late, so none went out beside another: each wave is its first caller alone,
    # then the 19 others together.
    assert fake.most_in_flight == 1
    assert fake.calls == [1] + [1, 19] * 3


def test_a_late_call_does_not_hold_the_callers_behind_it() -> None:
    # The first call's usual time is not known yet: it is late after MIN_STALL_S (2 ms), and the
    # callers that came 1 ms after it then go out together beside it.
    assert coalesce.MIN_STALL_S == 0.002
    fake = Gauged(pause=0.01, first_pause=0.5)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=2, clock=CLOCK)
    done: list[str] = []

    async def call(name: str, ident: int) -> None:
        out = await coalescer.infer(SERVICE, rows(ident), name, 1.0)
        assert out.tolist() == [[ident, -ident]]
        done.append(name)

    async def main() -> None:
        slow = asyncio.create_task(call("hung", 1))
        await asyncio.sleep(0.001)
        await asyncio.gather(*(call(f"behind {i}", 10 + i) for i in range(5)))
        await slow

    run_on(CLOCK, main())
    # Those behind went out together in a second call once the first was late, and answered first.
    assert done[-1] == "hung" and fake.most_in_flight == 2 and fake.calls == [1, 5]


def test_with_one_call_in_flight_at_most_those_behind_a_late_call_wait_for_it() -> None:
    fake = Gauged(pause=0.01, first_pause=0.1)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=1, clock=CLOCK)
    done: list[str] = []

    async def call(name: str, ident: int) -> None:
        await coalescer.infer(SERVICE, rows(ident), name, 1.0)
        done.append(name)

    async def main() -> None:
        slow = asyncio.create_task(call("hung", 1))
        await asyncio.sleep(0.001)
        await asyncio.gather(*(call(f"behind {i}", 10 + i) for i in range(3)), slow)

    run_on(CLOCK, main())
    assert done[0] == "hung" and fake.most_in_flight == 1 and fake.calls == [1, 3]


def test_submitted_callers_share_batches_and_giving_up_calls_off_only_an_abandoned_batch() -> None:
    """``submit``/``give_up`` (the path ``FanOut`` takes): one caller giving up leaves its batch
    to the others; a batch whose callers all gave up is cancelled, not left running."""
    fake = FakeTriton(pause=0.2)  # each call outlasts the 10 ms sleeps below
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=1, clock=CLOCK)
    cancelled: list[int] = []

    async def main() -> None:
        first = coalescer.submit(SERVICE, rows(1), "r", 1.0)  # goes out at once, alone
        await asyncio.sleep(0.01)
        quitter = coalescer.submit(SERVICE, rows(2), "r", 1.0)  # these two wait, then go together
        stayer = coalescer.submit(SERVICE, rows(3), "r", 1.0)
        assert (await first).tolist() == [[1, -1]]
        await asyncio.sleep(0.01)
        coalescer.give_up(SERVICE, quitter)
        assert (await stayer).tolist() == [[3, -3]]  # the shared batch went on for the stayer
        assert quitter.cancelled()

        alone = coalescer.submit(SERVICE, rows(4), "r", 1.0)
        await asyncio.sleep(0.01)
        (task,) = [t for t in coalescer._tasks if not t.done()]
        task.add_done_callback(lambda t: cancelled.append(4) if t.cancelled() else None)
        coalescer.give_up(SERVICE, alone)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done() and not coalescer._lanes[SERVICE].batches

    run_on(CLOCK, main())
    assert fake.calls == [1, 2, 1] and cancelled == [4]


def test_a_bug_in_a_batched_call_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    async def broken(service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        raise KeyError("a bug")

    async def main() -> None:
        coalescer = Coalescer(broken, max_rows=1024, clock=CLOCK)
        future = coalescer.submit(SERVICE, rows(1), "r", 1.0)
        with pytest.raises(KeyError):
            await asyncio.wait_for(future, 1.0)

    run_on(CLOCK, main())


def test_on_batch_hears_every_call_with_its_rows_and_requests() -> None:
    fake = FakeTriton(pause=0.02)
    heard: list[tuple[str, int, int]] = []
    coalescer = Coalescer(
        fake.infer, max_rows=1024, max_in_flight=1, on_batch=lambda *a: heard.append(a), clock=CLOCK
    )

    async def main() -> None:
        first = asyncio.create_task(coalescer.infer(SERVICE, rows(1, n=2), "r", 1.0))  # alone, at once
        await asyncio.sleep(0.005)
        waiting = [coalescer.submit(SERVICE, rows(i, n=3), "r", 1.0) for i in range(2, 6)]
        await first
        await asyncio.gather(*waiting)

    run_on(CLOCK, main())
    assert heard == [("s", 2, 1), ("s", 12, 4)]
    assert [n for n in fake.calls] == [2, 12]


class Picky(FakeTriton):
    """Refuses (422, as Triton's INVALID_ARG) any call whose rows include a negative id."""

    async def infer(self, service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        if (x[:, 0] < 0).any():
            self.calls.append(x.shape[0])
            await asyncio.sleep(self.pause)
            raise UpstreamRejected("s: the model refused the input", service="s")
        return await super().infer(service, x, request_id, timeout)


def test_a_refused_batch_is_sent_again_caller_by_caller_so_only_the_faulty_one_fails() -> None:
    fake = Picky()
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=1, clock=CLOCK)

    async def main() -> list[object]:
        callers = [coalescer.infer(SERVICE, rows(-1 if i == 7 else i), "r", 1.0) for i in range(20)]
        return await asyncio.gather(*callers, return_exceptions=True)

    results = run_on(CLOCK, main())
    assert isinstance(results[7], UpstreamRejected)
    for i, result in enumerate(results):
        if i != 7:
            assert isinstance(result, np.ndarray) and result.tolist() == [[i, -i]]
    assert max(fake.calls) > 1  # they were batched before being sent alone


def test_a_batch_cancelled_before_its_first_step_gives_its_slot_back() -> None:
    """The rapid-reset wedge: a caller that gives up in the same turn of the event loop in which
    its call went out cancels a task that never ran. Its slot in the lane must come back all the
    same, or after ``max_in_flight`` such calls the service never sends again."""
    fake = FakeTriton(pause=0.001)
    coalescer = Coalescer(fake.infer, max_rows=1024, max_in_flight=2, clock=CLOCK)

    async def main() -> None:
        for _ in range(50):
            future = coalescer.submit(SERVICE, rows(1), "r", 1.0)
            (task,) = [t for t in coalescer._tasks if not t.done()]
            coalescer.give_up(SERVICE, future)  # before the task's first step
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert task.cancelled()
        lane = coalescer._lanes[SERVICE]
        assert lane.in_flight == 0 and not lane.started and not lane.batches and not coalescer._tasks
        out = await asyncio.wait_for(coalescer.submit(SERVICE, rows(7), "r", 1.0), 1.0)
        assert out.tolist() == [[7, -7]]

    run_on(CLOCK, main())
    assert fake.calls == [1]  # the cancelled calls never reached Triton; the last one did
