"""``/health/live`` and ``/health/ready``: the probes a platform understands, against the real Triton."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from client_proxy import Service
from local_triton import TritonServer, free_ports

from .conftest import ROOT
from .helpers import proxy_environment, running_proxy, services_on, settings, wait_healthy

ROW = {"data": [[1.0, 2.0, 3.0, 4.0]]}


def _nothing_listening() -> str:
    (port,) = free_ports(1)
    return f"127.0.0.1:{port}"


def test_live_and_ready_when_every_service_is_ready(triton: TritonServer) -> None:
    with running_proxy(settings(), services_on(triton, "grpc")) as url:
        live = httpx.get(f"{url}/health/live")
        assert live.status_code == 200 and live.json() == {"status": "live"}
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "ready_services": ["setosa", "versicolor", "virginica"]}


def test_ready_while_one_service_of_three_is(triton: TritonServer) -> None:
    dead = _nothing_listening()
    services = [
        Service("setosa", "grpc", triton.grpc_url, "setosa"),
        Service("versicolor", "grpc", dead, "versicolor"),
        Service("virginica", "grpc", dead, "virginica"),
    ]
    with running_proxy(settings(), services) as url:
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 200 and ready.json()["ready_services"] == ["setosa"]
        # And a prediction can indeed be answered (a partial one).
        assert httpx.post(f"{url}/predict/label", json=ROW).status_code == 200


def test_not_ready_but_live_when_no_service_is_ready() -> None:
    dead = _nothing_listening()
    services = [Service(n, "grpc", dead, n) for n in ("setosa", "versicolor", "virginica")]
    with running_proxy(settings(service_timeout_ms=300), services) as url:
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "unavailable"
        assert all(name in body["reason"] for name in ("setosa", "versicolor", "virginica"))
        assert httpx.get(f"{url}/health/live").status_code == 200
        assert httpx.get(f"{url}/health").json() == {"health": "ok"}  # the seed's probe, as it was


def test_sigterm_makes_ready_fail_at_once_while_predictions_go_on(
    triton: TritonServer, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    proxy_settings = settings(shutdown_delay_ms=2000, log_level="INFO")
    env = proxy_environment(proxy_settings, services_on(triton, "grpc"), port)
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "proxy.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "client_proxy"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
    try:
        wait_healthy(url, process)  # type: ignore[arg-type]
        assert httpx.get(f"{url}/health/ready").status_code == 200
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        draining = httpx.get(f"{url}/health/ready")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        assert httpx.post(f"{url}/predict/label", json=ROW).status_code == 200  # still served
        assert httpx.get(f"{url}/health/live").status_code == 200
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
        assert "SIGTERM: not ready, stopping in 2000 ms" in (tmp_path / "proxy.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
