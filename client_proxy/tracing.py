"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` environment variables switch it on
(read at the start into ``config.TracingSettings``, which ``configure`` is handed).

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, or
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``); off when
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. The SDK reads the rest itself:
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (parent-based,
always on, by default), ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*`` (headers, timeout,
compression), ``OTEL_PROPAGATORS`` (W3C trace context and baggage by default). Spans leave
over OTLP/HTTP with protobuf, the protocol Triton's own tracing exports over too.

The spans: one per request (``SERVER``), its parent the client's ``traceparent`` when it sends
one; beneath it one per composition step (a service of a fan-out, a pipeline's step); beneath
that one per Triton call (``CLIENT``: the replica, the attempt, whether it is a hedge), whose
context goes to Triton in the call's headers (HTTP) or metadata (gRPC), so that Triton's own
spans hang beneath it. A coalesced batch has a span of its own, beneath the first caller's
step, linked to the other callers' steps.

With tracing off every hook below is one test of ``ENABLED``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from client_proxy.config import TracingSettings

logger = logging.getLogger(__name__)

#: True once ``configure`` switched tracing on (read on every hook: a module attribute).
ENABLED = False
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: Any = None
T = TypeVar("T")
#: What ``otel_context.attach`` gives and ``detach`` takes back.
Token = contextvars.Token[Context]

#: The service name spans carry when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES says.
DEFAULT_SERVICE_NAME = "client-proxy"
_EXPORTERS = ("otlp", "console")


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables ask for what the proxy cannot do (an unknown exporter, gRPC)."""


def check(settings: TracingSettings) -> None:
    """``TracingConfigError`` naming the variable when tracing is on and cannot be had as asked."""
    if not settings.enabled:
        return
    unknown = [e for e in settings.exporters if e not in (*_EXPORTERS, "none")]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not supported: use otlp (OTLP/HTTP) or console"
        )
    for name, protocol in (
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", settings.exporter_otlp_traces_protocol),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", settings.exporter_otlp_protocol),
    ):
        if protocol and protocol != "http/protobuf":
            raise TracingConfigError(
                f"{name}={protocol} is not supported: the proxy (like Triton) exports over "
                "http/protobuf; point it at the collector's OTLP/HTTP port (4318)"
            )


def configure(settings: TracingSettings) -> bool:
    """Switch tracing on if ``settings`` say so (once per process); whether it is on."""
    global ENABLED, _tracer, _provider
    if ENABLED or not settings.enabled:
        return ENABLED
    check(settings)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    exporters = settings.exporters
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.traces_url)))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    _provider = provider
    _tracer = provider.get_tracer("client_proxy")
    ENABLED = True
    logger.info("tracing on: spans to %s", settings.traces_url if "otlp" in exporters else "the console")
    return True


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (at shutdown), waiting at most ``timeout_s``."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop the exporters; tracing is off afterwards (tests switch it on and off)."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    ENABLED, _tracer, _provider = False, trace.NoOpTracer(), None


def use_provider(provider: Any) -> None:
    """Trace into ``provider`` (an SDK ``TracerProvider``): for tests with an in-memory exporter."""
    global ENABLED, _tracer, _provider
    _provider, _tracer, ENABLED = provider, provider.get_tracer("client_proxy"), True


# -- requests ----------------------------------------------------------------------------------


def asgi_carrier(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """The propagation headers among ASGI's raw ones, as the propagator reads them."""
    fields = propagate.get_global_textmap().fields
    carrier = {}
    for key, value in headers:
        name = key.decode("latin-1")
        if name in fields:
            carrier[name] = value.decode("latin-1")
    return carrier


def _start_current(
    name: str,
    parent: Context | None,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    links: Sequence[Link] = (),
) -> tuple[Span, Token]:
    """A span beneath ``parent`` (the current context when None), made current: it and the
    token that ``otel_context.detach`` takes back."""
    span = _tracer.start_span(name, context=parent, kind=kind, attributes=attributes, links=links)
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def start_request(
    method: str, path: str, carrier: Mapping[str, str], request_id: str, door: str = "http"
) -> tuple[Span, Token]:
    """The request's span, current until ``end_request``; its parent the client's ``traceparent``
    in ``carrier`` (the request's headers, or gRPC metadata)."""
    attributes = {
        "http.request.method": method,
        "url.path": path,
        "proxy.request_id": request_id,
        "proxy.door": door,
    }
    return _start_current(f"{method} {path}", propagate.extract(carrier), SpanKind.SERVER, attributes)


def end_request(span: Span, token: Token, method: str, route: str, status: int) -> None:
    otel_context.detach(token)
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def end_grpc_request(span: Span, token: Token, model: str, status: str) -> None:
    """``end_request`` for the gRPC door: ``status`` is the gRPC status code's name."""
    otel_context.detach(token)
    span.update_name(f"grpc ModelInfer {model}")
    span.set_attribute("rpc.system", "grpc")
    span.set_attribute("rpc.method", "ModelInfer")
    span.set_attribute("rpc.grpc.status_code", status)
    if status != "OK":
        span.set_status(Status(StatusCode.ERROR, status))
    span.end()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span (the request's, in a route): deadline, policy, outcome."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), for the log line; None when there is none."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def current() -> Context:
    return otel_context.get_current()


# -- composition steps ----------------------------------------------------------------------------


class Steps:
    """The spans of one composition's steps (a fan-out's services, a pipeline's steps), children
    of the span current when it was made; each ends with its step's outcome."""

    __slots__ = ("_kind", "_parent", "_spans")

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._parent = otel_context.get_current()
        self._spans: dict[str, tuple[Span, int]] = {}

    def start(self, name: str, **attributes: Any) -> Context:
        """Start step ``name``'s span; the context to run its calls in."""
        now = time.time_ns()
        span = _tracer.start_span(
            f"{self._kind} {name}",
            context=self._parent,
            start_time=now,
            attributes={"proxy.step": name, "proxy.step.kind": self._kind, **attributes},
        )
        self._spans[name] = (span, now)
        return trace.set_span_in_context(span, self._parent)

    def task_context(self, name: str) -> contextvars.Context:
        """A copy of the current ``contextvars`` context with step ``name``'s span current: for
        ``asyncio.create_task(..., context=...)``."""
        step = self.start(name)
        copied = contextvars.copy_context()
        copied.run(otel_context.attach, step)
        return copied

    @contextmanager
    def current(self, name: str) -> Iterator[None]:
        """Step ``name``'s span current for the block (a coalescer's ``submit`` captures it)."""
        token = otel_context.attach(self.start(name))
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, name: str, outcome: str, latency_s: float | None = None, error: str = "") -> None:
        """End step ``name``'s span with its outcome (``ok``, ``timeout``, ...), ``latency_s``
        after it started when given (an outcome may be read some time after it arrived)."""
        found = self._spans.pop(name, None)
        if found is None:
            return
        span, started = found
        span.set_attribute("proxy.outcome", outcome)
        if outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, error or outcome))
        span.end(end_time=started + int(latency_s * 1e9) if latency_s is not None else None)

    def close(self) -> None:
        """End the steps no outcome ended: given up on (``cancelled``)."""
        for name in list(self._spans):
            self.end(name, "cancelled")


