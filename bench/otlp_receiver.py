"""An OTLP/HTTP trace receiver for the tests and the benchmark: what a collector's ``otlp``
receiver does on its HTTP port (``POST /v1/traces``, protobuf or JSON, gzip or not), keeping
every span it gets (or, with ``keep=False``, counting them).

Both the proxy (the OpenTelemetry Python SDK) and Triton (opentelemetry-cpp) export to it over
real HTTP, so a test sees exactly what a collector would.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    """The exporting process's ``service.name`` resource attribute."""
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    """Empty for a root span."""
    kind: int
    attributes: dict[str, Any]
    links: tuple[str, ...]
    """The span ids this span links to."""
    start_ns: int
    end_ns: int


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class Receiver:
    url: str = ""
    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0
    json_posts: int = 0
    keep: bool = True
    """False: spans are counted (``count``), not kept."""
    count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: ExportTraceServiceRequest) -> None:
        if not self.keep:
            spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with self._lock:
                self.count += spans
                self.posts += 1
            return
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple(link.span_id.hex() for link in span.links),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._lock:
            self.spans.extend(found)
            self.count += len(found)
            self.posts += 1

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans received once ``predicate(spans)`` holds (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_as_base64(message: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex (the OTLP specification's one departure from
    protobuf's JSON mapping, which reads bytes as base64): turned into base64 for ``ParseDict``."""
    if isinstance(message, list):
        return [_hex_ids_as_base64(m) for m in message]
    if isinstance(message, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_FIELDS and v else _hex_ids_as_base64(v)
            for k, v in message.items()
        }
    return message


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as a collector answers: the exporters reuse their connections, and an
        # HTTP/1.0 close after each answer races the next export sent on the same connection.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding", "") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            request = ExportTraceServiceRequest()
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("application/json"):
                json_format.ParseDict(_hex_ids_as_base64(json.loads(body)), request)
                receiver.json_posts += 1
                answer, answer_type = b"{}", "application/json"
            else:
                request.ParseFromString(body)
                answer, answer_type = (
                    ExportTraceServiceResponse().SerializeToString(),
                    "application/x-protobuf",
                )
            receiver.add(request)
            self.send_response(200)
            self.send_header("Content-Type", answer_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def otlp_receiver(keep: bool = True) -> Iterator[Receiver]:
    """A receiver on a free loopback port; ``Receiver.url`` is its base (``http://127.0.0.1:N``)."""
    receiver = Receiver(keep=keep)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
