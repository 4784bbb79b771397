"""Reliability under faults, load and hostile input, against the real embedded Triton."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from local_triton import TritonServer, free_ports

from .conftest import ROOT
from .helpers import (
    iris_repository,
    proxy_environment,
    read_http_response,
    running_proxy,
    services_on,
    settings,
    wait_healthy,
)

ROW = {"data": [[1.0, 2.0, 3.0, 4.0]]}


async def _load(
    url: str, seconds: float, concurrency: int, path: str = "/predict/label"
) -> list[tuple[int, float]]:
    """Closed-loop load; every request's (status, seconds); a transport error is status 0."""
    results: list[tuple[int, float]] = []
    until = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                status = (await client.post(path, json=ROW)).status_code
            except httpx.TransportError:
                status = 0
            results.append((status, time.perf_counter() - started))

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def test_triton_killed_under_load_every_request_answered_in_time_then_recovery(tmp_path: Path) -> None:
    server = TritonServer(
        model_repository=iris_repository(tmp_path), http_port=0, grpc_port=0, metrics_port=0
    )
    server.start()
    try:
        with running_proxy(settings(deadline_ms=1000), services_on(server, "grpc")) as url:
            killer = threading.Timer(1.5, server.kill)  # SIGKILL, as a crash
            killer.start()
            results = asyncio.run(_load(url, 4.0, 16))
            killer.join()
            statuses = {s for s, _ in results}
            assert statuses <= {200, 503, 504}, statuses  # never a 500, never a dropped connection
            assert 200 in statuses and statuses & {503, 504}
            # Every answer near the 1 s deadline, measured by this Python client, which shares two
            # cores with the proxy and a Triton being killed: it was seen at 2.3 s once, on a machine
            # running a second test session. What this guards against is a request left hanging
            # (gRPC's reconnect, the client's 30 s timeout), so the bound sits 5 s above the deadline
            # and 25 s below the hang.
            assert max(t for _, t in results) < 6.0

            server.stop()  # reap what the kill left
            server.start()  # Triton back on the same ports
            deadline = time.monotonic() + 15
            while httpx.post(f"{url}/predict/label", json=ROW).status_code != 200:
                assert time.monotonic() < deadline, "no recovery within 15 s"
                time.sleep(0.2)
    finally:
        server.stop()


def test_proxy_sigterm_under_load_finishes_in_flight_and_closes_its_clients(
    explicit_triton: TritonServer, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    models = {"setosa": "setosa", "very_slow": "very_slow"}  # answers after 3 s: requests in flight
    # Eight calls, two very_slow instances: the last batch waits for a free one (about 6 s).
    proxy_settings = settings(log_level="INFO", deadline_ms=10000, service_timeout_ms=10000)
    env = proxy_environment(proxy_settings, services_on(explicit_triton, "grpc", models), port)
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "client_proxy"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process)  # type: ignore[arg-type]

            async def in_flight_then_term() -> tuple[list[httpx.Response], bool]:
                async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                    tasks = [asyncio.create_task(client.post("/predict/label", json=ROW)) for _ in range(8)]
                    await asyncio.sleep(0.5)  # all eight are waiting for `very_slow`
                    process.send_signal(signal.SIGTERM)
                    # During the drain (the eight still in flight): new connections are refused.
                    refused = False
                    for _ in range(40):
                        await asyncio.sleep(0.05)
                        with socket.socket() as sock:
                            if sock.connect_ex(("127.0.0.1", port)) != 0:
                                refused = not any(t.done() for t in tasks)
                                break
                    return await asyncio.gather(*tasks), refused

            responses, refused_while_draining = asyncio.run(in_flight_then_term())
            assert refused_while_draining, "new connections were still accepted while draining"
            for response in responses:  # all eight finished, whole, with very_slow's answer
                assert response.status_code == 200 and response.json()["prediction"]["label"] == "very_slow"
            # uvicorn finishes its graceful shutdown, then re-raises the signal it caught.
            assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "closed the clients of 1 Triton server(s)" in log_path.read_text()


