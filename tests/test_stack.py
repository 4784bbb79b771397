"""``make run``'s entry point, and the proxy's handling of slow clients and its log."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from local_triton import TritonServer, free_ports

from .conftest import ROOT
from .helpers import read_http_response, running_proxy, services_on, settings


def test_stack_serves_the_seed_requests_and_stops_both(tmp_path: Path) -> None:
    proxy_port, http, grpc, metrics = free_ports(4)
    process = subprocess.Popen(
        [sys.executable, "-m", "local_triton.stack", "--proxy-port", str(proxy_port),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        url = f"http://127.0.0.1:{proxy_port}"
        while True:
            assert process.poll() is None, "the stack exited"
            try:
                if httpx.get(f"{url}/health/all", timeout=2).json().get("status") == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.2)
        seed = {"data": [[1.0, 2.0, 3.0, 4.0]]}
        assert set(httpx.post(f"{url}/predict", json=seed).json()) == {"setosa", "versicolor", "virginica"}
        assert httpx.post(f"{url}/predict/label", json=seed).json()["prediction"]["label"] == "virginica"
        assert "nv_inference_request_success" in httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        for port in (proxy_port, http, grpc, metrics):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # let it stop what it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_a_killed_launcher_leaves_no_triton_behind(tmp_path: Path) -> None:
    import shutil

    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository" / "setosa", repository / "setosa")
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "local_triton", "--quiet", "--model-repository", str(repository),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert "ready" in process.stdout.readline()
    process.kill()  # no chance to clean up
    process.wait()
    process.stdout.close()
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", http)) != 0:
                break
        assert time.monotonic() < deadline, "Triton outlived its launcher"
        time.sleep(0.2)


def test_a_body_that_never_finishes_gets_408_within_the_deadline(triton: TritonServer) -> None:
    with running_proxy(settings(deadline_ms=500), services_on(triton, "grpc")) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /predict/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"data": [[1,'
            )
            started = time.perf_counter()
            answer = read_http_response(sock)
            elapsed = time.perf_counter() - started
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "request_timeout" in answer and elapsed < 1.5
        assert httpx.post(f"{url}/predict/label", json={"data": [[1, 2, 3, 4]]}).status_code == 200


def test_each_request_is_logged_with_its_id_and_each_services_outcome(
    triton: TritonServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as log:
        proxy_settings = settings().model_copy(update={"log_level": "INFO"})
        with running_proxy(proxy_settings, services_on(triton, "grpc"), log=log) as url:
            response = httpx.post(
                f"{url}/predict/label", json={"data": [[1, 2, 3, 4]]}, headers={"X-Request-ID": "trace-me-7"}
            )
            assert response.status_code == 200
    lines = [line for line in log_path.read_text().splitlines() if "request_id=trace-me-7" in line]
    assert len(lines) == 1
    for name in ("setosa", "versicolor", "virginica"):
        assert f" {name}=ok/" in lines[0]
    assert "endpoint=/predict/label" in lines[0]
