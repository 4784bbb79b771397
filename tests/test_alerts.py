"""Rules and alerts end to end: the real proxy process on the real Triton, posting to a real
webhook receiver. Alerts arrive for the rows that meet a rule and only those; a receiver that
is down, slow or failing costs the requests nothing and shows in the metrics."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.webhook_receiver import WebhookReceiver, webhook_receiver
from local_triton import TritonServer, free_ports

from .conftest import MODEL_REPOSITORY
from .helpers import metric, running_proxy, services_on, settings

SECRET = "whsec_" + base64.b64encode(b"alerts-test-secret-of-32-bytes!!").decode()
IRIS = ("setosa", "versicolor", "virginica")


def _iris_services(triton: TritonServer) -> str:
    return "".join(f"      {n}: {{target: 'grpc://{triton.grpc_url}/{n}'}}\n" for n in IRIS)


def _compositions(triton: TritonServer, hooks: dict[str, str]) -> str:
    """``iris`` with two rules (one posting to ``hooks['iris']``), and one composition per other
    hook, each with one rule on every row."""
    text = (
        "compositions:\n  iris:\n    services:\n" + _iris_services(triton) + "    aggregator: one_vs_rest\n"
        "    rules:\n"
        "      - name: virginica_sure\n        when: virginica >= 0.9\n        severity: critical\n"
        f"        webhook: {hooks['iris']}\n"
        "      - name: unsure\n        when: proba < 0.6\n"
    )
    for name, url in hooks.items():
        if name != "iris":
            text += (
                f"  {name}:\n    services:\n" + _iris_services(triton) + "    aggregator: one_vs_rest\n"
                f"    rules:\n      - {{name: every_row, when: 'max >= 0', webhook: '{url}'}}\n"
            )
    return text


PIPELINES = """
pipelines:
  cascade:
    steps:
      - {name: setosa, services: [setosa], stop_if: "setosa >= 0.9"}
      - {name: others, services: [versicolor, virginica]}
    rules:
      - {name: late_virginica, when: "label == virginica and proba >= 0.9", webhook: "HOOK"}
