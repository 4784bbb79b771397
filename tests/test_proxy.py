"""The proxy against the real embedded Triton: the seed's API, batches, bad input, concurrency."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from local_triton import TritonServer, free_ports
from training import CLASS_NAMES

from .conftest import MODEL_REPOSITORY
from .helpers import metric, running_proxy, services_on, settings, triton_stats

SEED_ROW = [[1.0, 2.0, 3.0, 4.0]]
SAMPLE_ROW = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture(scope="module", params=["grpc", "http"])
def proxy(request: pytest.FixtureRequest, triton: TritonServer) -> Iterator[str]:
    with running_proxy(settings(protocol=request.param), services_on(triton, request.param)) as url:
        yield url


@pytest.fixture
def client(proxy: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy, timeout=10) as c:
        yield c


def direct(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each model's probabilities, from onnxruntime on the ONNX files (no Triton, no proxy)."""
    out = {}
    for name in CLASS_NAMES:
        session = ort.InferenceSession(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
        out[name] = session.run(None, {"input": np.asarray(x, dtype=np.float32)})[0]
    return out


def expected_labels(x: np.ndarray) -> tuple[list[str], np.ndarray]:
    probabilities = direct(x)
    p_class = np.stack([probabilities[n][:, 0] for n in CLASS_NAMES], axis=1)
    return [CLASS_NAMES[i] for i in p_class.argmax(axis=1)], p_class.max(axis=1)


def test_seed_predict_shape_and_values(client: httpx.Client) -> None:
    response = client.post("/predict", json={"data": SEED_ROW})
    assert response.status_code == 200
    body = response.json()
    assert list(body) == list(CLASS_NAMES)
    expected = direct(np.array(SEED_ROW))
    for name in CLASS_NAMES:
        assert list(body[name]) == ["prediction"]
        assert len(body[name]["prediction"]) == 2
        np.testing.assert_allclose(body[name]["prediction"], expected[name][0], atol=1e-6, rtol=0)


def test_seed_predict_label_shape_and_values(client: httpx.Client) -> None:
    response = client.post("/predict/label", json={"data": SEED_ROW})
    assert response.status_code == 200
    body = response.json()
    labels, proba = expected_labels(np.array(SEED_ROW))
    assert body == {"prediction": {"proba": pytest.approx(float(proba[0]), abs=1e-6), "label": labels[0]}}


def test_seed_test_endpoints_use_the_sample_row(client: httpx.Client) -> None:
    expected = direct(np.array(SAMPLE_ROW))
    for response in (client.get("/predict/get/test"), client.post("/predict/post/test")):
        assert response.status_code == 200
        body = response.json()
        for name in CLASS_NAMES:
            np.testing.assert_allclose(body[name]["prediction"], expected[name][0], atol=1e-6, rtol=0)


def test_all_150_rows_batched_and_row_by_row(
    client: httpx.Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = iris
    labels, proba = expected_labels(x)
    batched = client.post("/predict/label", json={"data": x.tolist()})
    assert batched.status_code == 200
    rows = batched.json()["prediction"]
    assert [r["label"] for r in rows] == labels
    np.testing.assert_allclose([r["proba"] for r in rows], proba, atol=1e-6, rtol=0)

    one_by_one = [
        client.post("/predict/label", json={"data": [row]}).json()["prediction"]["label"]
        for row in x.tolist()
    ]
    assert one_by_one == labels

    report = (MODEL_REPOSITORY / "TRAINING.md").read_text()
    reported = float(re.search(r"all_rows_label_accuracy: ([\d.]+)", report)[1])  # type: ignore[index]
    accuracy = np.mean([CLASS_NAMES.index(label) == t for label, t in zip(labels, y, strict=True)])
    assert round(float(accuracy), 4) == reported


def test_batched_predict_is_one_list_of_pairs_per_service(
    client: httpx.Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    body = client.post("/predict", json={"data": x[:7].tolist()}).json()
    expected = direct(x[:7])
    for name in CLASS_NAMES:
        assert np.array(body[name]["prediction"]).shape == (7, 2)
        np.testing.assert_allclose(body[name]["prediction"], expected[name], atol=1e-6, rtol=0)


def test_stream_lines_then_final_label(client: httpx.Client) -> None:
    with client.stream("POST", "/predict/stream", json={"data": SEED_ROW}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [httpx.Response(200, content=line).json() for line in response.iter_lines() if line]
    assert sorted(line["service"] for line in lines[:-1]) == sorted(CLASS_NAMES)
    labels, _ = expected_labels(np.array(SEED_ROW))
    assert lines[-1]["final"] is True
    assert lines[-1]["prediction"]["label"] == labels[0]
    assert "partial" not in lines[-1]


def test_health_endpoints(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"health": "ok"}
    everything = client.get("/health/all").json()
    assert everything["status"] == "ok"
    assert {n: s["ready"] for n, s in everything["services"].items()} == dict.fromkeys(CLASS_NAMES, True)


def test_metadata_comes_from_triton(client: httpx.Client) -> None:
    body = client.get("/metadata").json()
    assert body["data_structure"] == "(N,4)"
    assert set(body["services"]) == set(CLASS_NAMES)
    for entry in body["services"].values():
        assert entry["available"] is True
        assert entry["max_batch_size"] == 1024
        assert entry["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert entry["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]


def test_request_id_is_honoured_or_made(client: httpx.Client) -> None:
    given = client.post("/predict/label", json={"data": SEED_ROW}, headers={"X-Request-ID": "req-42.a:b"})
    assert given.headers["x-request-id"] == "req-42.a:b"
    made = client.post("/predict/label", json={"data": SEED_ROW})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    for junk in ("x" * 500, "has space", "new\tline"):
        replaced = client.post("/predict/label", json={"data": SEED_ROW}, headers={"X-Request-ID": junk})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])


BAD_INPUTS = [
    ("not json", b"{data: oops", {}, 400, "not valid JSON"),
    ("NaN", b'{"data": [[1, 2, 3, NaN]]}', {}, 400, "not valid JSON"),
    ("infinity", b'{"data": [[1, 2, 3, 1e400]]}', {}, 400, "infinity"),
    (
        "beyond the range",
        b'{"data": [[1, 2, 3, 1e39]]}',
        {},
        422,
        "data.0.3: Input should be less than or equal to 1",
    ),
    (
        "negative far",
        b'{"data": [[-2e6, 2, 3, 4]]}',
        {},
        422,
        "data.0.0: Input should be greater than or equal to -1",
    ),
    ("string", b'{"data": [[1, 2, 3, "4"]]}', {}, 422, "data.0.3"),
    ("bool", b'{"data": [[1, 2, 3, true]]}', {}, 422, "data.0.3"),
    ("null", b'{"data": [[1, 2, 3, null]]}', {}, 422, "data.0.3"),
    # The width is the models' contracts', named by the service that refuses it.
    (
        "short row",
        b'{"data": [[1, 2, 3]]}',
        {},
        422,
        "expects input 'input' FP32 [N, 4], got rows of shape [1, 3]",
    ),
    ("long row", b'{"data": [[1, 2, 3, 4, 5]]}', {}, 422, "got rows of shape [1, 5]"),
    ("ragged", b'{"data": [[1, 2, 3, 4], [1, 2]]}', {}, 422, "rows of different widths [2, 4]"),
    ("flat", b'{"data": [1, 2, 3, 4]}', {}, 422, "data.0"),
    ("empty data", b'{"data": []}', {}, 422, "data"),
    ("no data", b'{"rows": [[1, 2, 3, 4]]}', {}, 422, "data"),
    ("not an object", b"[[1, 2, 3, 4]]", {}, 422, "JSON object"),
    ("empty body", b"", {}, 422, "empty body"),
    ("too many rows", b'{"data": [' + b",".join([b"[1,2,3,4]"] * 1025) + b"]}", {}, 422, "1024"),
    ("wrong content type", b'{"data": [[1, 2, 3, 4]]}', {"Content-Type": "text/plain"}, 415, "text/plain"),
    ("gzip", b'{"data": [[1, 2, 3, 4]]}', {"Content-Encoding": "gzip"}, 415, "gzip"),
    ("too large", b'{"data": [[1, 2, 3, 4]]}' + b" " * 1_100_000, {}, 413, "limit"),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "text"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_a_4xx_naming_the_problem(
    client: httpx.Client, case: str, body: bytes, headers: dict[str, str], status: int, text: str
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    for path in ("/predict", "/predict/label", "/predict/stream"):
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert text in error["message"], error
        assert error["request_id"] == response.headers["x-request-id"]
    assert client.post("/predict/label", json={"data": SEED_ROW}).status_code == 200


def test_bad_query_parameters_are_422(client: httpx.Client) -> None:
    response = client.post("/predict/label?policy=sometimes", json={"data": SEED_ROW})
    assert response.status_code == 422
    assert "policy" in response.json()["error"]["message"]
    response = client.post("/predict/label?deadline_ms=-5", json={"data": SEED_ROW})
    assert response.status_code == 422


def test_unknown_path_is_a_json_404(client: httpx.Client) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_500_concurrent_requests_all_answered_correctly(
    proxy: str, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    labels, _ = expected_labels(x)

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=proxy, timeout=30, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/predict/label", json={"data": [x[i % 150].tolist()]}) for i in range(500))
            )

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 500
    assert [r.json()["prediction"]["label"] for r in responses] == [labels[i % 150] for i in range(500)]


def test_openapi_documents_the_routes(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/predict",
        "/predict/label",
        "/predict/stream",
        "/health",
        "/health/all",
        "/metadata",
        "/metrics",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/predict/label"]["post"]["requestBody"]["content"]["application/json"]
    assert body["examples"]["seed"]["value"] == {"data": SEED_ROW}
    # Rows by key are documented beside rows in the body.
    assert body["examples"]["by_key"]["value"] == {"keys": ["flower-17", "flower-120"]}
    assert [s["required"] for s in body["schema"]["oneOf"]] == [["data"], ["keys"]]
    assert "404" in spec["paths"]["/predict/label"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def _concurrent_labels(url: str, x: np.ndarray) -> list[str]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/predict/label", json={"data": [x[i].tolist()]}) for i in range(len(x)))
            )

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(x)
    return [r.json()["prediction"]["label"] for r in responses]


def test_without_coalescing_every_request_is_its_own_call(
    triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    labels, _ = expected_labels(x)
    with running_proxy(settings(coalesce=False), services_on(triton, "grpc")) as url:
        before = triton_stats(triton)
        assert _concurrent_labels(url, x) == labels
        after = triton_stats(triton)
    # Counted by Triton itself: one inference request per proxy request and model.
    assert {n: after[n] - before[n] for n in CLASS_NAMES} == dict.fromkeys(CLASS_NAMES, 150)


def test_coalescing_batches_concurrent_requests_into_fewer_triton_calls(
    triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    labels, _ = expected_labels(x)
    with running_proxy(settings(coalesce=True, in_flight_per_service=1), services_on(triton, "grpc")) as url:
        before, rows_before = triton_stats(triton), triton_stats(triton, what="rows")
        assert _concurrent_labels(url, x) == labels  # each request still gets its own row's answer
        after, rows_after = triton_stats(triton), triton_stats(triton, what="rows")
        text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in CLASS_NAMES:
        assert rows_after[name] - rows_before[name] == 150, name  # every row reached Triton once
        # 150 requests at once, one call on the wire per service: the rest wait and share calls.
        assert after[name] - before[name] < 150, name
        # The proxy's batch histograms saw the same calls: one observation per Triton call, every
        # request and every row in exactly one of them.
        calls = after[name] - before[name]
        assert metric(text, "proxy_coalesced_batch_requests_count", service=name) == calls, name
        assert metric(text, "proxy_coalesced_batch_requests_sum", service=name) == 150, name
        assert metric(text, "proxy_coalesced_batch_rows_sum", service=name) == 150, name
        assert metric(text, "proxy_coalesced_batch_rows_bucket", service=name, le="1.0") < calls, name


def test_json_logs_are_one_object_per_line_from_the_proxy_and_uvicorn(triton: TritonServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``PROXY_LOG_FORMAT=json``: every line the proxy process writes (its request lines, uvicorn's
    start and stop) is a JSON object with time, level, logger and message; the request line
    carries the request id, the route and each service's outcome as fields."""
    log_path = tmp_path / "proxy.log"
    with (
        open(log_path, "w") as log,
        running_proxy(
            settings(log_format="json", log_level="INFO"), services_on(triton, "grpc"), log=log
        ) as url,
    ):
        response = httpx.post(
            f"{url}/predict/label",
            json={"data": [[1.0, 2.0, 3.0, 4.0]]},
            headers={"X-Request-ID": "json-log-1"},
        )
        assert response.status_code == 200
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses, or this fails
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert "color_message" not in record  # uvicorn's coloured copy of the message
    assert any(r["logger"].startswith("uvicorn") and "startup complete" in r["message"] for r in records)
    (request,) = [r for r in records if r.get("request_id") == "json-log-1"]
    assert request["endpoint"] == "/predict/label" and request["level"] == "INFO"
    assert {name: s["outcome"] for name, s in request["services"].items()} == dict.fromkeys(CLASS_NAMES, "ok")
    assert all(s["latency_ms"] >= 0 for s in request["services"].values())


def test_several_workers_serve_with_metrics_off(triton: TritonServer) -> None:
    """``PROXY_WORKERS=2`` with ``PROXY_METRICS=false``: the workers answer over HTTP and share the
    gRPC door's port (each starts its own door), and /metrics is a 404 naming the setting rather
    than one worker's figures."""
    (door,) = free_ports(1)
    two = settings(workers=2, metrics=False, grpc_port=door)
    with running_proxy(two, services_on(triton, "grpc")) as url:
        # A request id begins with its process's own random prefix: both workers must answer.
        workers = set()
        for _ in range(200):
            response = httpx.post(f"{url}/predict/label", json={"data": SAMPLE_ROW}, timeout=10)
            assert response.status_code == 200 and response.json()["prediction"]["label"] == "setosa"
            workers.add(response.headers["x-request-id"][:16])
            if len(workers) == 2:
                break
        assert len(workers) == 2, "one worker answered 200 new connections alone"
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{door}")
        tensor = grpcclient.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array(SAMPLE_ROW, dtype=np.float32))
        for _ in range(10):
            assert client.infer("iris_fanout", [tensor]).as_numpy("class_name") is not None
        client.close()
        off = httpx.get(f"{url}/metrics", timeout=10)
        assert off.status_code == 404
        assert off.json()["error"]["message"] == "/metrics is off (PROXY_METRICS=false)"
