"""``make bench``'s workers section: what ``PROXY_WORKERS=2`` gives against one worker.

Two proxies on the same Triton, one with one worker and one with two (metrics on: the workers
share them, ``client_proxy.workers``), each answering ``/predict/label`` over gRPC to Triton; wrk
at each concurrency, runs interleaved, medians. For each: requests per second, p50 and p99, the
CPU of every process of the proxy (its workers and their supervisor) and of Triton per request,
and requests per second per proxy core (1 / the proxy's CPU per request: what the design gives
for each core a deployment gives it). Then ``GET /metrics``, which with two workers gathers the
other worker's figures: its median time.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from contextlib import ExitStack

from bench.loadgen import Measurement, interleaved_runs, run_wrk
from bench.processes import start_proxy
from local_triton import TritonServer

LEVELS = (16, 64)
WORKERS = (1, 2)
BODY = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2]]}).encode()
SCRAPES = 20


def _wait_for_workers(url: str, workers: int, timeout: float = 60) -> None:
    """Until ``workers`` processes answer on new connections (a request id begins with its
    process's own prefix): the port answers as soon as the first worker is up."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {workers} workers did not all start at {url}")
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            seen.add(response.headers["X-Request-ID"][:16])


def _scrape_ms(url: str) -> float:
    times = []
    for _ in range(SCRAPES):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            response.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def workers_section(triton: TritonServer, seconds: float, repeats: int, warmup: float) -> str:
    triton_pid = triton.pid
    assert triton_pid is not None
    results: dict[tuple[int, int], list[Measurement]] = {}
    with ExitStack() as stack:
        proxies = {
            n: start_proxy(stack, triton, "grpc", extra_env={"PROXY_WORKERS": str(n)}) for n in WORKERS
        }
        for workers, (url, _) in proxies.items():
            _wait_for_workers(url, workers)
        named = {f"workers={n}": proxies[n] for n in WORKERS}
        for concurrency in LEVELS:
            for url, _ in proxies.values():
                run_wrk(f"{url}/predict/label", BODY, concurrency, warmup)
            measured = interleaved_runs(
                named, "/predict/label", BODY, concurrency, repeats, seconds, triton_pid, "several workers"
            )
            for n in WORKERS:
                results[n, concurrency] = measured[f"workers={n}"]
        scrape = {workers: _scrape_ms(url) for workers, (url, _) in proxies.items()}

    lines = [
        "",
        "## Several workers",
        "",
        "The same proxy with `PROXY_WORKERS=1` and `=2` on the same Triton, `/predict/label` over gRPC "
        "to Triton; metrics on (with two workers, each scrape gathers both). CPU per request counts "
        "every process of the proxy; requests per proxy core is 1 / that.",
        "",
        "| workers | concurrency | req/s | p50 ms | p99 ms | errors | proxy CPU ms/req | Triton CPU ms/req "
        "| req/s per proxy core |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    throughput: dict[tuple[int, int], float] = {}
    for (workers, concurrency), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        median = sorted(runs, key=lambda m: m.throughput)[len(runs) // 2]
        throughput[workers, concurrency] = median.throughput
        proxy_ms = statistics.median(m.cpu_per_request_ms()["proxy"] for m in runs)
        triton_ms = statistics.median(m.cpu_per_request_ms()["triton"] for m in runs)
        per_core = 1000 / proxy_ms if proxy_ms else 0.0
        lines.append(
            f"| {workers} | {concurrency} | {median.throughput:.0f} | {median.p50_ms:.2f} | "
            f"{median.p99_ms:.2f} | {sum(m.errors for m in runs)} | {proxy_ms:.3f} | {triton_ms:.3f} | "
            f"{per_core:.0f} |"
        )
    ratios = ", ".join(
        f"c={c}: {throughput[2, c] / throughput[1, c]:.2f}x" for c in LEVELS if throughput.get((1, c))
    )
    lines += [
        "",
        f"Two workers against one, requests per second: {ratios}. `GET /metrics` takes "
        f"{scrape[1]:.1f} ms with one worker and {scrape[2]:.1f} ms with two (median of {SCRAPES}).",
        "",
    ]
    return "\n".join(lines)
