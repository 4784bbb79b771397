"""Settings and services: ``PROXY_*`` and ``SERVICE_*`` parsed, and one line naming a mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from client_proxy.config import load_settings, services_from_env
from client_proxy.core.services import ConfigError, Service, parse_service

from ..conftest import ROOT


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


def test_several_workers_are_refused_while_metrics_are_on() -> None:
    """Each worker would answer a scrape with its own figures: the combination stops the start."""
    from client_proxy.config import check_settings

    with pytest.raises(ConfigError, match=r"PROXY_WORKERS=2: /metrics would show one worker's figures"):
        check_settings(load_settings(workers=2))
    check_settings(load_settings(workers=2, metrics=False))  # no /metrics: nothing to get wrong
    check_settings(load_settings(workers=1))


def test_python_m_client_proxy_refuses_several_workers_with_metrics_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PROXY_WORKERS": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "client_proxy: error: PROXY_WORKERS=3: /metrics would show one worker's figures; run one worker "
        "per container (more replicas for more throughput), or set PROXY_METRICS=false"
    ]
