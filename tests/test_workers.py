"""Several workers as one proxy (``client_proxy/workers.py``), against the real ``python -m
client_proxy`` with ``PROXY_WORKERS=2`` and the real Triton: ``/metrics`` counts every request
once whichever worker answers the scrape, also after a worker is replaced; the admin endpoints'
changes, ``POST /admin/reload`` and SIGHUP reach both workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from local_triton import TritonServer

from .helpers import metric, proxy_process, services_on, settings

TOKEN = "workers-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"data": [[5.1, 3.5, 1.4, 0.2]]}


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's spawned children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == supervisor and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _on_fresh_connections(
    url: str, ask: Callable[[httpx.Client], httpx.Response], workers: int = 2
) -> list[httpx.Response]:
    """``ask`` on new connections until each worker has answered at least once (a response's
    request id begins with its process's own prefix); every response."""
    seen: set[str] = set()
    responses = []
    for _ in range(400):
        with httpx.Client(base_url=url, timeout=10) as client:
            response = ask(client)
        responses.append(response)
        seen.add(response.headers["x-request-id"][:16])
        if len(seen) == workers:
            return responses
    raise AssertionError(f"only {len(seen)} worker(s) answered 400 new connections")


def _scrape(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


@pytest.fixture
def two_workers(triton: TritonServer, tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    store = tmp_path / "services.json"
    compositions = tmp_path / "compositions.yaml"
    compositions.write_text(_composition(triton, "first"))
    empty = tmp_path / "pipelines.yaml"
    empty.write_text("pipelines: {}\n")
    two = settings(
        workers=2,
        admin_token=TOKEN,
        services_file=store,
        compositions_file=compositions,
        pipelines_file=empty,
    )
    with proxy_process(two, services_on(triton, "grpc")) as (url, process):
        deadline = time.monotonic() + 30
        while len(_workers(process.pid)) < 2:
            assert time.monotonic() < deadline, "the two workers did not start"
            time.sleep(0.05)
        yield url, process.pid, tmp_path


def _composition(triton: TritonServer, name: str) -> str:
    services = "".join(
        f"      {m}: {{target: 'grpc://{triton.grpc_url}/{m}'}}\n" for m in ("setosa", "virginica")
    )
    return f"compositions:\n  {name}:\n    services:\n{services}    aggregator: one_vs_rest\n"


def test_metrics_count_every_request_of_a_load_run_exactly_once(two_workers: tuple[str, int, Path]) -> None:
    url, supervisor, _ = two_workers
    before = metric(_scrape(url), "proxy_http_requests_total", endpoint="/predict/label")
    sent: list[int] = []
    answered_by: set[str] = set()
    lock = threading.Lock()

    def load() -> None:
        count = 0
        for _ in range(10):  # a new connection every 25 requests: both workers get some
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(25):
                    response = client.post("/predict/label", json=ROW)
                    assert response.status_code == 200
                    count += 1
                    with lock:
                        answered_by.add(response.headers["x-request-id"][:16])
        with lock:
            sent.append(count)

    threads = [threading.Thread(target=load) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sent) == 16 * 250 and len(answered_by) == 2, (sent, answered_by)

    # Every scrape, whichever worker answers it, shows each request once.
    scrapes = _on_fresh_connections(url, lambda c: c.get("/metrics"))
    for scrape in scrapes:
        text = scrape.text
        assert metric(text, "proxy_http_requests_total", endpoint="/predict/label") - before == 4000
        assert (
            metric(text, "proxy_http_request_duration_seconds_count", endpoint="/predict/label") - before
            == 4000
        )
        assert metric(text, "proxy_ready") == 1  # measured by the worker that answers, not added up
        assert metric(text, "proxy_requests_in_flight") == 0
    assert "_created" not in "".join(
        line for line in scrapes[0].text.splitlines() if line.startswith("proxy_http_requests")
    )

    # A worker stopped (and replaced by the supervisor) leaves its counts: nothing goes back.
    first, second = _workers(supervisor)
    os.kill(first, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while len(workers := _workers(supervisor)) < 2 or first in workers:
        assert time.monotonic() < deadline, "the stopped worker was not replaced"
        time.sleep(0.05)
    _on_fresh_connections(url, lambda c: c.post("/predict/label", json=ROW))  # the new one serves
    counted = metric(_scrape(url), "proxy_http_requests_total", endpoint="/predict/label") - before
    assert counted >= 4001  # the 4,000 and those just sent, the stopped worker's among them
    assert second in _workers(supervisor)


def test_admin_changes_reload_and_sighup_reach_both_workers(
    triton: TritonServer, two_workers: tuple[str, int, Path]
) -> None:
    url, supervisor, tmp_path = two_workers
    started = _workers(supervisor)
    target = f"grpc://{triton.grpc_url}/setosa"
    with httpx.Client(base_url=url, timeout=30) as client:
        added = client.post("/admin/services", headers=AUTH, json={"name": "setosa_b", "target": target})
    assert added.status_code == 201, added.text
    for response in _on_fresh_connections(url, lambda c: c.post("/predict", json=ROW)):
        assert "setosa_b" in response.json()  # both workers call it at once
    for response in _on_fresh_connections(url, lambda c: c.get("/admin/services", headers=AUTH)):
        assert [c["service"] for c in response.json()["changes"]] == ["setosa_b"]
    assert [e["name"] for e in json.loads((tmp_path / "services.json").read_text())["services"]] == [
        "setosa",
        "setosa_b",
        "versicolor",
        "virginica",
    ]

    (tmp_path / "compositions.yaml").write_text(_composition(triton, "second"))
    with httpx.Client(base_url=url, timeout=30) as client:
        reloaded = client.post("/admin/reload", headers=AUTH)
    assert reloaded.status_code == 200 and reloaded.json()["outcome"] == "applied", reloaded.text
    for response in _on_fresh_connections(url, lambda c: c.post("/compositions/second/label", json=ROW)):
        assert response.status_code == 200

    (tmp_path / "compositions.yaml").write_text(_composition(triton, "third"))
    os.kill(supervisor, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while metric(_scrape(url), "proxy_config_generation") < 4:  # 1, the admin change, the reload, SIGHUP
        assert time.monotonic() < deadline, "SIGHUP did not reach both workers"
        time.sleep(0.05)
    for response in _on_fresh_connections(url, lambda c: c.post("/compositions/third/label", json=ROW)):
        assert response.status_code == 200
    text = _scrape(url)
    assert (
        metric(text, "proxy_config_reloads_total", outcome="applied") == 6
    )  # three reloads, two workers each
    assert metric(text, "proxy_config_last_reload_successful") == 1
    assert _workers(supervisor) == started  # reloaded in place: no worker replaced