def test_slow_unloaded_and_failing_at_once(explicit_triton: TritonServer) -> None:
    import tritonclient.http as triton_http

    models = {"setosa": "setosa", "very_slow": "very_slow", "failing": "failing", "virginica": "virginica"}
    expected = {"very_slow": "timeout", "failing": "error", "virginica": "unavailable"}
    control = triton_http.InferenceServerClient(explicit_triton.http_url)
    with running_proxy(settings(deadline_ms=300), services_on(explicit_triton, "grpc", models)) as url:
        control.unload_model("virginica")  # a real model, gone while the proxy runs
        try:
            body = httpx.post(f"{url}/predict/label", json=ROW).json()
            assert body["prediction"]["label"] == "setosa"
            assert {n: m["reason"] for n, m in body["missing"].items()} == expected
            strict = httpx.post(f"{url}/predict/label", json=ROW, params={"policy": "all_or_nothing"})
            # The first failure (failing or virginica) ends it, before very_slow is late.
            assert strict.status_code == 503 and "very_slow" not in strict.json()["error"]["message"]
            lines = [
                json.loads(line) for line in httpx.post(f"{url}/predict/stream", json=ROW).text.splitlines()
            ]
        finally:
            control.load_model("virginica")
            control.close()
    *services, final = lines
    assert sorted(line["service"] for line in services) == sorted(models)  # each once
    by_service = {line["service"]: line for line in services}
    assert len(by_service["setosa"]["prediction"]) == 2 and "error" not in by_service["setosa"]
    assert {n: by_service[n]["error"]["reason"] for n in expected} == expected
    assert services[-1]["service"] == "very_slow"  # cut off by the deadline, after the others
    assert final["final"] is True and final["partial"] is True and set(final["missing"]) == set(expected)


def test_short_soak_has_no_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "6", "--concurrency", "32", "--window", "3",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "soak.md").read_text()
    assert "failed (non-2xx or socket errors): 0" in report
    idle_fds = int(re.search(r"open file descriptors: (\d+) idle", report)[1])  # type: ignore[index]
    first_rss = float(re.search(r"([\d.]+) MB after the first window", report)[1])  # type: ignore[index]
    after = re.search(r"after the load: proxy RSS ([\d.]+) MB, (\d+) open file descriptors", report)
    assert after is not None, report
    # Every connection's descriptor given back once the load is over.
    assert int(after[2]) <= idle_fds, report
    # Memory: warm after the first window, then flat. 25 MB is far above what 6 s of load should
    # add (the 3-minute soak grows 0.013 MB per 10,000 requests) and far below a per-request leak.
    assert float(after[1]) - first_rss < 25, report


def _raw(port: int, payload: bytes, read_timeout: float = 5.0) -> str:
    """Send ``payload`` in 64 KiB pieces, stopping as soon as the proxy answers (it may refuse a
    body early and close: writing on would only earn a reset that can swallow its answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        with contextlib.suppress(OSError):
            for start in range(0, len(payload), 65536):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(payload[start : start + 65536])
        return read_http_response(sock)


@pytest.fixture(scope="module")
def proxy_port(triton: TritonServer) -> object:
    with running_proxy(settings(), services_on(triton, "grpc")) as url:
        yield int(url.rsplit(":", 1)[1])


def test_a_100_mb_body_is_refused_before_it_is_read(proxy_port: int) -> None:
    head = (
        b"POST /predict/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    started = time.perf_counter()
    answer = _raw(proxy_port, head + b'{"data": [[1,2,3,4]]')
    assert answer.startswith("HTTP/1.1 413") and time.perf_counter() - started < 2


def _post_whole_body_then_read(
    port: int, body: bytes | list[bytes], headers: dict[str, str]
) -> tuple[int, str]:
    """As a blocking client does: send every byte of the body, only then read the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", "/predict/label", body=body, headers=headers, encode_chunked=isinstance(body, list)
        )
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


BIG_BODY = json.dumps({"data": [[1.0, 2.0, 3.0, 4.0]] * 200_000}).encode()  # 4.4 MB, over the 1 MiB limit


