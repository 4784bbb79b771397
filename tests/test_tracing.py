"""OpenTelemetry tracing end to end: the real proxy and the real embedded Triton both export over
OTLP/HTTP to a receiver in the test, and one request is one trace from the client through the
proxy into each Triton model, its parent links a tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver
from local_triton import TritonServer, free_ports
from local_triton.server import trace_args

from .helpers import iris_repository, running_proxy, services_on, settings

MODELS = ("setosa", "versicolor", "virginica")
TRITON = "triton-inference-server"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
OTEL_VARIABLES = [k for k in os.environ if k.startswith("OTEL_")]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as found:
        yield found


@pytest.fixture(scope="module")
def traced_triton(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Triton started as the stack starts it when the proxy traces (``trace_args``), exporting to
    the receiver every 100 ms (its batch span processor reads OTEL_BSP_SCHEDULE_DELAY)."""
    repository = iris_repository(tmp_path_factory.mktemp("traced"))
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        server = TritonServer(
            model_repository=repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            extra_args=trace_args(f"{receiver.url}/v1/traces"),
        )
        server.start()
    finally:
        if saved is None:
            del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tracing_on(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxies this test starts trace, to the receiver, exporting every 100 ms."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


def _traceparent(trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN) -> str:
    return f"00-{trace_id}-{span_id}-01"


def _assert_tree(spans: list[ReceivedSpan], root_parent: str) -> None:
    """Every span's parent is another span of the trace, but for one root whose parent is the
    client's span: a tree, no orphans, no cycles."""
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "span ids repeat"
    roots = [s for s in spans if s.parent_span_id not in by_id]
    assert [(r.name, r.parent_span_id) for r in roots] == [(roots[0].name, root_parent)], [
        (s.service, s.name, s.parent_span_id) for s in roots
    ]
    for span in spans:
        seen, at = set(), span
        while at.parent_span_id in by_id:
            assert at.span_id not in seen, "a cycle"
            seen.add(at.span_id)
            at = by_id[at.parent_span_id]


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


#: Requests per test: Triton 2.51 misses the trace context of 4 to 10% of the requests that carry
#: one (``local_triton.server.trace_args``), so each test sends several; the proxy's spans must be
#: whole for every one, and Triton's beneath at least ``REACHED`` of the proxy's calls to it (at a
#: 10% miss rate, 60 calls fall below 80% about once in 200 runs; a proxy that did not pass the
#: context on would reach none).
REQUESTS = 20
REACHED = 0.8


def _calls_reaching_triton(receiver: Receiver, trace_ids: list[str]) -> tuple[int, int]:
    """Of the proxy's calls to Triton in these traces, how many have Triton's request span beneath
    them, and how many there are."""
    reached = calls = 0
    for trace_id in trace_ids:
        spans = receiver.trace(trace_id)
        for call in (s for s in spans if s.service == "client-proxy" and s.name.startswith("triton infer ")):
            calls += 1
            reached += any(s.service == TRITON for s in _children(spans, call))
    return reached, calls


def _wait_for_traces(receiver: Receiver, trace_ids: list[str]) -> None:
    """Until every request's span arrived and enough calls reached into Triton, then a second more
    (ten of Triton's export periods) for the others."""

    def arrived(_: list[ReceivedSpan]) -> bool:
        requests = all(any(s.parent_span_id == CLIENT_SPAN for s in receiver.trace(t)) for t in trace_ids)
        reached, _calls = _calls_reaching_triton(receiver, trace_ids)
        return requests and reached >= REACHED * len(trace_ids) * len(MODELS)

    receiver.wait_for(arrived)
    time.sleep(1.0)


def _assert_reached(receiver: Receiver, trace_ids: list[str]) -> None:
    reached, calls = _calls_reaching_triton(receiver, trace_ids)
    assert calls == len(trace_ids) * len(MODELS)
    assert reached >= REACHED * calls, f"only {reached} of {calls} calls reached into Triton's spans"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_trace_from_the_client_through_the_proxy_into_each_triton_model(
    protocol: str, traced_triton: TritonServer, receiver: Receiver, tracing_on: None
) -> None:
    prefix = "1" if protocol == "grpc" else "2"
    trace_ids = [f"{CLIENT_TRACE[:-4]}{prefix}{i:03d}" for i in range(REQUESTS)]
    with running_proxy(settings(), services_on(traced_triton, protocol)) as url:
        for i, trace_id in enumerate(trace_ids):
            response = httpx.post(
                f"{url}/predict/label",
                json={"data": [[5.1, 3.5, 1.4, 0.2]]},
                headers={"traceparent": _traceparent(trace_id), "X-Request-ID": f"traced-{protocol}-{i}"},
            )
            assert response.status_code == 200, response.text
        _wait_for_traces(receiver, trace_ids)
    _assert_reached(receiver, trace_ids)
    for i, trace_id in enumerate(trace_ids):
        spans = receiver.trace(trace_id)
        _assert_tree(spans, CLIENT_SPAN)
        (request,) = [s for s in spans if s.parent_span_id == CLIENT_SPAN]
        assert request.service == "client-proxy" and request.name == "POST /predict/label"
        assert request.attributes["proxy.request_id"] == f"traced-{protocol}-{i}"
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["proxy.policy"] == "partial"
        assert request.attributes["proxy.partial"] is False
        assert 0 < request.attributes["proxy.deadline_ms"] <= 2000

        steps = {
            s.attributes["proxy.step"]: s for s in _children(spans, request) if s.name.startswith("service ")
        }
        assert sorted(steps) == sorted(MODELS)
        for model, step in steps.items():
            assert step.attributes["proxy.outcome"] == "ok"
            (call,) = [s for s in _children(spans, step) if s.name == f"triton infer {model}"]
            assert call.attributes["proxy.replica"] in (traced_triton.grpc_url, traced_triton.http_url)
            assert call.attributes["proxy.attempt"] == 1 and call.attributes["proxy.hedge"] is False
            # Triton's own spans beneath the proxy's call: its request span, then the model's.
            beneath = _children(spans, call)
            if not beneath:
                continue  # one of the few calls whose context Triton missed (counted above)
            (triton_request,) = beneath
            assert triton_request.service == TRITON and triton_request.name == "InferRequest"
            assert model in {s.name for s in _children(spans, triton_request)}
            # The proxy's call began before Triton's request (Triton ends its span after its
            # answer has gone, so the ends are in no fixed order).
            assert call.start_ns <= triton_request.start_ns


def test_the_grpc_door_honours_the_client_trace_context(
    traced_triton: TritonServer, receiver: Receiver, tracing_on: None
) -> None:
    trace_ids = [f"{CLIENT_TRACE[:-4]}3{i:03d}" for i in range(REQUESTS)]
    (door_port,) = free_ports(1)
    with running_proxy(settings(grpc_port=door_port), services_on(traced_triton, "grpc")):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{door_port}")
        tensor = grpcclient.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[6.7, 3.0, 5.2, 2.3]], dtype=np.float32))
        for trace_id in trace_ids:
            result = client.infer("iris_fanout", [tensor], headers={"traceparent": _traceparent(trace_id)})
            assert result.as_numpy("label") is not None
        client.close()
        _wait_for_traces(receiver, trace_ids)
    _assert_reached(receiver, trace_ids)
    for trace_id in trace_ids:
        spans = receiver.trace(trace_id)
        _assert_tree(spans, CLIENT_SPAN)
        (request,) = [s for s in spans if s.parent_span_id == CLIENT_SPAN]
        assert request.name == "grpc ModelInfer iris_fanout"
        assert request.attributes["proxy.door"] == "grpc"
        assert request.attributes["rpc.grpc.status_code"] == "OK"
        steps = {
            s.attributes["proxy.step"] for s in _children(spans, request) if s.name.startswith("service ")
        }
        assert steps == set(MODELS)


