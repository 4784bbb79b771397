"""Replicas against real servers: two embedded Tritons serve all three services."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from pathlib import Path

import httpx

from client_proxy.core.services import Service
from local_triton import TritonServer

from .helpers import iris_repository, metric, running_proxy, settings

ROW = {"data": [[1.0, 2.0, 3.0, 4.0]]}
MODELS = ("setosa", "versicolor", "virginica")


async def _load(url: str, seconds: float, concurrency: int) -> list[tuple[int, bool]]:
    """Closed-loop load on /predict/label: (status, partial) per request; 0 for a transport error."""
    results: list[tuple[int, bool]] = []
    until = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            try:
                response = await client.post("/predict/label", json=ROW)
                results.append((response.status_code, bool(response.json().get("partial"))))
            except httpx.TransportError:
                results.append((0, False))

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _replica_states(url: str) -> dict[str, set[str]]:
    """replica target -> the states /health/all shows for it across the three services."""
    states: dict[str, set[str]] = {}
    for entry in httpx.get(f"{url}/health/all", timeout=10).json()["services"].values():
        for replica in entry["replicas"]:
            states.setdefault(replica["target"].split("/")[2], set()).add(replica["state"])
    return states


def _calls(url: str, server: str) -> int:
    """Successful calls the proxy sent to ``server``'s replicas (its metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(
        sum(
            metric(text, "proxy_replica_calls_total", outcome="ok", replica=f"grpc://{server}/{m}")
            for m in MODELS
        )
    )


def test_a_replica_killed_under_load_costs_no_request_and_returns_when_it_is_back(tmp_path: Path) -> None:
    first = TritonServer(
        model_repository=iris_repository(tmp_path / "a"), http_port=0, grpc_port=0, metrics_port=0
    )
    second = TritonServer(
        model_repository=iris_repository(tmp_path / "b"), http_port=0, grpc_port=0, metrics_port=0
    )
    first.start()
    second.start()
    try:
        services = [
            Service(m, "grpc", first.grpc_url, m, more=(*Service(m, "grpc", second.grpc_url, m).targets,))
            for m in MODELS
        ]
        log_path = tmp_path / "proxy.log"
        with (
            open(log_path, "w") as log,
            running_proxy(settings(deadline_ms=2000, log_level="INFO"), services, log=log) as url,
        ):
            assert all(httpx.post(f"{url}/predict/label", json=ROW).status_code == 200 for _ in range(20))
            assert _calls(url, first.grpc_url) > 0 and _calls(url, second.grpc_url) > 0  # both take load
            # /metadata shows each service's replicas, as /health/all does.
            for model in MODELS:
                shown = httpx.get(f"{url}/metadata").json()["services"][model]["replicas"]
                assert [(r["target"], r["state"]) for r in shown] == [
                    (f"grpc://{first.grpc_url}/{model}", "healthy"),
                    (f"grpc://{second.grpc_url}/{model}", "healthy"),
                ]

            killed_at: list[float] = []

            def kill() -> None:
                killed_at.append(time.monotonic())
                first.kill()  # SIGKILL, as a crash

            killer = threading.Timer(1.5, kill)
            killer.start()
            results = asyncio.run(_load(url, 5.0, 16))
            killer.join()
            # Not one request failed or went without a service: the other replica answered.
            assert results and {status for status, _ in results} == {200}, {s for s, _ in results}
            assert not any(partial for _, partial in results), f"{sum(p for _, p in results)} partial answers"
            assert _replica_states(url)[first.grpc_url] <= {"ejected", "probing"}
            assert _replica_states(url)[second.grpc_url] == {"healthy"}
            metrics = httpx.get(f"{url}/metrics").text
            ejected = f'replica="grpc://{re.escape(first.grpc_url)}/setosa",service="setosa"'
            assert re.search(
                rf"proxy_replica_ejections_total\{{{ejected}\}} [1-9]",
                metrics,
            )

            retries = sum(float(v) for v in re.findall(r"^proxy_retries_total\{.*\} (\S+)$", metrics, re.M))
            assert retries >= 1  # the calls the dead replica failed were sent to the other one

            first.stop()  # reap what the kill left
            restarted = time.monotonic()
            first.start()  # back, on the same ports
            # Each service's replica set probes it when its own back-off ends (they differ: each
            # saw its own failed probes while it was down), then takes it back.
            deadline = time.monotonic() + 60
            while _replica_states(url)[first.grpc_url] != {"healthy"}:
                assert time.monotonic() < deadline, f"the replica did not return: {_replica_states(url)}"
                assert httpx.post(f"{url}/predict/label", json=ROW).status_code == 200
                time.sleep(0.05)
            before = _calls(url, first.grpc_url)
            for _ in range(30):
                assert httpx.post(f"{url}/predict/label", json=ROW).status_code == 200
            assert _calls(url, first.grpc_url) > before  # it takes calls again
        # Each service logged the ejection and the return of the replica, by name.
        text = log_path.read_text()
        for model in MODELS:
            name = f"grpc://{first.grpc_url}/{model}"
            assert re.search(
                rf"replica {re.escape(name)} of {model} ejected for [\d.]+ s \(ejection 1 in a row\)", text
            )
            assert f"replica {name} of {model} returns: its probe succeeded" in text
            print(
                f"\nreplica killed under 16-client load: {len(results)} requests, 0 failed, 0 partial; "
                f"{retries:.0f} calls sent again; healthy again "
                f"{time.monotonic() - restarted:.1f} s after its restart",
                file=sys.__stderr__,
            )
    finally:
        first.stop()
        second.stop()
