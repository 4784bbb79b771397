"""The fast lane (client_proxy.api.fastlane) on plain ASGI calls: no server, handlers of its own.
Every route of the proxy runs through it in the integration tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from client_proxy.api.admission import SHED_MARK, Admission
from client_proxy.api.app import render_proxy_error, render_unexpected
from client_proxy.api.fastlane import FastLane, LaneRoute
from client_proxy.api.reading import ARRIVAL
from client_proxy.errors import InvalidInput
from client_proxy.observability import ProxyMetrics
from tests.helpers import metric


class _Handlers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def ok(self, request: Request) -> Response:
        self.calls.append((request.scope[ARRIVAL][0], dict(request.path_params)))
        return JSONResponse({"ok": True, "params": request.path_params})

    async def invalid(self, request: Request) -> Response:
        raise InvalidInput("data: rows must have 4 values")

    async def broken(self, request: Request) -> Response:
        raise RuntimeError("a bug at 10.0.0.7")


def _lane(limit: int = 0) -> tuple[FastLane, _Handlers, Admission, ProxyMetrics]:
    handlers = _Handlers()
    admission = Admission(limit)
    metrics = ProxyMetrics()
    routes = [
        LaneRoute("/predict/label", ("POST",), handlers.ok),
        LaneRoute("/invalid", ("POST",), handlers.invalid),
        LaneRoute("/broken", ("POST",), handlers.broken),
        LaneRoute("/v2/models/{name}/infer", ("POST",), handlers.ok),
        LaneRoute("/v2/models/{name}/versions/{version}/infer", ("POST",), handlers.ok),
    ]
    return (
        FastLane(routes, admission, metrics, render_proxy_error, render_unexpected),
        handlers,
        admission,
        metrics,
    )


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": headers or [], "query_string": b""}


async def _call(lane: FastLane, scope: dict[str, Any]) -> tuple[int, dict[str, str], bytes, list[str]]:
    """Through ``in_front_of``: (status, headers, body, paths the app behind was asked for)."""
    behind: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        behind.append(scope["path"])
        await Response(status_code=204)(scope, receive, send)

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await lane.in_front_of(app)(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:]), behind


def test_it_takes_only_its_own_methods_and_paths() -> None:
    lane, *_ = _lane()
    assert lane.match(_scope("POST", "/predict/label")) is not None
    assert lane.match(_scope("GET", "/predict/label")) is None  # FastAPI answers 405
    assert lane.match(_scope("POST", "/predict/label/")) is None
    assert lane.match(_scope("POST", "/docs")) is None
    found = lane.match(_scope("POST", "/v2/models/iris_fanout/versions/1/infer"))
    assert found is not None and found[1:] == (
        "/v2/models/{name}/versions/{version}/infer",
        {"name": "iris_fanout", "version": "1"},
    )
    assert lane.match(_scope("POST", "/v2/models//infer")) is None
    assert lane.match(_scope("POST", "/v2/models/a/b/infer")) is None


def test_what_is_not_its_own_goes_to_the_app_behind_with_the_same_id_and_count() -> None:
    lane, handlers, _, metrics = _lane()
    status, headers, _, behind = asyncio.run(
        _call(lane, _scope("GET", "/health", [(b"x-request-id", b"h-1")]))
    )
    assert (status, behind, handlers.calls) == (204, ["/health"], [])
    assert headers["x-request-id"] == "h-1"
    text = generate_latest(metrics.registry).decode()
    # No FastAPI route answered this app: the request is counted as unmatched.
    assert metric(text, "proxy_http_requests_total", endpoint="unmatched", method="GET", status="204") == 1


def test_an_answer_carries_the_request_id_and_is_counted_under_its_route_template() -> None:
    lane, handlers, admission, metrics = _lane()
    scope = _scope("POST", "/v2/models/iris_fanout/infer", [(b"x-request-id", b"abc-123")])
    status, headers, body, behind = asyncio.run(_call(lane, scope))
    assert (status, behind) == (200, [])
    assert headers["x-request-id"] == "abc-123" and handlers.calls == [("abc-123", {"name": "iris_fanout"})]
    assert json.loads(body) == {"ok": True, "params": {"name": "iris_fanout"}}
    text = generate_latest(metrics.registry).decode()
    labels = {"endpoint": "/v2/models/{name}/infer", "method": "POST", "status": "200"}
    assert metric(text, "proxy_http_requests_total", **labels) == 1
    assert admission.in_flight == 0
    # A junk id is replaced by one of the proxy's own.
    _, headers, _, _ = asyncio.run(_call(lane, _scope("POST", "/predict/label", [(b"x-request-id", b"a b")])))
    assert len(headers["x-request-id"]) == 32


def test_errors_are_the_apps_json_and_a_bug_shows_no_detail() -> None:
    lane, _, admission, _ = _lane()
    status, headers, body, _ = asyncio.run(_call(lane, _scope("POST", "/invalid")))
    error = json.loads(body)["error"]
    assert status == 422 and error["code"] == "invalid_input" and "4 values" in error["message"]
    assert error["request_id"] == headers["x-request-id"]
    status, _, body, _ = asyncio.run(_call(lane, _scope("POST", "/broken")))
    assert status == 500 and json.loads(body)["error"]["message"] == "internal error"
    assert b"10.0.0.7" not in body
    assert admission.in_flight == 0  # left the bound after each


def test_beyond_the_bound_it_refuses_at_once_and_marks_the_connection() -> None:
    lane, handlers, admission, _ = _lane(limit=1)
    assert admission.enter("http")  # one request in flight already
    scope = _scope("POST", "/predict/label")
    status, headers, body, _ = asyncio.run(_call(lane, scope))
    assert (status, headers["retry-after"], handlers.calls) == (503, "1", [])
    assert json.loads(body)["error"]["code"] == "overloaded" and scope[SHED_MARK] is True
