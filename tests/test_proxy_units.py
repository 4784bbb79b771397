"""Pure unit tests: configuration parsing and the fan-out's logic (a fake gateway, no Triton)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest

from client_proxy.config import (
    ConfigError,
    Service,
    TimeoutPolicy,
    load_settings,
    parse_service,
    services_from_env,
)
from client_proxy.errors import ServicesFailed, UpstreamUnavailable
from client_proxy.fanout import FanOut, aggregate
from client_proxy.inputs import parse_rows

from .conftest import ROOT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("triton:8001", Service("setosa", "grpc", "triton:8001", "setosa")),
        ("triton:8001/setosa_v2", Service("setosa", "grpc", "triton:8001", "setosa_v2")),
        ("triton:8001/setosa/3", Service("setosa", "grpc", "triton:8001", "setosa", "3")),
        ("http://10.0.0.5:8000", Service("setosa", "http", "10.0.0.5:8000", "setosa")),
        ("grpc://[::1]:8001/m/", Service("setosa", "grpc", "[::1]:8001", "m")),
    ],
)
def test_service_variables(value: str, expected: Service) -> None:
    assert parse_service("setosa", value, "grpc") == expected


@pytest.mark.parametrize(
    "value", ["triton", "triton:port", "ftp://triton:8001", "triton:8001/a/b/c", "triton:99999", ""]
)
def test_bad_service_variable_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="SERVICE_SETOSA"):
        parse_service("setosa", value, "grpc")


def test_services_from_env_sorted_and_defaulted() -> None:
    settings = load_settings(protocol="http", triton_host="triton")
    env = {"SERVICE_VIRGINICA": "t:8000", "SERVICE_SETOSA": "t:8000", "OTHER": "x"}
    assert [s.name for s in services_from_env(env, settings)] == ["setosa", "virginica"]
    defaults = services_from_env({}, settings)
    assert [(s.name, s.url, s.protocol) for s in defaults] == [
        ("setosa", "triton:8000", "http"),
        ("versicolor", "triton:8000", "http"),
        ("virginica", "triton:8000", "http"),
    ]


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_DEADLINE_MS", "-1")
    with pytest.raises(ConfigError, match="PROXY_DEADLINE_MS"):
        load_settings()
    monkeypatch.setenv("PROXY_DEADLINE_MS", "100")
    monkeypatch.setenv("PROXY_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match="PROXY_PROTOCOL"):
        load_settings()


def test_cli_refuses_bad_settings_with_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PROXY_TIMEOUT_POLICY": "sometimes"}
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "PROXY_TIMEOUT_POLICY" in result.stderr
    env = {"PATH": "/usr/bin:/bin", "SERVICE_SETOSA": "no-port"}
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "SERVICE_SETOSA" in result.stderr


def test_aggregate_is_the_seeds_rule_per_row() -> None:
    probabilities = {
        "a": np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32),
        "b": np.array([[0.3, 0.7], [0.5, 0.5], [0.1, 0.9]], dtype=np.float32),
    }
    labels = aggregate(probabilities)
    assert labels.names == ["b", "a", "a"]  # a tie goes to the first service, as in the seed
    np.testing.assert_allclose(labels.proba, [0.3, 0.5, 0.9])


def test_parse_rows_builds_float32() -> None:
    rows = parse_rows(b'{"data": [[1, 2.5, 3, 4], [5, 6, 7, 8]]}', max_rows=10)
    assert rows.dtype == np.float32 and rows.shape == (2, 4)


SERVICES = [Service(n, "grpc", "x:1", n) for n in ("fast", "slow", "broken")]


class FakeGateway:
    """Stands in for Triton in the fan-out's own logic tests only."""

    def __init__(self, delays: dict[str, float], broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.delays = delays
        self.broken = broken
        self.cancelled: list[str] = []
        self.finished: list[str] = []

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


def _run(fake: FakeGateway, policy: TimeoutPolicy, deadline_s: float, service_timeout_s: float = 10):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        fanout = FanOut(fake.infer, service_timeout_s)
        result = await fanout.run(
            SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + deadline_s, policy
        )
        return result, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    return asyncio.run(main())


def test_partial_reports_each_missing_service_with_its_reason() -> None:
    fake = FakeGateway({"slow": 5.0}, broken={"broken"})
    started = time.perf_counter()
    result, leftover = _run(fake, TimeoutPolicy.PARTIAL, deadline_s=0.1)
    assert time.perf_counter() - started < 2.5  # the deadline, not `slow`'s 5 s
    assert result.answered == ["fast"]
    assert {n: m["reason"] for n, m in result.missing.items()} == {"slow": "timeout", "broken": "unavailable"}
    assert fake.cancelled == ["slow"] and leftover == []


def test_all_or_nothing_fails_fast_and_cancels_the_rest() -> None:
    fake = FakeGateway({"slow": 5.0, "broken": 0.01}, broken={"broken"})
    started = time.perf_counter()
    with pytest.raises(ServicesFailed) as failed:
        _run(fake, TimeoutPolicy.ALL_OR_NOTHING, deadline_s=10)
    assert time.perf_counter() - started < 2.5  # `broken`'s failure, not `slow`'s 5 s
    assert failed.value.status_code == 503 and "broken" in failed.value.message
    assert fake.cancelled == ["slow"]


def test_all_or_nothing_timeout_is_504() -> None:
    with pytest.raises(ServicesFailed) as failed:
        _run(FakeGateway({"slow": 5.0}), TimeoutPolicy.ALL_OR_NOTHING, deadline_s=0.05)
    assert failed.value.status_code == 504 and "slow (timeout)" in failed.value.message


def test_partial_with_nobody_answering_is_an_error() -> None:
    fake = FakeGateway({"fast": 5.0, "slow": 5.0, "broken": 5.0})
    with pytest.raises(ServicesFailed) as failed:
        _run(fake, TimeoutPolicy.PARTIAL, deadline_s=0.05)
    assert failed.value.status_code == 504 and "no service answered" in failed.value.message


def test_service_timeout_bounds_each_call() -> None:
    result, _ = _run(FakeGateway({"slow": 1.0}), TimeoutPolicy.PARTIAL, deadline_s=5, service_timeout_s=0.05)
    assert result.missing["slow"]["reason"] == "timeout"


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
