"""Load shedding against the real Triton: past ``PROXY_MAX_IN_FLIGHT`` requests in flight, the
proxy answers at once with 503 and ``Retry-After`` (gRPC: UNAVAILABLE), keeps answering its
health, readiness and metrics, and serves again as soon as the load is gone.

To hold requests in flight for certain, the Triton sits behind a relay that holds its answers
back on demand (``local_triton.slow_port``): while held, exactly ``PROXY_MAX_IN_FLIGHT``
requests are admitted and every other one is refused, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from bench.overload import read_response
from client_proxy.core.services import Service
from local_triton import TritonServer, free_ports
from local_triton.slow_port import Relay, slow_port

from .helpers import metric, running_proxy, settings

T = TypeVar("T")

ROW = {"data": [[6.0, 2.9, 4.5, 1.5]]}
V2_BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [6.0, 2.9, 4.5, 1.5]}]}
MODELS = ("setosa", "versicolor", "virginica")
LIMIT = 4
BURST = 24


@dataclass
class Overloadable:
    url: str
    grpc_port: int
    relay: Relay

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """Triton's answers held back meanwhile: the first ``LIMIT`` requests stay in flight."""
        self.relay.hold()
        try:
            yield
        finally:
            self.relay.release()


@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[Overloadable]:
    """A proxy admitting ``LIMIT`` requests, before a relay to Triton that can hold its answers."""
    with slow_port(triton.grpc_url) as relay:
        (grpc_port,) = free_ports(1)
        services = [Service(m, "grpc", relay.address, m) for m in MODELS]
        config = settings(
            max_in_flight=LIMIT, deadline_ms=10000, service_timeout_ms=10000, grpc_port=grpc_port
        )
        with running_proxy(config, services) as url:
            assert httpx.post(f"{url}/predict/label", json=ROW).status_code == 200  # contracts read
            yield Overloadable(url, grpc_port, relay)


async def _overload(
    proxy: Overloadable, send: Callable[[], Awaitable[T]], n: int = BURST
) -> list[T | BaseException]:
    """``n`` concurrent ``send()`` while Triton is held: the refusals come back at once; then
    Triton lets the admitted ones through. Every outcome, in order."""
    with proxy.stalled():
        tasks = [asyncio.ensure_future(send()) for _ in range(n)]
        deadline = time.monotonic() + 20
        while sum(t.done() for t in tasks) < n - LIMIT and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # The refusals came back while Triton held every call: they waited for nothing.
        assert sum(t.done() for t in tasks) == n - LIMIT, "the refusals were not answered at once"
    return await asyncio.gather(*tasks, return_exceptions=True)


