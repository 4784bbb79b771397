"""``python -m bench.soak`` (``make soak``): the proxy under steady load for minutes.

Drives ``/predict/label`` with wrk in consecutive windows and, after each, reads the proxy's
resident memory and open file descriptors from ``/proc``. Reports 5xx (and any other
non-2xx or socket error), p99 per window (is it stable over time?), memory growth per 10,000
requests after the first window (the warm-up) and the descriptors at start and end.
Writes ``bench/results/soak.md``; exits 1 when a request failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.loadgen import run_wrk
from bench.processes import start_proxy, stop_on_sigterm
from local_triton import TritonServer

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2]]}).encode()


@dataclass
class Window:
    end_s: float
    requests: int
    errors: int
    throughput: float
    p50_ms: float
    p99_ms: float
    rss_mb: float
    fds: int


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@dataclass(frozen=True)
class Resources:
    rss_mb: float
    fds: int


def soak(seconds: float, concurrency: int, window: float) -> tuple[list[Window], Resources, Resources]:
    """The windows, the proxy's resources before the load, and after it (connections closed)."""
    windows: list[Window] = []
    with ExitStack() as stack:
        triton = stack.enter_context(TritonServer(http_port=0, grpc_port=0, metrics_port=0))
        url, pid = start_proxy(stack, triton, "grpc")
        # One request first, so that "idle" includes what every later one reuses (the channel to Triton).
        warm = urllib.request.Request(
            f"{url}/predict/label", data=BODY, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(warm, timeout=10) as response:
            response.read()
        start_rss, start_fds = rss_mb(pid), open_fds(pid)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            m = run_wrk(f"{url}/predict/label", BODY, concurrency, window)
            windows.append(
                Window(
                    end_s=time.monotonic() - started,
                    requests=m.requests,
                    errors=m.errors,
                    throughput=m.throughput,
                    p50_ms=m.p50_ms,
                    p99_ms=m.p99_ms,
                    rss_mb=rss_mb(pid),
                    fds=open_fds(pid),
                )
            )
            w = windows[-1]
            print(
                f"{w.end_s:7.1f} s  {w.throughput:7.0f} req/s  p50 {w.p50_ms:6.2f} ms  "
                f"p99 {w.p99_ms:6.2f} ms  "
                f"errors {w.errors}  rss {w.rss_mb:6.1f} MB  fds {w.fds}",
                flush=True,
            )
        # After the load: wrk's connections close; give the proxy a moment to let them go.
        settle_until = time.monotonic() + 5
        while open_fds(pid) > start_fds and time.monotonic() < settle_until:
            time.sleep(0.1)
        after = Resources(rss_mb(pid), open_fds(pid))
    return windows, Resources(start_rss, start_fds), after


def growth_per_10k(windows: list[Window]) -> float | None:
    """MB of RSS per 10,000 requests, the slope after the first (warm-up) window."""
    after = windows[1:]
    if len(after) < 2:
        return None
    done = np.cumsum([w.requests for w in after])
    slope = np.polyfit(done, [w.rss_mb for w in after], 1)[0]
    return float(slope * 10_000)


def render(windows: list[Window], idle: Resources, after: Resources, concurrency: int, window: float) -> str:
    start_rss, start_fds = idle.rss_mb, idle.fds
    total = sum(w.requests for w in windows)
    errors = sum(w.errors for w in windows)
    p99s = [w.p99_ms for w in windows[1:]] or [w.p99_ms for w in windows]
    growth = growth_per_10k(windows)
    lines = [
        "# Soak: the proxy under steady load",
        "",
        f"- command: `make soak` (`python -m bench.soak`), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- load: wrk, concurrency {concurrency}, `/predict/label` over gRPC, "
        f"{len(windows)} windows of {window:g} s",
        f"- requests: {total:,}; failed (non-2xx or socket errors): {errors}",
        f"- p99 per window after the first: min {min(p99s):.1f} ms, median {float(np.median(p99s)):.1f} ms, "
        f"max {max(p99s):.1f} ms",
        f"- proxy RSS: {start_rss:.1f} MB idle, {windows[0].rss_mb:.1f} MB after the first window, "
        f"{windows[-1].rss_mb:.1f} MB at the end; growth after warm-up: "
        + (f"{growth:+.3f} MB per 10,000 requests" if growth is not None else "n/a (too short)"),
        f"- proxy open file descriptors: {start_fds} idle, {windows[-1].fds} at the end "
        f"(max {max(w.fds for w in windows)})",
        f"- after the load: proxy RSS {after.rss_mb:.1f} MB, {after.fds} open file descriptors",
        "",
        "| window end (s) | req/s | p50 ms | p99 ms | errors | RSS MB | fds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        lines.append(
            f"| {w.end_s:.0f} | {w.throughput:,.0f} | {w.p50_ms:.2f} | {w.p99_ms:.2f} | {w.errors} | "
            f"{w.rss_mb:.1f} | {w.fds} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0, help="total load time")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--window", type=float, default=15.0, help="seconds per measured window")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    windows, idle, after = soak(args.seconds, args.concurrency, args.window)
    report = render(windows, idle, after, args.concurrency, args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(report)
    print(report)
    return 1 if any(w.errors for w in windows) else 0


if __name__ == "__main__":
    sys.exit(main())
