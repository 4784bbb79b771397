"""Deadlines, partial answers and failures, against a real Triton with test-only models."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from local_triton import TritonServer
from training import CLASS_NAMES

from .helpers import iris_repository, metric, running_proxy, services_on, settings

ROW = {"data": [[1.0, 2.0, 3.0, 4.0]]}
IRIS = {n: n for n in CLASS_NAMES}


@pytest.fixture(scope="module", params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _proxy(triton: TritonServer, protocol: str, models: dict[str, str], **overrides: object):  # type: ignore[no-untyped-def]
    return running_proxy(settings(protocol=protocol, **overrides), services_on(triton, protocol, models))


@pytest.fixture(scope="module")
def with_missing(explicit_triton: TritonServer, protocol: str) -> Iterator[httpx.Client]:
    """The three Iris services plus one whose model Triton does not have."""
    with (
        _proxy(explicit_triton, protocol, {**IRIS, "ghost": "no_such_model"}) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client


def test_missing_model_gives_a_partial_answer(with_missing: httpx.Client) -> None:
    body = with_missing.post("/predict/label", json=ROW).json()
    assert body["partial"] is True
    assert list(body["missing"]) == ["ghost"]
    assert body["missing"]["ghost"]["reason"] == "unavailable"
    assert "no_such_model" in body["missing"]["ghost"]["message"]
    assert body["prediction"]["label"] in CLASS_NAMES

    full = with_missing.post("/predict", json=ROW).json()
    assert full["ghost"]["prediction"] is None and full["ghost"]["error"]["reason"] == "unavailable"
    assert all(len(full[n]["prediction"]) == 2 for n in CLASS_NAMES)


def test_missing_model_under_all_or_nothing_is_503_naming_it(with_missing: httpx.Client) -> None:
    for kwargs in (
        {"params": {"policy": "all_or_nothing"}},
        {"headers": {"X-Timeout-Policy": "all_or_nothing"}},
    ):
        response = with_missing.post("/predict/label", json=ROW, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 503
        error = response.json()["error"]
        assert "ghost" in error["message"] and error["services"]["ghost"]["reason"] == "unavailable"


def test_health_all_is_degraded_not_500(with_missing: httpx.Client) -> None:
    response = with_missing.get("/health/all")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["services"]["ghost"]["ready"] is False
    assert all(body["services"][n]["ready"] for n in CLASS_NAMES)
    meta = with_missing.get("/metadata").json()
    assert meta["services"]["ghost"]["available"] is False


def test_unloaded_model_leaves_and_rejoins_without_restart(
    explicit_triton: TritonServer, protocol: str
) -> None:
    import tritonclient.http as triton_http

    control = triton_http.InferenceServerClient(explicit_triton.http_url)
    with _proxy(explicit_triton, protocol, IRIS) as url, httpx.Client(base_url=url, timeout=10) as client:
        whole = client.post("/predict/label", json=ROW)
        assert whole.status_code == 200 and list(whole.json()) == ["prediction"]
        control.unload_model("versicolor")
        try:
            body = client.post("/predict/label", json=ROW).json()
            assert body["partial"] is True and list(body["missing"]) == ["versicolor"]
            strict = client.post("/predict/label", json=ROW, params={"policy": "all_or_nothing"})
            assert strict.status_code == 503 and "versicolor" in strict.json()["error"]["message"]
        finally:
            control.load_model("versicolor")
            control.close()
        # Rejoined: the whole answer again (no partial, no missing), the same label as before.
        back = client.post("/predict/label", json=ROW)
        assert back.status_code == 200 and back.json() == whole.json()
        answers = client.post("/predict", json=ROW).json()
        assert all(answers[n]["prediction"] is not None and "error" not in answers[n] for n in CLASS_NAMES)


def test_slow_service_partial_answers_within_the_deadline(
    explicit_triton: TritonServer, protocol: str
) -> None:
    # `very_slow` sleeps 3 s and would win every label with P = 0.99 if it were waited for.
    models = {"setosa": "setosa", "versicolor": "versicolor", "very_slow": "very_slow"}
    with (
        _proxy(explicit_triton, protocol, models, deadline_ms=200) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        started = time.perf_counter()
        response = client.post("/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200
        body = response.json()
        assert body["partial"] is True and body["missing"]["very_slow"]["reason"] == "timeout"
        assert body["prediction"]["label"] == "setosa"
        assert elapsed < 1.5, elapsed  # the 200 ms deadline, not very_slow's 3 s

        started = time.perf_counter()
        strict = client.post("/predict/label", json=ROW, params={"policy": "all_or_nothing"})
        elapsed = time.perf_counter() - started
        assert strict.status_code == 504
        assert strict.json()["error"]["services"]["very_slow"]["reason"] == "timeout"
        assert elapsed < 1.5, elapsed

        # A longer deadline, asked for by the request, is capped at PROXY_DEADLINE_MS.
        capped = client.post("/predict/label", json=ROW, params={"deadline_ms": 5000})
        assert capped.json()["missing"]["very_slow"]["reason"] == "timeout"


def test_per_service_timeout_and_per_request_deadline(explicit_triton: TritonServer, protocol: str) -> None:
    models = {"setosa": "setosa", "very_slow": "very_slow"}
    with (
        _proxy(explicit_triton, protocol, models, service_timeout_ms=150, deadline_ms=5000) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        started = time.perf_counter()
        body = client.post("/predict/label", json=ROW).json()
        assert time.perf_counter() - started < 1.5  # the 150 ms service timeout, not the 5 s deadline
        assert body["missing"]["very_slow"]["reason"] == "timeout"
        assert body["prediction"]["label"] == "setosa"
    with (
        _proxy(explicit_triton, protocol, models, service_timeout_ms=5000, deadline_ms=5000) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        # A request may ask for a shorter deadline than the service timeout: very_slow is cut off
        # at 200 ms, where the settings alone would have waited its 3 s.
        started = time.perf_counter()
        response = client.post("/predict/label", json=ROW, headers={"X-Deadline-Ms": "200"})
        assert time.perf_counter() - started < 1.5
        assert response.status_code == 200, response.text
        assert response.json()["missing"]["very_slow"]["reason"] == "timeout"


def test_slow_service_is_waited_for_when_the_deadline_allows(
    explicit_triton: TritonServer, protocol: str
) -> None:
    models = {"setosa": "setosa", "slow": "slow"}
    with _proxy(explicit_triton, protocol, models) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = client.post("/predict/label", json=ROW).json()
        assert "partial" not in body and body["prediction"]["label"] == "slow"


def test_a_request_whose_coalesced_batch_is_late_times_out_alone(explicit_triton: TritonServer) -> None:
    import asyncio

    models = {"setosa": "setosa", "slow": "slow"}  # slow: 400 ms a call
    proxy_settings = settings(deadline_ms=5000, service_timeout_ms=5000, in_flight_per_service=1)
    with running_proxy(proxy_settings, services_on(explicit_triton, "grpc", models)) as url:

        async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                first = asyncio.create_task(client.post("/predict/label", json=ROW))
                await asyncio.sleep(0.1)  # `first` holds slow's one call on the wire
                # These two wait, and then share slow's next call (400-800 ms): too late for one.
                patient = asyncio.create_task(client.post("/predict/label", json=ROW))
                hurried = asyncio.create_task(
                    client.post("/predict/label", json=ROW, headers={"X-Deadline-Ms": "300"})
                )
                return await first, await patient, await hurried

        first, patient, hurried = asyncio.run(main())
    assert hurried.status_code == 200 and hurried.json()["missing"]["slow"]["reason"] == "timeout"
    for response in (first, patient):  # the batch went on for the others, who get slow's answer
        assert response.status_code == 200 and "missing" not in response.json()
        assert response.json()["prediction"]["label"] == "slow"


def test_the_request_id_reaches_triton(explicit_triton: TritonServer, protocol: str) -> None:
    with _proxy(explicit_triton, protocol, {"setosa": "setosa", "failing": "failing"}) as url:
        body = httpx.post(f"{url}/predict/label", json=ROW, headers={"X-Request-ID": "trace-me-42"}).json()
    # The test model's error quotes the id Triton handed it.
    assert "request id 'trace-me-42'" in body["missing"]["failing"]["message"]


def test_failing_service_is_reported_with_its_reason(explicit_triton: TritonServer, protocol: str) -> None:
    models = {**IRIS, "failing": "failing"}
    with _proxy(explicit_triton, protocol, models) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = client.post("/predict/label", json=ROW).json()
        assert body["missing"]["failing"]["reason"] == "error"
        assert "always fails" in body["missing"]["failing"]["message"]
        strict = client.post("/predict/label", json=ROW, params={"policy": "all_or_nothing"})
        assert strict.status_code == 503 and "failing" in strict.json()["error"]["message"]


def _stream(client: httpx.Client, **kwargs: object) -> list[dict]:  # type: ignore[type-arg]
    with client.stream("POST", "/predict/stream", json=ROW, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200
        return [httpx.Response(200, content=line).json() for line in response.iter_lines() if line]


def test_stream_arrives_in_completion_order(explicit_triton: TritonServer, protocol: str) -> None:
    models = {"setosa": "setosa", "slow": "slow", "versicolor": "versicolor", "virginica": "virginica"}
    with _proxy(explicit_triton, protocol, models) as url, httpx.Client(base_url=url, timeout=10) as client:
        lines = _stream(client)
        assert [line.get("service") for line in lines][-2] == "slow"
        assert sorted(line["service"] for line in lines[:-1]) == sorted(models)
        assert lines[-2]["latency_ms"] >= 400 > max(line["latency_ms"] for line in lines[:-2])
        final = lines[-1]
        p_class = {line["service"]: line["prediction"][0] for line in lines[:-1]}
        best = max(models, key=lambda name: p_class[name])  # first on ties, in the services' order
        assert final["final"] is True and final["prediction"]["label"] == best
        assert final["prediction"]["proba"] == pytest.approx(p_class[best])

        late = _stream(client, params={"deadline_ms": 200})
        slow_line = next(line for line in late if line.get("service") == "slow")
        assert slow_line["error"]["reason"] == "timeout"
        assert late[-1]["partial"] is True and list(late[-1]["missing"]) == ["slow"]
        assert late[-1]["prediction"]["label"] != "slow"


def test_stream_first_line_is_not_held_back_by_the_slow_service(
    explicit_triton: TritonServer, protocol: str
) -> None:
    models = {"very_slow": "very_slow", "setosa": "setosa"}
    with (
        _proxy(explicit_triton, protocol, models, deadline_ms=5000, service_timeout_ms=5000) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        started = time.perf_counter()
        with client.stream("POST", "/predict/stream", json=ROW) as response:
            lines = response.iter_lines()
            first = httpx.Response(200, content=next(line for line in lines if line)).json()
            first_at = time.perf_counter() - started
            assert first["service"] == "setosa" and len(first["prediction"]) == 2
            assert first_at < 1.5, first_at  # very_slow answers after 3 s
            rest = [httpx.Response(200, content=line).json() for line in lines if line]
        assert rest[0]["service"] == "very_slow" and "error" not in rest[0]
        assert rest[-1]["final"] is True and rest[-1]["prediction"]["label"] == "very_slow"


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_triton_down_gives_503_within_the_deadline_and_recovery_needs_no_restart(
    proto: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    server = TritonServer(
        model_repository=iris_repository(tmp_path), http_port=0, grpc_port=0, metrics_port=0
    )
    server.start()
    try:
        with (
            _proxy(server, proto, IRIS, deadline_ms=1000) as url,
            httpx.Client(base_url=url, timeout=10) as client,
        ):
            assert client.post("/predict/label", json=ROW).status_code == 200
            server.stop()
            for policy in ("partial", "all_or_nothing"):
                started = time.perf_counter()
                response = client.post("/predict/label", json=ROW, params={"policy": policy})
                elapsed = time.perf_counter() - started
                # 503 (not the deadline's 504) says the proxy saw Triton gone rather than waiting;
                # the bound only catches a request left hanging, far from both (1 s, 10 s).
                assert response.status_code == 503, response.text
                assert elapsed < 4.0, elapsed
                message = response.json()["error"]["message"]
                assert re.search(r"unavailable|unreachable", message), message
                assert "Traceback" not in response.text
            assert client.get("/health/all").json()["status"] == "degraded"

            server.start()  # the same ports again
            deadline = time.monotonic() + 15
            while client.post("/predict/label", json=ROW).status_code != 200:
                assert time.monotonic() < deadline, "the proxy did not recover within 15 s"
                time.sleep(0.2)
            assert client.get("/health/all").json()["status"] == "ok"
    finally:
        server.stop()


def test_metrics_count_what_happened(explicit_triton: TritonServer) -> None:
    models = {"setosa": "setosa", "slow": "slow", "ghost": "no_such_model"}
    with (
        _proxy(explicit_triton, "grpc", models, deadline_ms=200) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        for _ in range(3):
            assert client.post("/predict/label", json=ROW).status_code == 200
        assert client.post("/predict", json=ROW).status_code == 200
        assert client.post("/predict/label", json={"data": []}).status_code == 422
        assert client.post("/predict/label", json=ROW, params={"policy": "all_or_nothing"}).status_code in (
            503,
            504,
        )
        text = client.get("/metrics").text

    assert (
        metric(text, "proxy_http_requests_total", endpoint="/predict/label", method="POST", status="200") == 3
    )
    assert metric(text, "proxy_http_requests_total", endpoint="/predict", method="POST", status="200") == 1
    assert (
        metric(text, "proxy_http_requests_total", endpoint="/predict/label", method="POST", status="422") == 1
    )
    assert metric(text, "proxy_http_request_duration_seconds_count", endpoint="/predict/label") == 5
    assert metric(text, "proxy_partial_answers_total", endpoint="/predict/label") == 3
    assert metric(text, "proxy_partial_answers_total", endpoint="/predict") == 1
    # Five fanned-out requests; the all_or_nothing one fails fast on `ghost` and cancels the rest.
    for service in models:
        total = sum(
            metric(text, "proxy_service_calls_total", service=service, outcome=o)
            for o in ("ok", "timeout", "unavailable", "error", "cancelled")
        )
        assert total == 5, service
    assert metric(text, "proxy_service_calls_total", service="ghost", outcome="unavailable") == 5
    assert metric(text, "proxy_service_calls_total", service="slow", outcome="cancelled") == 1
    assert metric(text, "proxy_service_calls_total", service="setosa", outcome="ok") >= 4
    assert metric(text, "proxy_service_calls_total", service="ghost", outcome="unavailable") >= 4
    assert metric(text, "proxy_service_calls_total", service="slow", outcome="timeout") >= 4
    # The counters that repeated proxy_service_calls_total{outcome} are gone.
    assert "proxy_upstream_errors_total" not in text and "proxy_service_timeouts_total" not in text
    # Readiness as /health/ready sees it, measured at the scrape: ghost's model does not exist.
    assert metric(text, "proxy_service_ready", service="setosa") == 1
    assert metric(text, "proxy_service_ready", service="ghost") == 0
    assert re.search(r"^proxy_ready 1\.0$", text, re.M)
    # The proxy's own process (unlabelled series).
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        assert found and float(found.group(1)) > 0, name
    assert metric(text, "proxy_service_call_duration_seconds_count", service="setosa") >= 4