def test_a_client_that_sends_its_whole_body_first_reads_the_413_urllib(proxy_port: int) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy_port}/predict/label",
        data=BIG_BODY,
        headers={"Content-Type": "application/json"},
    )  # urllib sends Connection: close, so the proxy closes after answering
    for _ in range(3):  # a reset is a race the client usually loses: once is not proof
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_sends_its_whole_body_first_reads_the_413(proxy_port: int, chunked: bool) -> None:
    body: bytes | list[bytes] = (
        [BIG_BODY[i : i + 65536] for i in range(0, len(BIG_BODY), 65536)] if chunked else BIG_BODY
    )
    for _ in range(3):
        status, text = _post_whole_body_then_read(
            proxy_port, body, {"Content-Type": "application/json", "Connection": "close"}
        )
        assert status == 413 and "payload_too_large" in text
    assert httpx.post(f"http://127.0.0.1:{proxy_port}/predict/label", json=ROW).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(proxy_port: int) -> None:
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40))  # 2.5 MB, no Content-Length
    head = (
        b"POST /predict/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    answer = _raw(proxy_port, head + body)
    assert answer.startswith("HTTP/1.1 413")
    assert httpx.post(f"http://127.0.0.1:{proxy_port}/predict/label", json=ROW).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400, "depth"),
        (b'{"data": [[1, 2, 3, 4]], "data": [[5, 6, 7, 8]]}', 400, "duplicated key"),
        ('{"dätä": [[1, 2, 3, 4]]}'.encode(), 422, "dätä"),
        ('{"data": [[1, 2, 3, 4]], "\U0001f600": 1}'.encode(), 422, "Extra inputs"),
        (b'{"data": [[1e308, -1e308, 0, 4]]}', 422, "less than or equal"),
        (b'{"data": [[' + b"9" * 5000 + b", 1, 2, 3]]}", 400, "number is infinity"),
    ],
)
def test_hostile_bodies_get_a_clear_4xx(proxy_port: int, body: bytes, status: int, text: str) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{proxy_port}/predict/label",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"]
    assert "Traceback" not in response.text
    assert httpx.post(f"http://127.0.0.1:{proxy_port}/predict/label", json=ROW).status_code == 200


def test_error_bodies_carry_no_internal_address(triton: TritonServer) -> None:
    # A Triton that is not there: the error names the service, not where it lives.
    (dead,) = free_ports(1)
    from client_proxy import Service

    services = [Service("setosa", "grpc", f"127.0.0.1:{dead}", "setosa")]
    with running_proxy(settings(), services) as url:
        response = httpx.post(f"{url}/predict/label", json=ROW)
        assert response.status_code == 503
        assert (
            "setosa" in response.text and str(dead) not in response.text and "127.0.0.1" not in response.text
        )


def test_cors_is_off_by_default_and_configurable(triton: TritonServer) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with running_proxy(settings(), services_on(triton, "grpc")) as url:
        response = httpx.options(f"{url}/predict/label", headers=headers)
        assert "access-control-allow-origin" not in response.headers
    with running_proxy(settings(cors_origins=["https://app.example"]), services_on(triton, "grpc")) as url:
        response = httpx.options(f"{url}/predict/label", headers=headers)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{url}/predict/label", headers={**headers, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # The answer itself carries it too, served by the fast lane with CORS inside the front
        # (its request id on it, as on every answer).
        answer = httpx.post(f"{url}/predict/label", json=ROW, headers={"Origin": "https://app.example"})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert answer.headers["access-control-expose-headers"] == "X-Request-ID"
        assert len(answer.headers["x-request-id"]) == 32


def test_fuzzing_the_openapi_schema_finds_no_server_error_and_no_schema_violation(proxy_port: int) -> None:
    """schemathesis, bounded: every documented operation with generated valid and invalid input."""
    config = Path(__file__).parent / "schemathesis.toml"  # a 504 for a deadline asked for is no bug
    result = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "--config-file", str(config),
         "run", f"http://127.0.0.1:{proxy_port}/openapi.json",
         "--checks",
         "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
         "--max-examples", "25", "--request-timeout", "10", "--seed", "20261122"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout
    assert httpx.post(f"http://127.0.0.1:{proxy_port}/predict/label", json=ROW).status_code == 200