"""


def _onnxruntime(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each Iris model's ``[P(class), P(other)]``, computed here, apart from Triton and the proxy."""
    import onnxruntime as ort

    found = {}
    for name in IRIS:
        session = ort.InferenceSession(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
        found[name] = session.run(["probabilities"], {"input": x})[0]
    return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver(secret=SECRET) as found:
        yield found


@pytest.fixture(scope="module")
def alerting(
    triton: TritonServer, receiver: WebhookReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    folder = tmp_path_factory.mktemp("alerts")
    compositions, pipelines = folder / "compositions.yaml", folder / "pipelines.yaml"
    compositions.write_text(_compositions(triton, {"iris": receiver.url}))
    pipelines.write_text(PIPELINES.replace("HOOK", receiver.url))
    (grpc_port,) = free_ports(1)
    with running_proxy(
        settings(
            compositions_file=compositions,
            pipelines_file=pipelines,
            webhook_secret=SECRET,
            grpc_port=grpc_port,
        ),
        services_on(triton, "grpc"),
    ) as url:
        yield url, grpc_port


def _posts_for(receiver: WebhookReceiver, request_id: str, count: int = 1) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [p for p in receiver.received if p.payload["request_id"] == request_id]
        if len(found) >= count:
            time.sleep(0.2)  # and no more than that
            return [p.payload for p in receiver.received if p.payload["request_id"] == request_id]
        time.sleep(0.02)
    return [p.payload for p in receiver.received if p.payload["request_id"] == request_id]


def test_alerts_reach_the_webhook_for_the_rows_that_meet_the_rule_and_only_those(
    alerting: tuple[str, int], receiver: WebhookReceiver, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    url, _ = alerting
    x, _ = iris
    expected = _onnxruntime(x)
    virginica = expected["virginica"][:, 0]
    # The rule's threshold is not within the models' last digits of any row (else machines differ).
    assert np.min(np.abs(virginica - 0.9)) > 1e-4
    sure = np.flatnonzero(virginica >= 0.9).tolist()
    best = np.stack([expected[n][:, 0] for n in IRIS], axis=1).max(axis=1)
    unsure = np.flatnonzero(best < 0.6).tolist()
    assert sure and unsure and len(sure) < len(x)

    with httpx.Client(base_url=url) as client:
        before = _drained(client)  # what earlier tests' alerts left in the counters, settled
    response = httpx.post(
        f"{url}/compositions/iris/label",
        json={"data": x.tolist()},
        headers={"X-Request-ID": "alerts-all-rows"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["alerts"] == [
        {"rule": "virginica_sure", "severity": "critical", "rows": sure},
        {"rule": "unsure", "severity": "warning", "rows": unsure},
    ]
    (post,) = _posts_for(receiver, "alerts-all-rows")  # 'unsure' has no webhook
    assert post["rule"] == "virginica_sure" and post["source"] == "composition/iris"
    assert post["severity"] == "critical" and post["when"] == "virginica >= 0.9"
    assert [r["row"] for r in post["rows"]] == sure
    for row in post["rows"]:
        assert row["label"] == "virginica"
        assert abs(row["services"]["virginica"] - virginica[row["row"]]) < 1e-5
    signed = [p.signed for p in receiver.received if p.payload["request_id"] == "alerts-all-rows"]
    assert signed == [True]

    with httpx.Client(base_url=url) as client:
        metrics = _drained(client)
    assert metric(metrics, "proxy_alerts_total", source="composition/iris", rule="virginica_sure") - metric(
        before, "proxy_alerts_total", source="composition/iris", rule="virginica_sure"
    ) == len(sure)
    delivered = {"rule": "virginica_sure", "outcome": "delivered"}
    assert (
        metric(metrics, "proxy_webhook_deliveries_total", **delivered)
        - metric(before, "proxy_webhook_deliveries_total", **delivered)
        == 1
    )  # one post for the request, its rows in it


def test_rows_that_meet_no_rule_raise_nothing(
    alerting: tuple[str, int], receiver: WebhookReceiver, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    url, _ = alerting
    x, y = iris
    setosa = x[y == 0][:5]
    response = httpx.post(
        f"{url}/compositions/iris/label",
        json={"data": setosa.tolist()},
        headers={"X-Request-ID": "alerts-none"},
    )
    assert response.status_code == 200 and "alerts" not in response.json()
    assert _posts_for(receiver, "alerts-none") == []


def test_the_open_inference_protocol_names_the_alerts_in_its_parameters(
    alerting: tuple[str, int], receiver: WebhookReceiver, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    url, grpc_port = alerting
    x, y = iris
    rows = np.concatenate([x[y == 0][:1], x[y == 2][:1]])  # a setosa, then a virginica
    assert _onnxruntime(rows)["virginica"][1, 0] >= 0.9
    body = {"id": "v2-alerts", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                           "data": rows.flatten().tolist()}]}  # fmt: skip
    answer = httpx.post(
        f"{url}/v2/models/iris/infer", json=body, headers={"X-Request-ID": "alerts-v2"}
    ).json()
    assert answer["parameters"]["alerts"] == "virginica_sure"
    assert answer["parameters"]["alert.virginica_sure"] == "1"
    assert [r["row"] for r in _posts_for(receiver, "alerts-v2")[0]["rows"]] == [1]

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("input", [2, 4], "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    result = client.infer("iris", [tensor], request_id="alerts-grpc")  # the protocol's id
    parameters = result.get_response().parameters
    assert parameters["alerts"].string_param == "virginica_sure"
    assert parameters["alert.virginica_sure"].string_param == "1"
    assert len(_posts_for(receiver, "alerts-grpc")) == 1
    client.close()


def test_a_pipelines_rule_reads_its_final_answer_and_the_stream_its_last_line(
    alerting: tuple[str, int], receiver: WebhookReceiver, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    url, _ = alerting
    x, y = iris
    rows = np.concatenate([x[y == 0][:2], x[y == 2][:2]])
    expected = [i for i, v in enumerate(_onnxruntime(rows)["virginica"][:, 0]) if v >= 0.9]
    assert expected == [2, 3]
    body = httpx.post(
        f"{url}/pipelines/cascade", json={"data": rows.tolist()}, headers={"X-Request-ID": "alerts-p"}
    ).json()
    assert body["alerts"] == [{"rule": "late_virginica", "severity": "warning", "rows": expected}]
    (post,) = _posts_for(receiver, "alerts-p")
    assert post["source"] == "pipeline/cascade" and [r["row"] for r in post["rows"]] == expected
    # Those rows went through both steps: every service's score is in the alert.
    assert all(None not in r["services"].values() for r in post["rows"])

    with httpx.stream(
        "POST",
        f"{url}/compositions/iris/stream",
        json={"data": rows.tolist()},
        headers={"X-Request-ID": "alerts-stream"},
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["final"] and lines[-1]["alerts"][0]["rows"] == expected
    assert len(_posts_for(receiver, "alerts-stream")) == 1


@pytest.fixture(scope="module")
def troubled_receivers() -> Iterator[dict[str, WebhookReceiver | None]]:
    with webhook_receiver(delay_s=5.0) as slow, webhook_receiver(status=500) as failing:
        yield {"down": None, "slow": slow, "failing": failing}


def test_a_receiver_that_is_down_slow_or_failing_costs_the_requests_nothing(
    triton: TritonServer,
    troubled_receivers: dict[str, WebhookReceiver | None],
    tmp_path: Path,
    iris: tuple[np.ndarray, np.ndarray],
) -> None:
    (closed_port,) = free_ports(1)
    hooks = {
        "iris": f"http://127.0.0.1:{closed_port}/alerts",
        "down": f"http://127.0.0.1:{closed_port}/alerts",
        "slow": troubled_receivers["slow"].url,  # type: ignore[union-attr]
        "failing": troubled_receivers["failing"].url,  # type: ignore[union-attr]
    }
    path = tmp_path / "compositions.yaml"
    path.write_text(_compositions(triton, hooks))
    x, _ = iris
    requests = 20
    proxy_settings = settings(
        compositions_file=path,
        webhook_secret=SECRET,
        webhook_timeout_ms=300,
        webhook_retries=2,
        webhook_backoff_ms=20,
        webhook_queue=5,
    )
    expected = {"down": "connection_error", "slow": "timeout", "failing": "5xx"}
    with (
        running_proxy(proxy_settings, services_on(triton, "grpc")) as url,
        httpx.Client(base_url=url) as client,
    ):
        text = client.get("/metrics").text
        for name, result in expected.items():
            before = text
            for i in range(requests):
                # The slow receiver sits 5 s on each post, past the 2-s deadline: a request that
                # waited for its webhook would be a 504.
                response = client.post(f"/compositions/{name}/label", json={"data": x[i : i + 1].tolist()})
                assert response.status_code == 200, (name, response.text)
                assert response.json()["alerts"][0]["rule"] == "every_row"
            # One receiver at a time: the queue is the proxy's, shared by every webhook.
            text = _drained(client)
            # Each delivery that failed here was tried 1 + webhook_retries times, each time with
            # this receiver's result.
            failed_here = metric(
                text, "proxy_webhook_deliveries_total", rule="every_row", outcome="failed"
            ) - metric(before, "proxy_webhook_deliveries_total", rule="every_row", outcome="failed")
            tried = metric(text, "proxy_webhook_attempts_total", result=result) - metric(
                before, "proxy_webhook_attempts_total", result=result
            )
            assert failed_here > 0 and tried == 3 * failed_here, (name, failed_here, tried)
            assert (
                metric(text, "proxy_alerts_total", source=f"composition/{name}", rule="every_row") == requests
            )
        failed = metric(text, "proxy_webhook_deliveries_total", rule="every_row", outcome="failed")
        dropped = metric(text, "proxy_webhook_deliveries_total", rule="every_row", outcome="dropped")
        # The queue (5) is smaller than the alerts: some were dropped rather than held.
        assert dropped > 0
        assert failed + dropped == len(expected) * requests
        assert metric(text, "proxy_webhook_deliveries_total", outcome="delivered") == 0
        assert metric(text, "proxy_webhook_attempts_total", result="2xx") == 0
        assert client.get("/health/ready").status_code == 200


def _drained(client: httpx.Client, timeout: float = 20) -> str:
    """/metrics once no webhook post is waiting or being tried (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        if _gauge(text, "proxy_webhook_queued") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def _gauge(text: str, name: str) -> float:
    """An unlabelled sample's value in Prometheus text (-1 if there is none)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else -1.0


def test_alerts_queued_at_shutdown_are_posted_before_the_proxy_exits(
    triton: TritonServer, tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = iris
    with webhook_receiver(secret=SECRET, delay_s=0.5) as slow:
        path = tmp_path / "compositions.yaml"
        path.write_text(_compositions(triton, {"iris": slow.url}))
        proxy_settings = settings(compositions_file=path, webhook_secret=SECRET, webhook_workers=1)
        with running_proxy(proxy_settings, services_on(triton, "grpc")) as url:
            for i in range(5):
                answer = httpx.post(
                    f"{url}/compositions/iris/label", json={"data": x[y == 2][i : i + 1].tolist()}
                )
                assert answer.json()["alerts"][0]["rule"] == "virginica_sure"
            assert len(slow.received) < 5  # one worker, 0.5 s a post: most are still queued
        # running_proxy's exit sent SIGTERM and waited for the process: the queue was flushed.
        assert len(slow.received) == 5
        assert all(p.signed for p in slow.received)
