"""Request ids, Prometheus metrics and logging.

``RequestContextMiddleware`` is plain ASGI (no per-request ``BaseHTTPMiddleware`` task): it
gives every request an id (the client's ``X-Request-ID`` when it is sane, else a new one),
returns it in the response header, and counts and times the request by route template.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client_proxy.fanout import Outcome

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

logger = logging.getLogger("client_proxy")


class ProxyMetrics:
    """The proxy's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxy_http_requests",
            "HTTP requests answered, by route, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "proxy_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.service_calls = Counter(
            "proxy_service_calls",
            "Calls to a service, by outcome (ok, timeout, unavailable, error, cancelled)",
            ["service", "outcome"],
            registry=r,
        )
        self.service_latency = Histogram(
            "proxy_service_call_duration_seconds",
            "Time for one service's answer, by service",
            ["service"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.timeouts = Counter(
            "proxy_service_timeouts", "Service calls that missed their deadline", ["service"], registry=r
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors",
            "Service calls that failed (unavailable or error), by reason",
            ["service", "reason"],
            registry=r,
        )
        self.partial_answers = Counter(
            "proxy_partial_answers", "Answers given without every service, by route", ["endpoint"], registry=r
        )

    def observe_outcome(self, outcome: Outcome) -> None:
        self.service_calls.labels(outcome.service, outcome.reason).inc()
        self.service_latency.labels(outcome.service).observe(outcome.latency_s)
        if outcome.reason == "timeout":
            self.timeouts.labels(outcome.service).inc()
        elif outcome.reason != "cancelled" and not outcome.ok:
            self.upstream_errors.labels(outcome.service, outcome.reason).inc()


def request_id_from(raw: str | None) -> str:
    """The client's id when it is short and plain; otherwise a new one (never echo junk into logs)."""
    if raw is not None and _VALID_REQUEST_ID.match(raw):
        return raw
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ProxyMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                raw = value.decode("latin-1")
                break
        request_id = request_id_from(raw)
        started = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route: Any = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.monotonic() - started)


def configure_logging(level: str) -> None:
    """The proxy's loggers at ``level``, one line per record, to stderr."""
    proxy_logger = logging.getLogger("client_proxy")
    proxy_logger.setLevel(level)
    if not proxy_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        proxy_logger.addHandler(handler)
        proxy_logger.propagate = False


def log_request(request_id: str, endpoint: str, outcomes: dict[str, Outcome] | list[Outcome]) -> None:
    """One line per request: each service's outcome and latency, with the request id."""
    if not logger.isEnabledFor(logging.INFO):
        return
    items = outcomes.values() if isinstance(outcomes, dict) else outcomes
    parts = " ".join(f"{o.service}={o.reason}/{o.latency_s * 1000:.1f}ms" for o in items)
    level = logging.INFO if all(o.ok for o in items) else logging.WARNING
    logger.log(level, "request_id=%s endpoint=%s %s", request_id, endpoint, parts)
