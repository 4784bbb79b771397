"""Tracing's switches and the spans of the composition layer, with the SDK's in-memory exporter and
a fake gateway (the spans of real Triton calls are tests/test_tracing.py's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from client_proxy import tracing
from client_proxy.config import TracingSettings
from client_proxy.core.fanout import FanOut
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.triton.coalesce import Coalescer

from .test_fanout import MODES, SERVICES, FakeGateway


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    ],
)
def test_tracing_is_off_unless_the_standard_variables_switch_it_on(environ: dict[str, str], on: bool) -> None:
    assert TracingSettings.from_environ(environ).enabled is on


def test_the_traces_url_is_the_sdks() -> None:
    assert TracingSettings().traces_url == "http://localhost:4318/v1/traces"
    assert TracingSettings(exporter_otlp_endpoint="http://c:4318/").traces_url == "http://c:4318/v1/traces"
    signal = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
    }
    assert TracingSettings.from_environ(signal).traces_url == "http://t/x"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "PROTOCOL=grpc",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json",
        ),
    ],
)
def test_what_the_proxy_cannot_export_is_refused_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(tracing.TracingConfigError, match=named):
        tracing.check(TracingSettings.from_environ(environ))


def test_settings_that_leave_tracing_off_are_not_checked() -> None:
    tracing.check(TracingSettings(exporter_otlp_protocol="grpc"))  # no endpoint: off, nothing to refuse


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    found = {span.name: span for span in exporter.get_finished_spans()}
    assert len(found) == len(exporter.get_finished_spans()), "span names repeat"
    return found


@pytest.mark.parametrize("mode", MODES)
def test_each_service_of_a_fan_out_is_a_span_beneath_the_request_with_its_outcome(
    mode: str, spans: InMemorySpanExporter
) -> None:
    fake = FakeGateway({"slow": 5.0}, broken={"broken"})

    async def main() -> None:
        coalescer = Coalescer(fake.infer, max_rows=64) if mode == MODES[1] else None
        fanout = FanOut(fake.infer, 10, submitter=coalescer)
        tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
        with tracer.start_as_current_span("request"):
            await fanout.run(
                SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + 0.1, TimeoutPolicy.PARTIAL
            )

    asyncio.run(main())
    found = _by_name(spans)
    request = found["request"]
    assert sorted(found) == ["request", "service broken", "service fast", "service slow"]
    outcomes = {}
    for name in ("fast", "slow", "broken"):
        step = found[f"service {name}"]
        assert step.parent is not None and step.parent.span_id == request.context.span_id
        assert step.context.trace_id == request.context.trace_id
        outcomes[name] = (step.attributes["proxy.outcome"], step.status.status_code)
    assert outcomes == {
        "fast": ("ok", StatusCode.UNSET),
        "slow": ("timeout", StatusCode.ERROR),
        "broken": ("unavailable", StatusCode.ERROR),
    }
    assert request.attributes["proxy.policy"] == "partial"
    assert request.attributes["proxy.partial"] is True
    assert request.attributes["proxy.answered"] == ("fast",)
    assert 0 < request.attributes["proxy.deadline_ms"] <= 100
    # The late service's span ends at its timeout, not when the request's answer was read.
    slow = found["service slow"]
    assert slow.end_time is not None and slow.start_time is not None
    assert 0.09 <= (slow.end_time - slow.start_time) / 1e9 < 1.0


def test_a_fan_out_given_up_ends_its_open_steps_as_cancelled(spans: InMemorySpanExporter) -> None:
    fake = FakeGateway({"fast": 0.0, "slow": 5.0, "broken": 5.0})

    async def main() -> None:
        fanout = FanOut(fake.infer, 10)
        run = asyncio.ensure_future(
            fanout.run(
                SERVICES, np.zeros((1, 4), np.float32), "rid", time.monotonic() + 5, TimeoutPolicy.PARTIAL
            )
        )
        await asyncio.sleep(0.05)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    found = _by_name(spans)
    assert found["service fast"].attributes["proxy.outcome"] == "ok"
    assert found["service slow"].attributes["proxy.outcome"] == "cancelled"
    assert found["service broken"].attributes["proxy.outcome"] == "cancelled"


def test_a_coalesced_batch_is_a_span_beneath_its_first_caller_linked_to_the_others(
    spans: InMemorySpanExporter,
) -> None:
    """Three requests at once to one service: the first goes out alone, the other two wait and
    share the next call, whose span is beneath the second request's step and links the third's."""
    service = Service("only", "grpc", "x:1", "only")
    gate: asyncio.Event

    async def infer(service: Service, x: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        if request_id == "r0":
            await gate.wait()
        return np.tile(np.array([[0.6, 0.4]], dtype=np.float32), (x.shape[0], 1))

    async def main() -> None:
        nonlocal gate
        gate = asyncio.Event()
        coalescer = Coalescer(infer, max_rows=64, max_in_flight=1)  # the others wait for r0
        fanout = FanOut(infer, 10, submitter=coalescer)
        tracer = trace.get_tracer("test", tracer_provider=tracing._provider)

        async def request(i: int) -> None:
            with tracer.start_as_current_span(f"request {i}"):
                await fanout.run(
                    [service],
                    np.zeros((1, 4), np.float32),
                    f"r{i}",
                    time.monotonic() + 5,
                    TimeoutPolicy.PARTIAL,
                )

        first = asyncio.ensure_future(request(0))
        await asyncio.sleep(0.01)  # r0's call is out, waiting on the gate
        others = [asyncio.ensure_future(request(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *others)

    asyncio.run(main())
    finished = spans.get_finished_spans()
    (batch,) = [s for s in finished if s.name == "batch only"]
    steps = {s.parent.span_id: s for s in finished if s.name == "service only" and s.parent is not None}
    requests = {s.name: s for s in finished if s.name.startswith("request ")}
    second_step = steps[requests["request 1"].context.span_id]
    third_step = steps[requests["request 2"].context.span_id]
    assert batch.parent is not None and batch.parent.span_id == second_step.context.span_id
    assert [link.context.span_id for link in batch.links] == [third_step.context.span_id]
    assert batch.attributes["proxy.batch.requests"] == 2 and batch.attributes["proxy.batch.rows"] == 2


def test_the_headers_for_triton_carry_the_current_span(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    with tracer.start_as_current_span("call") as span:
        headers = tracing.outgoing_headers()
        context = span.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_a_triton_call_span_records_its_replica_attempt_and_failure(spans: InMemorySpanExporter) -> None:
    async def fails() -> None:
        raise ConnectionRefusedError("refused")

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await tracing.triton_call(
                fails, "infer", "setosa", "setosa", "a:8001", "grpc", attempt=2, hedge=True
            )

    asyncio.run(main())
    (span,) = spans.get_finished_spans()
    assert span.name == "triton infer setosa" and span.kind == trace.SpanKind.CLIENT
    assert span.attributes["proxy.replica"] == "a:8001"
    assert span.attributes["proxy.attempt"] == 2 and span.attributes["proxy.retry"] is True
    assert span.attributes["proxy.hedge"] is True
    assert span.attributes["proxy.outcome"] == "ConnectionRefusedError"
    assert span.status.status_code == StatusCode.ERROR


def test_with_tracing_off_no_step_is_made() -> None:
    assert not tracing.ENABLED
    assert tracing.steps("service") is None
    assert tracing.trace_id() is None


def test_an_unsampled_span_sends_triton_no_context(spans: InMemorySpanExporter) -> None:
    """Triton traces whatever carries a context, sampled flag or not (server#8474): a request the
    sampler left out sends none, so Triton leaves no spans whose parents were never exported."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    provider = TracerProvider(sampler=ALWAYS_OFF)
    with provider.get_tracer("test").start_as_current_span("unsampled") as span:
        assert span.get_span_context().is_valid and not span.get_span_context().trace_flags.sampled
        assert tracing.outgoing_headers() == {}


def test_every_tracing_setting_is_an_otel_variable_with_a_description() -> None:
    from opentelemetry import environment_variables as api_variables
    from opentelemetry.sdk import environment_variables

    modules = (environment_variables, api_variables)
    standard = {v for m in modules for k, v in vars(m).items() if k.startswith("OTEL_")}
    for name, field in TracingSettings.model_fields.items():
        assert f"OTEL_{name.upper()}" in standard, name
        assert field.description, name
    # Read under those names, stripped; a variable it does not know is left to the SDK.
    read = TracingSettings.from_environ({"OTEL_TRACES_EXPORTER": " console ", "OTEL_BSP_SCHEDULE_DELAY": "5"})
    assert read == TracingSettings(traces_exporter="console")