def _shed(url: str, door: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(rf'^proxy_shed_requests_total\{{door="{door}"\}} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


def _statuses(outcomes: list[httpx.Response | BaseException]) -> list[int]:
    return [o.status_code if isinstance(o, httpx.Response) else 0 for o in outcomes]


def test_past_the_bound_requests_are_refused_at_once_with_503_and_retry_after(proxy: Overloadable) -> None:
    before = _shed(proxy.url, "http")
    counted = httpx.get(f"{proxy.url}/metrics").text

    async def run() -> list[httpx.Response | BaseException]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            return await _overload(proxy, lambda: client.post("/predict/label", json=ROW))

    outcomes = asyncio.run(run())
    statuses = _statuses(outcomes)
    # Exactly the bound was admitted (and answered once Triton went on); every other one refused.
    assert sorted(statuses) == [200] * LIMIT + [503] * (BURST - LIMIT), statuses
    for response in outcomes:
        assert isinstance(response, httpx.Response)
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "overloaded" and "PROXY_MAX_IN_FLIGHT" in error["message"]
    assert _shed(proxy.url, "http") - before == BURST - LIMIT  # each one counted
    # ... as shed, and not as a request: those were answered before routing, to cost the least.
    requests = "proxy_http_requests_total"
    after = httpx.get(f"{proxy.url}/metrics").text
    assert (
        metric(after, requests, endpoint="/predict/label", status="200")
        - metric(counted, requests, endpoint="/predict/label", status="200")
        == LIMIT
    )
    assert metric(after, requests, status="503") == metric(counted, requests, status="503")


def test_the_open_inference_protocol_gets_its_own_error_shapes_when_shed(proxy: Overloadable) -> None:
    async def over_http() -> list[httpx.Response | BaseException]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            return await _overload(proxy, lambda: client.post("/v2/models/iris_fanout/infer", json=V2_BODY))

    outcomes = asyncio.run(over_http())
    assert sorted(_statuses(outcomes)) == [200] * LIMIT + [503] * (BURST - LIMIT)
    refused = [o for o in outcomes if isinstance(o, httpx.Response) and o.status_code == 503]
    assert all("PROXY_MAX_IN_FLIGHT" in r.json()["error"] for r in refused)  # {"error": "..."}

    before = _shed(proxy.url, "grpc")

    async def over_grpc() -> list[object | BaseException]:
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
        tensor = InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.asarray([[6.0, 2.9, 4.5, 1.5]], dtype=np.float32))
        try:
            return await _overload(proxy, lambda: client.infer("iris_fanout", [tensor]))
        finally:
            await client.close()

    answers = asyncio.run(over_grpc())
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert len(errors) == BURST - LIMIT, answers
    for error in errors:
        assert isinstance(error, InferenceServerException)
        assert error.status() == str(grpc.StatusCode.UNAVAILABLE) and "PROXY_MAX_IN_FLIGHT" in str(
            error.message()
        )
    assert _shed(proxy.url, "grpc") - before == BURST - LIMIT


def test_liveness_metrics_and_metadata_answer_during_overload(proxy: Overloadable) -> None:
    async def run() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            checks: list[int] = []

            async def send() -> httpx.Response:
                return await client.post("/predict/label", json=ROW)

            with proxy.stalled():
                load = [asyncio.ensure_future(send()) for _ in range(BURST)]
                await asyncio.sleep(0.2)  # the bound is reached, and held
                # (Not readiness: it asks Triton, which is held here.)
                paths = (
                    "/health/live",
                    "/metrics",
                    "/metadata",
                    "/v2",
                    "/v2/health/live",
                    "/v2/models/iris_fanout",
                    "/openapi.json",
                )
                for path in paths:
                    checks.append((await client.get(path)).status_code)
                grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
                try:  # and the gRPC door's own
                    checks.append(200 if await grpc_client.is_server_live() else 0)
                    metadata = await grpc_client.get_model_metadata("iris_fanout")
                    checks.append(200 if metadata.name == "iris_fanout" else 0)
                finally:
                    await grpc_client.close()
            return _statuses(list(await asyncio.gather(*load))), checks

    statuses, checks = asyncio.run(run())
    assert 503 in statuses
    assert checks == [200] * 9


def test_a_client_that_ignores_retry_after_waits_for_its_next_answer_and_gets_it(proxy: Overloadable) -> None:
    host, port = proxy.url.removeprefix("http://").split(":")
    body = b'{"data": [[6.0, 2.9, 4.5, 1.5]]}'
    request = (
        f"POST /predict/label HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def run() -> tuple[str, str, float]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            with proxy.stalled():
                held = [asyncio.ensure_future(client.post("/predict/label", json=ROW)) for _ in range(LIMIT)]
                await asyncio.sleep(0.2)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                first = (await read_response(reader)).decode()
                writer.write(request)  # at once, as if Retry-After meant nothing
                sent = time.monotonic()
            second = (await read_response(reader)).decode()  # Triton goes on: the held ones finish
            waited = time.monotonic() - sent
            writer.close()
            await asyncio.gather(*held)
            return first, second, waited

    first, second, waited = asyncio.run(run())
    assert first.startswith("HTTP/1.1 503") and "retry-after: 1" in first.lower()
    # The connection was not read for half a second after the refusal; then the request was
    # served like any other: answered, never dropped.
    assert waited >= 0.45
    assert second.startswith("HTTP/1.1 200"), second


def test_after_the_overload_every_request_is_admitted_again(proxy: Overloadable) -> None:
    text = httpx.get(f"{proxy.url}/metrics").text
    assert re.search(r"^proxy_requests_in_flight 0\.0$", text, re.M)  # every admitted one left
    for _ in range(LIMIT * 2):
        assert httpx.post(f"{proxy.url}/predict/label", json=ROW, timeout=30).status_code == 200
