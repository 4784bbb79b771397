"""Settings and services: ``PROXY_*`` and ``SERVICE_*`` parsed, and one line naming a mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_several_workers_with_the_admin_token_need_a_services_file(tmp_path: Path) -> None:
    """A change reaches one worker, the others read it from the file: without one, the
    combination stops the start; metrics are shared by the workers, so they are no obstacle."""
    from client_proxy.config import check_settings

    with pytest.raises(
        ConfigError, match=r"PROXY_ADMIN_TOKEN with PROXY_WORKERS=2 needs PROXY_SERVICES_FILE"
    ):
        check_settings(load_settings(workers=2, admin_token="t"))
    check_settings(load_settings(workers=2, admin_token="t", services_file=tmp_path / "services.json"))
    check_settings(load_settings(workers=2))
    check_settings(load_settings(workers=1, admin_token="t"))


def test_python_m_client_proxy_refuses_several_workers_with_the_token_alone_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PROXY_WORKERS": "3", "PROXY_ADMIN_TOKEN": "t"}
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "client_proxy: error: PROXY_ADMIN_TOKEN with PROXY_WORKERS=3 needs PROXY_SERVICES_FILE: the workers "
        "share the admin endpoints' changes through it"
    ]
