"""``make bench``'s connections section: the proxy at 256 connections (errors, and the latency
of what it answers), and the memory one more client connection costs it.

Memory: the proxy's resident set (``VmRSS``) before and after ``IDLE_CONNECTIONS`` keep-alive
connections are opened, each having sent one ``GET /health`` and read its answer (so that
the proxy holds a live HTTP protocol for each, as it does for real clients between requests),
divided by their number. The connections are then closed.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from bench.loadgen import Measurement, run_wrk

CONCURRENCY = 256
IDLE_CONNECTIONS = 1000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _hold(host: str, port: int, count: int, pid: int) -> tuple[int, int]:
    """(KiB before, KiB after) ``count`` connections are open and have each had one answer."""
    before = rss_kib(pid)
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            streams.append((reader, writer))
        for reader, _ in streams:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
        await asyncio.sleep(1.0)
        return before, rss_kib(pid)
    finally:
        for _, writer in streams:
            writer.close()


def connections_section(
    proxies: dict[str, tuple[str, int]], body: bytes, seconds: float, repeats: int
) -> str:
    """``proxies``: row name -> (base URL, pid)."""
    loaded: dict[str, list[Measurement]] = {}
    memory: dict[str, float] = {}
    for _ in range(repeats):
        for name, (url, _) in proxies.items():
            loaded.setdefault(name, []).append(run_wrk(f"{url}/predict/label", body, CONCURRENCY, seconds))
    for name, (url, pid) in proxies.items():
        host, _, port = url.removeprefix("http://").rpartition(":")
        before, after = asyncio.run(_hold(host, int(port), IDLE_CONNECTIONS, pid))
        memory[name] = (after - before) / IDLE_CONNECTIONS
    errors = sum(m.errors for runs in loaded.values() for m in runs)
    lines = [
        "",
        f"## Connections: {CONCURRENCY} at once, and memory per connection",
        "",
        f"wrk at c={CONCURRENCY} on `/predict/label`, {repeats} run(s) of {seconds:g} s, medians "
        "(errors summed). "
        f"Memory: the proxy's resident set before and after {IDLE_CONNECTIONS:,} idle keep-alive connections "
        "that have each had one answer, per connection.",
        "",
        f"| proxy | c={CONCURRENCY} req/s | p50 ms | p99 ms | errors | KiB per idle connection |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in loaded.items():
        lines.append(
            f"| {name} | {statistics.median(m.throughput for m in runs):,.0f} | "
            f"{statistics.median(m.p50_ms for m in runs):.2f} | "
            f"{statistics.median(m.p99_ms for m in runs):.1f} | "
            f"{sum(m.errors for m in runs)} | {memory[name]:.1f} |"
        )
    lines += [
        "",
        f"Target: no error at c={CONCURRENCY}: {errors} error(s), {'yes' if errors == 0 else '**no**'}.",
    ]
    return "\n".join(lines) + "\n"
