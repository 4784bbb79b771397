"""Hedged calls and the balancers, on the gateway's own replica logic with calls that only sleep
(no server: the hedging state machine alone; tests/test_hedging.py runs it against Triton).

The calls sleep on a test clock (``virtual_time``): a hedge delay of 10 ms against a call of
40 ms is decided by those figures alone, however busy the machine running the test is."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from client_proxy.config import load_settings
from client_proxy.core.services import ConfigError, Hedge, Service, Target, parse_hedge
from client_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from client_proxy.triton.gateway import TritonGateway
from client_proxy.triton.replicas import HEDGE_BURST_CALLS, MIN_LATENCIES, ReplicaSet

from .virtual_time import Clock, run_on

#: The tests' clock: each test has its own gateway, and the clock only goes forward.
CLOCK = Clock()

T = TypeVar("T")
A, B, C = (Target("grpc", f"{h}:8001", "m") for h in ("a", "b", "c"))


class Recorder:
    def __init__(self) -> None:
        self.hedges: list[str] = []
        self.outcomes: list[tuple[str, str]] = []

    def replica_call(self, service: str, replica: str, outcome: str) -> None:
        self.outcomes.append((replica.split("/")[2].split(":")[0], outcome))

    def replica_state(self, service: str, replica: str, state: str) -> None:
        pass

    def retry(self, service: str) -> None:
        pass

    def hedge(self, service: str, outcome: str) -> None:
        self.hedges.append(outcome)


def _gateway(recorder: Recorder | None = None, **settings: Any) -> TritonGateway:
    return TritonGateway(load_settings(**{"balancer": "round_robin", **settings}), recorder, CLOCK)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return run_on(CLOCK, coroutine)


def _service(hedge: str = "20ms", targets: tuple[Target, ...] = (A, B)) -> Service:
    first = targets[0]
    return Service(
        "s", first.protocol, first.url, first.model, more=targets[1:], hedge=parse_hedge(hedge, "test")
    )


def _calls(seconds: dict[str, float]) -> tuple[Callable[[Any, Target, float], Awaitable[str]], list[str]]:
    """A call that answers its replica's host after ``seconds[host]``; and the hosts whose call
    was cancelled."""
    cancelled: list[str] = []

    async def call(client: Any, target: Target, budget: float) -> str:
        host = target.url.split(":")[0]
        try:
            await asyncio.sleep(seconds[host])
        except asyncio.CancelledError:
            cancelled.append(host)
            raise
        return host

    return call, cancelled


def test_hedge_settings_parse_and_refuse_nonsense() -> None:
    assert parse_hedge("off", "X") == Hedge() and not parse_hedge("off", "X").on
    assert parse_hedge("20ms", "X") == Hedge(delay_ms=20) == parse_hedge("20", "X")
    assert parse_hedge("p95", "X") == Hedge(percentile=95)
    assert parse_hedge("P99.9", "X").percentile == 99.9
    for bad in ("p100", "p0", "-5ms", "soon", "pfast"):
        with pytest.raises(ConfigError, match="X="):
            parse_hedge(bad, "X")
    with pytest.raises(ConfigError, match="PROXY_HEDGE"):
        load_settings(hedge="soon")
    assert load_settings(hedge="p95").default_hedge == Hedge(percentile=95)


def test_a_slow_call_is_hedged_on_another_replica_and_the_loser_is_cancelled() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("20ms")
    call, cancelled = _calls({"a": 5.0, "b": 0.001})

    async def run() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await gateway.routing.call(service, 2.0, call)
        return answer, loop.time() - started

    answer, took = _run(run())
    assert answer == "b"  # round robin sent the first try to a, which did not answer in 20 ms
    assert took == pytest.approx(0.021)  # the hedge's 20 ms and b's 1 ms, not a's 5 s
    assert cancelled == ["a"]
    assert recorder.hedges == ["sent", "won"]
    assert ("a", "cancelled") in recorder.outcomes and ("b", "ok") in recorder.outcomes
    replicas = gateway.replicas(service)
    assert [r.outstanding for r in replicas.replicas] == [0, 0]
    assert (replicas.hedges, replicas.hedges_won, replicas.calls) == (1, 1, 1)
    assert gateway.hedging(service)["extra_load"] == 1.0


def test_a_call_that_answers_before_the_delay_is_not_hedged() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("200ms")
    call, cancelled = _calls({"a": 0.199, "b": 0.001})

    async def run() -> list[str]:
        return [await gateway.routing.call(service, 2.0, call) for _ in range(10)]

    assert sorted(set(_run(run()))) == ["a", "b"]
    assert recorder.hedges == [] and cancelled == []


def test_the_first_answer_wins_even_when_it_is_the_first_try() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("10ms")
    call, cancelled = _calls({"a": 0.05, "b": 5.0})  # a is late, but b is later still
    assert _run(gateway.routing.call(service, 2.0, call)) == "a"
    assert recorder.hedges == ["sent"] and cancelled == ["b"]


def test_hedges_stay_within_their_budget() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder, hedge_budget=0.1)
    service = _service("1ms")
    call, _ = _calls({"a": 0.02, "b": 0.02})  # every call is slow: each would be hedged

    async def run() -> None:
        await asyncio.gather(*(gateway.routing.call(service, 2.0, call) for _ in range(300)))

    _run(run())
    assert recorder.hedges.count("budget") > 0
    sent = recorder.hedges.count("sent")
    burst = 0.1 * HEDGE_BURST_CALLS
    assert sent <= burst + 0.1 * 300
    assert sent >= burst  # the burst is spent before the budget refuses
    assert recorder.hedges.count("budget") == 300 - sent


def test_no_hedge_when_the_deadline_leaves_less_than_a_typical_call() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("10ms")
    replicas = gateway.replicas(service)
    for _ in range(MIN_LATENCIES):
        replicas.latencies.add(0.1)  # the service usually takes 100 ms
    call, _ = _calls({"a": 0.04, "b": 0.04})
    _run(gateway.routing.call(service, 0.06, call))  # 50 ms left at the hedge: too little
    assert recorder.hedges == ["deadline"]


def test_a_percentile_delay_follows_the_recent_latencies() -> None:
    gateway = _gateway()
    service = _service("p90")
    replicas = gateway.replicas(service)
    assert gateway.hedging(service)["delay_ms"] is None  # too few latencies yet: no hedging
    for i in range(100):
        replicas.latencies.add(0.001 * (i + 1))  # 1..100 ms
    delay = replicas.hedge_delay(Hedge(percentile=90))
    assert delay == pytest.approx(0.0901, abs=0.001)
    assert gateway.hedging(service)["delay_ms"] == pytest.approx(90.1, abs=1)


def test_a_hedge_never_goes_to_an_ejected_replica_nor_with_one_replica() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("5ms")
    replicas = gateway.replicas(service)
    replicas.failed(replicas.replicas[1], "unavailable", True, "down")
    call, _ = _calls({"a": 0.03, "b": 0.001})
    assert _run(gateway.routing.call(service, 2.0, call)) == "a"
    assert recorder.hedges == ["no_replica"]
    assert replicas.hedge_delay(Hedge(delay_ms=5)) is not None
    assert ReplicaSet("one", [A]).hedge_delay(Hedge(delay_ms=5)) is None


def test_a_fast_failure_while_the_hedge_is_out_leaves_the_hedge_to_answer() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    service = _service("5ms")

    async def call(client: Any, target: Target, budget: float) -> str:
        if target.url.startswith("a"):
            await asyncio.sleep(0.02)
            raise UpstreamUnavailable("s: its Triton server is unreachable", service="s")
        await asyncio.sleep(0.05)
        return "b"

    assert _run(gateway.routing.call(service, 2.0, call)) == "b"
    assert recorder.hedges == ["sent", "won"]
    assert [r.outstanding for r in gateway.replicas(service).replicas] == [0, 0]


def test_a_request_given_up_cancels_both_calls() -> None:
    gateway = _gateway(Recorder())
    service = _service("5ms")
    call, cancelled = _calls({"a": 5.0, "b": 5.0})

    async def run() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await gateway.routing.call(service, 2.0, call)
        await asyncio.sleep(0)  # the cancelled calls run their last step

    _run(run())
    assert sorted(cancelled) == ["a", "b"]
    assert [r.outstanding for r in gateway.replicas(service).replicas] == [0, 0]


def test_round_robin_takes_turns_and_least_outstanding_takes_the_idlest() -> None:
    turns = ReplicaSet("s", [A, B, C], balancer="round_robin")
    assert [turns.pick().target for _ in range(6)] == [A, B, C, A, B, C]
    least = ReplicaSet("s", [A, B, C], balancer="least_outstanding", rng=random.Random(4))
    least.replicas[0].outstanding, least.replicas[1].outstanding = 3, 1
    assert {least.pick().target for _ in range(20)} == {C}
    least.replicas[2].outstanding = 1
    assert {least.pick().target for _ in range(50)} == {B, C}  # ties drawn at random


def test_a_late_call_is_not_sent_again_but_a_fast_failure_is() -> None:
    """Retry is for a replica that cannot take the call (unreachable, model not ready): sent once
    more, to the other. A late call is not: a slow replica is what hedging is for."""

    def scenario(error: Exception) -> tuple[str | Exception, list[str]]:
        gateway = _gateway(Recorder(), hedge="off")  # round robin: the first call goes to a
        tried: list[str] = []

        async def call(client: Any, target: Target, budget: float) -> str:
            host = target.url.split(":")[0]
            tried.append(host)
            if host == "a":
                raise error
            return host

        async def run() -> str | Exception:
            try:
                return await gateway.routing.call(_service("off"), 2.0, call)
            except Exception as exc:
                return exc

        return _run(run()), tried

    assert scenario(UpstreamUnavailable("s: down", service="s")) == ("b", ["a", "b"])
    late, tried = scenario(TimeoutError())
    assert isinstance(late, UpstreamTimeout) and tried == ["a"]  # not sent to b