@pytest.mark.parametrize(
    "variables",
    [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}],
    ids=["no-variable", "sdk-disabled", "exporter-none"],
)
def test_no_span_leaves_the_proxy_or_triton_when_tracing_is_off(
    variables: dict[str, str],
    traced_triton: TritonServer,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracing off (no OTEL_* variable; or switched off beside an endpoint that points at the
    receiver, which would catch a switch that failed): the proxy exports nothing, and sends
    Triton no trace context, so Triton (tracing only requests that carry one) exports nothing
    either, even for a client that sent one."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name)
    if variables:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    trace_id = f"{CLIENT_TRACE[:-4]}4000"
    before = len(receiver.spans)
    with running_proxy(settings(), services_on(traced_triton, "grpc")) as url:
        for _ in range(5):
            response = httpx.post(
                f"{url}/predict/label",
                json={"data": [[5.1, 3.5, 1.4, 0.2]]},
                headers={"traceparent": _traceparent(trace_id)},
            )
            assert response.status_code == 200
            assert "traceparent" not in response.headers
        time.sleep(1.5)  # fifteen export periods of both exporters
    assert receiver.spans[before:] == []


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_request_log_line_carries_the_trace_id(
    traced_triton: TritonServer, receiver: Receiver, tracing_on: None, tmp_path: Path, log_format: str
) -> None:
    trace_id = f"{CLIENT_TRACE[:-4]}5{'0' if log_format == 'json' else '1'}00"
    log_path = tmp_path / "proxy.log"
    with (
        open(log_path, "w") as log,
        running_proxy(
            settings(log_format=log_format, log_level="INFO"), services_on(traced_triton, "grpc"), log=log
        ) as url,
    ):
        response = httpx.post(
            f"{url}/predict/label",
            json={"data": [[5.1, 3.5, 1.4, 0.2]]},
            headers={"traceparent": _traceparent(trace_id), "X-Request-ID": "log-traced"},
        )
        assert response.status_code == 200
    text = log_path.read_text()
    if log_format == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        (line,) = [entry for entry in lines if entry.get("request_id") == "log-traced"]
        assert line["trace_id"] == trace_id
    else:
        (line,) = [line for line in text.splitlines() if "log-traced" in line]
        assert line.endswith(f" trace_id={trace_id}"), line


def test_pipeline_steps_are_spans_and_probes_and_metrics_make_none(
    traced_triton: TritonServer, receiver: Receiver, tracing_on: None
) -> None:
    cascade = f"{CLIENT_TRACE[:-4]}8000"
    paths = ("/health", "/health/live", "/health/ready", "/health/all", "/metrics")
    quiet = [f"{CLIENT_TRACE[:-4]}81{i:02d}" for i in range(len(paths))]
    with running_proxy(settings(), services_on(traced_triton, "grpc")) as url:
        for path, trace_id in zip(paths, quiet, strict=True):
            assert (
                httpx.get(f"{url}{path}", headers={"traceparent": _traceparent(trace_id)}).status_code == 200
            )
        response = httpx.post(
            f"{url}/pipelines/iris_cascade",
            json={"data": [[5.1, 3.5, 1.4, 0.2]]},
            headers={"traceparent": _traceparent(cascade)},
        )
        assert response.status_code == 200 and response.json()["prediction"]["stopped_at"] == "setosa"
        receiver.wait_for(lambda _: any(s.name.startswith("step ") for s in receiver.trace(cascade)))
        time.sleep(1.0)  # ten export periods: what the probes might have made has arrived too
    spans = receiver.trace(cascade)
    (request,) = [s for s in spans if s.parent_span_id == CLIENT_SPAN]
    assert request.name == "POST /pipelines/{name}"  # the route, not the pipeline
    (step,) = [s for s in spans if s.name.startswith("step ")]  # the cascade stopped at its first
    assert step.name == "step setosa" and step.parent_span_id == request.span_id
    assert step.attributes["proxy.step"] == "setosa" and step.attributes["proxy.step.kind"] == "step"
    assert [s.name for s in _children(spans, step)] == ["service setosa"]
    for path, trace_id in zip(paths, quiet, strict=True):
        assert not [s for s in receiver.trace(trace_id) if s.service == "client-proxy"], path


def test_a_tracing_setting_the_proxy_cannot_honour_stops_the_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    ran = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines() == [
        "client_proxy: error: OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported: the proxy (like Triton) "
        "exports over http/protobuf; point it at the collector's OTLP/HTTP port (4318)"
    ]


def _compose_trace_flags(environ: dict[str, str]) -> list[str]:
    """docker-compose.yml's Triton ``--trace-config`` flags, ``${VAR:-default}`` as compose reads them."""
    import re

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
    flags = [a for a in compose["services"]["triton"]["command"] if a.startswith("--trace-config")]

    def value(match: re.Match[str]) -> str:
        return environ.get(match[1]) or match[2]

    return [re.sub(r"\$\{(\w+):-([^}]*)\}", value, flag) for flag in flags]


@pytest.mark.parametrize("level", ["TIMESTAMPS", "OFF"])
def test_composes_triton_trace_flags_trace_when_asked_and_not_otherwise(
    level: str, receiver: Receiver, tmp_path: Path
) -> None:
    """The compose file's flags on the embedded Triton (the release the image runs): with
    ``TRITON_TRACE_LEVEL=TIMESTAMPS`` a request that carries a context is traced to the endpoint;
    with the default (OFF), Triton serves and traces nothing."""
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    if level != "OFF":
        environ["TRITON_TRACE_LEVEL"] = level
    flags = _compose_trace_flags(environ)
    assert f"--trace-config=opentelemetry,url={receiver.url}/v1/traces" in flags
    trace_id = f"{CLIENT_TRACE[:-4]}{'6' if level == 'OFF' else '7'}000"
    repository = iris_repository(tmp_path)
    with TritonServer(
        model_repository=repository, http_port=0, grpc_port=0, metrics_port=0, extra_args=flags
    ) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tensor = grpcclient.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        for i in range(5):  # several: Triton misses a context now and then (trace_args)
            client.infer("setosa", [tensor], headers={"traceparent": _traceparent(trace_id, f"{i + 1:016x}")})
        client.close()
        if level == "OFF":
            time.sleep(6)  # longer than Triton's default export period (5 s)
        else:
            receiver.wait_for(lambda _: bool(receiver.trace(trace_id)))
    spans = receiver.trace(trace_id)
    if level == "OFF":
        assert spans == []
    else:
        assert {s.name for s in spans} >= {"InferRequest", "setosa"}
        assert all(s.service == TRITON for s in spans)
