"""Replica choice and outlier ejection (no server: the state machine alone)."""

from __future__ import annotations

import random

import pytest

from client_proxy.core.services import Target, parse_service
from client_proxy.triton.replicas import ReplicaSet

from .virtual_time import Clock

A, B, C = (Target("grpc", f"{h}:8001", "m") for h in ("a", "b", "c"))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.states: list[tuple[str, str]] = []
        self.retries = 0

    def replica_call(self, service: str, replica: str, outcome: str) -> None:
        self.calls.append((replica, outcome))

    def replica_state(self, service: str, replica: str, state: str) -> None:
        self.states.append((replica, state))

    def retry(self, service: str) -> None:
        self.retries += 1


def test_a_service_variable_names_replicas_each_with_the_usual_syntax() -> None:
    service = parse_service("setosa", "triton-a:8001,http://triton-b:8000/setosa_v2/3", "grpc")
    assert service.targets == (
        Target("grpc", "triton-a:8001", "setosa"),
        Target("http", "triton-b:8000", "setosa_v2", "3"),
    )
    assert parse_service("s", service.describe(), "grpc").targets == service.targets  # round trip


def test_two_choices_prefer_the_replica_with_fewer_calls_in_flight() -> None:
    replicas = ReplicaSet("s", [A, B], rng=random.Random(1))
    replicas.replicas[0].outstanding = 5
    assert all(replicas.pick() is replicas.replicas[1] for _ in range(20))


def test_load_spreads_over_healthy_replicas() -> None:
    replicas = ReplicaSet("s", [A, B, C], rng=random.Random(2))
    picked = [replicas.pick().target for _ in range(300)]
    assert {t: picked.count(t) for t in (A, B, C)} == {
        A: pytest.approx(100, abs=30),
        B: pytest.approx(100, abs=30),
        C: pytest.approx(100, abs=30),
    }


def test_an_unreachable_replica_is_ejected_at_once_then_probed_and_returned() -> None:
    recorder = Recorder()
    clock = Clock()
    replicas = ReplicaSet("s", [A, B], recorder, base_ejection_s=0.05, rng=random.Random(3), clock=clock)
    dead = replicas.replicas[0]
    replicas.failed(dead, "unavailable", True, "s: its Triton server is unreachable")
    assert [r["state"] for r in replicas.describe()] == ["ejected", "healthy"]
    assert all(replicas.pick() is replicas.replicas[1] for _ in range(20))  # no call while ejected
    clock.advance(0.049)
    assert replicas.describe()[0]["state"] == "ejected"
    clock.advance(0.001)
    assert replicas.describe()[0]["state"] == "probing"
    probe = replicas.pick(exclude=[replicas.replicas[1]])
    assert probe is dead
    dead.outstanding = 1  # the probe in flight: no second call to it meanwhile
    assert all(replicas.pick() is replicas.replicas[1] for _ in range(20))
    dead.outstanding = 0
    replicas.succeeded(dead)
    assert replicas.describe()[0]["state"] == "healthy"
    assert recorder.states == [(A.describe(), "ejected"), (A.describe(), "healthy")]


def test_the_back_off_doubles_with_each_ejection_in_a_row() -> None:
    clock = Clock()
    replicas = ReplicaSet("s", [A, B], base_ejection_s=1.0, max_ejection_s=3.0, clock=clock)
    replica = replicas.replicas[0]
    lengths = []
    for _ in range(4):
        replicas.failed(replica, "unavailable", True, "down")
        lengths.append(replica.ejected_until - clock())
        clock.advance(lengths[-1])  # its back-off has passed: the next failure is a failed probe
    assert lengths == [1, 2, 3, 3]  # doubling, up to max_ejection_s


def test_errors_eject_only_when_they_come_in_a_row() -> None:
    replicas = ReplicaSet("s", [A, B], failures_to_eject=3)
    replica = replicas.replicas[0]
    for _ in range(2):
        replicas.failed(replica, "error", False, "failed")
    replicas.succeeded(replica)  # the run is broken
    for _ in range(2):
        replicas.failed(replica, "timeout", False, "late")
    assert not replica.ejected
    replicas.failed(replica, "timeout", False, "late")
    assert replica.ejected and replicas.describe()[0]["reason"] == "late"


def test_with_every_replica_ejected_the_one_back_soonest_is_still_called() -> None:
    replicas = ReplicaSet("s", [A, B])
    replicas.failed(replicas.replicas[0], "unavailable", True, "down")
    replicas.failed(replicas.replicas[1], "unavailable", True, "down")
    replicas.replicas[1].ejected_until -= 0.5
    assert replicas.pick() is replicas.replicas[1]


def test_the_ejection_settings_reach_every_replica_set() -> None:
    from client_proxy.config import load_settings
    from client_proxy.core.services import Service
    from client_proxy.triton.gateway import TritonGateway

    clock = Clock()  # the ejection's length is read exactly
    now = clock()
    settings = load_settings(ejection_failures=2, ejection_base_ms=50, ejection_max_ms=80)
    gateway = TritonGateway(settings, clock=clock)
    replicas = gateway.replicas(Service("s", "grpc", "a:8001", "m", more=(B,)))
    replica = replicas.replicas[0]
    replicas.failed(replica, "error", False, "failed")
    assert not replica.ejected
    replicas.failed(replica, "error", False, "failed")  # the second in a row
    assert replica.ejected_until - now == pytest.approx(0.05)
    for _ in range(3):  # failed probes: 100 ms, then the 80 ms cap
        replica.ejected_until = 0.0
        replicas.failed(replica, "unavailable", True, "down")
    assert replica.ejected_until - now == pytest.approx(0.08)
    assert gateway.replicas(Service("s", "grpc", "a:8001", "m", more=(B,))) is replicas  # one per target set