def steps(kind: str) -> Steps | None:
    """A ``Steps`` when tracing is on, else None."""
    return Steps(kind) if ENABLED else None


# -- Triton calls ---------------------------------------------------------------------------------


async def triton_call(
    make: Callable[[], Awaitable[T]],
    operation: str,
    service: str,
    model: str,
    replica: str,
    protocol: str,
    attempt: int = 1,
    hedge: bool = False,
) -> T:
    """``make()``'s call to Triton in a ``CLIENT`` span, current while it runs (its headers then
    carry this span's context: ``outgoing_headers``)."""
    span, token = _start_current(
        f"triton {operation} {model}",
        None,
        SpanKind.CLIENT,
        {
            "proxy.operation": operation,
            "proxy.service": service,
            "proxy.model": model,
            "proxy.replica": replica,
            "proxy.attempt": attempt,
            "proxy.retry": attempt > 1,
            "proxy.hedge": hedge,
            "rpc.system": "grpc" if protocol == "grpc" else "http",
            "server.address": replica,
        },
    )
    try:
        result = await make()
    except BaseException as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)
        span.set_attribute("proxy.outcome", "cancelled" if cancelled else type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, "cancelled" if cancelled else str(exc)[:200]))
        raise
    else:
        span.set_attribute("proxy.outcome", "ok")
        return result
    finally:
        otel_context.detach(token)
        span.end()


def outgoing_headers() -> dict[str, str]:
    """The current span's context as headers (``traceparent``, ``tracestate``) for a Triton call;
    none for a span the sampler left out: Triton traces every request that carries a context,
    whatever its sampled flag says (triton-inference-server/server#8474), so an unsampled
    request's calls would leave Triton's spans with no parent in the trace store."""
    if not trace.get_current_span().get_span_context().trace_flags.sampled:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def batch(service: str, callers: Sequence[Context | None], rows: int) -> Iterator[None]:
    """A coalesced call's span, beneath the first caller's step and linked to the others'; a
    batch of one has no span of its own, its call is traced beneath its caller's step."""
    first = callers[0]
    if len(callers) == 1:
        attached = otel_context.attach(first) if first is not None else None
        try:
            yield
        finally:
            if attached is not None:
                otel_context.detach(attached)
        return
    links = []
    for caller in callers[1:]:
        if caller is not None:
            context = trace.get_current_span(caller).get_span_context()
            if context.is_valid:
                links.append(Link(context))
    attributes = {"proxy.service": service, "proxy.batch.rows": rows, "proxy.batch.requests": len(callers)}
    span, token = _start_current(f"batch {service}", first, SpanKind.INTERNAL, attributes, links)
    try:
        yield
    finally:
        otel_context.detach(token)
        span.end()
