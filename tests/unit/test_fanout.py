"""The fan-out's logic with a fake gateway (no Triton): policies, deadlines, cancellation, streams."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from client_proxy.core.aggregators import one_vs_rest
from client_proxy.core.fanout import FanOut
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.errors import Failure, ServicesFailed, UpstreamUnavailable
from client_proxy.triton.coalesce import Coalescer


def test_one_vs_rest_is_the_seeds_rule_per_row() -> None:
    probabilities = {
        "a": np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32),
        "b": np.array([[0.3, 0.7], [0.5, 0.5], [0.1, 0.9]], dtype=np.float32),
    }
    labels = one_vs_rest(probabilities)
    assert labels.labels == ["b", "a", "a"]  # a tie goes to the first service, as in the seed
    np.testing.assert_allclose(labels.proba, [0.3, 0.5, 0.9])


SERVICES = [Service(n, "grpc", "x:1", n) for n in ("fast", "slow", "broken")]


class FakeGateway:
    """Stands in for Triton in the fan-out's own logic tests only."""

    def __init__(self, delays: dict[str, float], broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.delays = delays
        self.broken = broken
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.leftover: list[asyncio.Task[object]] = []

    async def infer(self, service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        try:
            await asyncio.sleep(self.delays.get(service.name, 0))
        except asyncio.CancelledError:
            self.cancelled.append(service.name)
            raise
        if service.name in self.broken:
            raise UpstreamUnavailable(f"{service.name}: down", service=service.name)
        self.finished.append(service.name)
        return np.tile(np.array([[0.6, 0.4]], dtype=np.float32), (x.shape[0], 1))


#: How ``FanOut.run`` waits: a task per call (``infer``), or futures from a coalescer (``submit``).
MODES = ["tasks", "coalescer futures"]


def _run(  # type: ignore[no-untyped-def]
    fake: FakeGateway, policy: TimeoutPolicy, deadline_s: float, service_timeout_s: float = 10, mode=MODES[0]
):
    """The result, and the tasks left running once ``run`` returned and the loop took one turn
    (a call given up is cancelled at once; its task ends on the loop's next turn)."""

    async def main():  # type: ignore[no-untyped-def]
        coalescer = Coalescer(fake.infer, max_rows=64) if mode == MODES[1] else None
        fanout = FanOut(fake.infer, service_timeout_s, submitter=coalescer)
        try:
            result = await fanout.run(
                SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + deadline_s, policy
            )
        finally:
            running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert all(t.cancelling() for t in running), "a call still running, not given up"
            await asyncio.sleep(0)
            fake.leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return result, fake.leftover

    return asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_partial_reports_each_missing_service_with_its_reason(mode: str) -> None:
    fake = FakeGateway({"slow": 5.0}, broken={"broken"})
    started = time.perf_counter()
    result, leftover = _run(fake, TimeoutPolicy.PARTIAL, deadline_s=0.1, mode=mode)
    assert time.perf_counter() - started < 2.5  # the deadline, not `slow`'s 5 s
    assert result.answered == ["fast"]
    assert {n: m.reason for n, m in result.missing.items()} == {"slow": "timeout", "broken": "unavailable"}
    assert fake.cancelled == ["slow"] and leftover == []


@pytest.mark.parametrize("mode", MODES)
def test_all_or_nothing_fails_fast_and_cancels_the_rest(mode: str) -> None:
    fake = FakeGateway({"slow": 5.0, "broken": 0.01}, broken={"broken"})
    started = time.perf_counter()
    with pytest.raises(ServicesFailed) as failed:
        _run(fake, TimeoutPolicy.ALL_OR_NOTHING, deadline_s=10, mode=mode)
    assert time.perf_counter() - started < 2.5  # `broken`'s failure, not `slow`'s 5 s
    assert failed.value.status_code == 503 and "broken" in failed.value.message
    assert fake.cancelled == ["slow"]


@pytest.mark.parametrize("mode", MODES)
def test_all_or_nothing_timeout_is_504(mode: str) -> None:
    with pytest.raises(ServicesFailed) as failed:
        _run(FakeGateway({"slow": 5.0}), TimeoutPolicy.ALL_OR_NOTHING, deadline_s=0.05, mode=mode)
    assert failed.value.status_code == 504 and "slow (timeout)" in failed.value.message


@pytest.mark.parametrize("mode", MODES)
def test_partial_with_nobody_answering_is_an_error(mode: str) -> None:
    fake = FakeGateway({"fast": 5.0, "slow": 5.0, "broken": 5.0})
    with pytest.raises(ServicesFailed) as failed:
        _run(fake, TimeoutPolicy.PARTIAL, deadline_s=0.05, mode=mode)
    assert failed.value.status_code == 504 and "no service answered" in failed.value.message


@pytest.mark.parametrize("mode", MODES)
def test_service_timeout_bounds_each_call(mode: str) -> None:
    fake = FakeGateway({"slow": 1.0})
    result, _ = _run(fake, TimeoutPolicy.PARTIAL, deadline_s=5, service_timeout_s=0.05, mode=mode)
    assert result.missing["slow"].reason == "timeout"


def test_stream_yields_in_completion_order_and_cancels_on_early_exit() -> None:
    fake = FakeGateway({"fast": 0.0, "broken": 0.02, "slow": 5.0}, broken={"broken"})

    async def main() -> list[str]:
        fanout = FanOut(fake.infer, 10)
        seen = []
        stream = fanout.stream(SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + 10)
        async for outcome in stream:
            seen.append(outcome.service)
            if len(seen) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return seen

    assert asyncio.run(main()) == ["fast", "broken"]
    assert fake.cancelled == ["slow"]


def test_stream_with_the_deadline_already_passed_closes_cleanly() -> None:
    """Found by fuzzing: a stream stopped early when no call was ever started raised in cleanup."""
    fake = FakeGateway({})

    async def main() -> list[str]:
        fanout = FanOut(fake.infer, 10)
        stream = fanout.stream(SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() - 1)
        seen = []
        async for outcome in stream:
            seen.append(outcome.reason)
            break
        await stream.aclose()  # type: ignore[attr-defined]
        return seen

    assert asyncio.run(main()) == ["timeout"]


@pytest.mark.parametrize("mode", MODES)
def test_a_request_cancelled_while_waiting_gives_up_its_calls_and_records_them(mode: str) -> None:
    """The client went away: every call still running is given up and counted as cancelled."""
    fake = FakeGateway({"fast": 0.0, "slow": 5.0, "broken": 5.0})
    recorded: list[tuple[str, str]] = []

    async def main() -> None:
        coalescer = Coalescer(fake.infer, max_rows=64) if mode == MODES[1] else None
        fanout = FanOut(
            fake.infer, 10, on_outcome=lambda o: recorded.append((o.service, o.reason)), submitter=coalescer
        )
        request = asyncio.create_task(
            fanout.run(
                SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + 10, TimeoutPolicy.PARTIAL
            )
        )
        await asyncio.sleep(0.05)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())
    assert sorted(fake.cancelled) == ["broken", "slow"]
    assert sorted(recorded) == [("broken", "cancelled"), ("slow", "cancelled")]


def test_a_bug_in_a_call_is_raised_not_turned_into_an_outcome() -> None:
    async def broken(service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        raise KeyError("a bug")

    async def main() -> None:
        fanout = FanOut(broken, 10, submitter=Coalescer(broken, max_rows=64))
        await fanout.run(
            SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + 10, TimeoutPolicy.PARTIAL
        )

    with pytest.raises(KeyError):
        asyncio.run(main())


def test_services_that_all_refused_the_input_are_a_422_and_any_other_failure_a_503() -> None:
    rejected = Failure("rejected", "m: the model refused the input")
    assert ServicesFailed("x", {"a": rejected, "b": rejected}).status_code == 422
    assert ServicesFailed("x", {"a": rejected}).code == "input_rejected"
    mixed = ServicesFailed("x", {"a": rejected, "b": Failure("unavailable", "b: down")})
    assert (mixed.status_code, mixed.code) == (503, "upstream_unavailable")
    assert ServicesFailed("x", {"a": rejected, "b": Failure("timeout", "b: late")}).status_code == 504
