"""The admission bound and its middleware, on a plain ASGI app (no server; tests/test_overload.py
runs it in front of Triton)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from client_proxy.api.admission import SHED_MARK, Admission
from client_proxy.api.app import render_proxy_error, render_unexpected
from client_proxy.api.fastlane import FastLane
from client_proxy.config import load_settings
from client_proxy.observability import ProxyMetrics


def test_the_bound_admits_up_to_its_limit_and_counts_the_rest() -> None:
    refused: list[str] = []
    admission = Admission(2, refused.append)
    assert admission.enter("http") and admission.enter("grpc")
    assert not admission.enter("http") and not admission.enter("grpc")
    assert (admission.in_flight, admission.shed, refused) == (2, 2, ["http", "grpc"])
    admission.leave()
    assert admission.enter("http")
    unbounded = Admission(0)
    assert all(unbounded.enter("http") for _ in range(10_000))


def test_the_default_bound_is_a_setting() -> None:
    assert load_settings().max_in_flight == 512
    assert load_settings(max_in_flight=0).max_in_flight == 0


def _front(app: Any, admission: Admission) -> Any:
    """The front of every request (with no lane route of its own) before ``app``."""
    return FastLane([], admission, ProxyMetrics(), render_proxy_error, render_unexpected).in_front_of(app)


class _Held:
    """An app whose requests stay in flight until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(app: Any, method: str, path: str) -> tuple[int, dict[str, str], bytes, dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    start, body = messages[0], messages[1]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"], scope


def test_beyond_the_bound_a_post_is_refused_with_503_retry_after_and_a_json_reason() -> None:
    async def run() -> None:
        held = _Held()
        admission = Admission(1)
        app = _front(held, admission)
        first = asyncio.ensure_future(_call(app, "POST", "/predict/label"))
        await asyncio.sleep(0)
        status, headers, body, scope = await _call(app, "POST", "/predict/label")
        assert status == 503 and headers["retry-after"] == "1"
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] == "overloaded" and "PROXY_MAX_IN_FLIGHT" in error["message"]
        assert scope[SHED_MARK] is True  # the protocol pauses this connection's reading
        status, _, body, _ = await _call(app, "POST", "/v2/models/iris_fanout/infer")
        assert status == 503 and "PROXY_MAX_IN_FLIGHT" in json.loads(body)["error"]  # the protocol's shape
        held.release.set()
        assert (await first)[0] == 200
        assert admission.in_flight == 0

    asyncio.run(run())


def test_reads_and_the_admin_endpoints_are_never_refused() -> None:
    async def run() -> None:
        held = _Held()
        held.release.set()
        admission = Admission(1)
        admission.enter("http")  # the bound is reached
        app = _front(held, admission)
        for method, path in (("GET", "/health/ready"), ("GET", "/metrics"), ("POST", "/admin/services")):
            assert (await _call(app, method, path))[0] == 200
        assert admission.shed == 0

    asyncio.run(run())


def test_a_request_that_fails_or_is_cancelled_leaves_the_bound() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def run() -> None:
        admission = Admission(1)
        app = _front(broken, admission)
        with pytest.raises(RuntimeError):
            await _call(app, "POST", "/predict")
        assert admission.in_flight == 0
        held = _Held()
        task = asyncio.ensure_future(_call(_front(held, admission), "POST", "/predict"))
        await asyncio.sleep(0)
        assert admission.in_flight == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert admission.in_flight == 0

    asyncio.run(run())
