"""Load generators and CPU accounting.

HTTP targets are driven by ``wrk`` (C, cheap on the shared cores; its Lua ``done`` hook prints
exact percentiles). The direct fan-out has no HTTP endpoint to aim at: it is its own asyncio
client, measured the same way (closed loop, ``concurrency`` requests in flight).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

from bench.reaping import process_tree

WRK_TIMEOUT_S = 10  # wrk counts a request slower than this as an error instead of measuring it

_DONE_HOOK = """
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "status": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "timeout": %d, "p50": %d, "p90": %d, "p99": %d}\\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass
class Measurement:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process role during the run."""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_per_request_ms(self) -> dict[str, float]:
        return {role: 1000 * s / max(self.requests, 1) for role, s in self.cpu_s.items()}


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(
            "bench: wrk is not installed: apt-get install wrk (make bench does it when run as root)"
        )
    return path


def run_wrk(url: str, body: bytes, concurrency: int, seconds: float) -> Measurement:
    """POST ``body`` to ``url`` from ``concurrency`` connections for ``seconds``."""
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + _DONE_HOOK
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
        script_path = handle.name
    try:
        threads = min(concurrency, 2)
        result = subprocess.run(
            [wrk_path(), f"-t{threads}", f"-c{concurrency}", f"-d{max(seconds, 1):.0f}s",
             f"--timeout={WRK_TIMEOUT_S}s", "-s", script_path, url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        )  # fmt: skip
    finally:
        os.unlink(script_path)
    line = next(x for x in result.stdout.splitlines() if x.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON ") :])
    errors = sum(raw[k] for k in ("status", "connect", "read", "write", "timeout"))
    return Measurement(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=errors,
        p50_ms=raw["p50"] / 1000,
        p90_ms=raw["p90"] / 1000,
        p99_ms=raw["p99"] / 1000,
    )


def run_direct_fanout(grpc_url: str, models: list[str], concurrency: int, seconds: float) -> Measurement:
    """The three models called concurrently with the async tritonclient (gRPC), no proxy."""

    async def main() -> Measurement:
        client = grpcaio.InferenceServerClient(grpc_url)
        row = np.asarray([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
        output = grpcclient.InferRequestedOutput("probabilities")
        latencies: list[float] = []
        errors = 0

        async def call(model: str) -> Any:
            tensor = grpcclient.InferInput("input", list(row.shape), "FP32")
            tensor.set_data_from_numpy(row)
            result = await client.infer(model, [tensor], outputs=[output])
            return result.as_numpy("probabilities")

        async def worker(until: float) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    answers = await asyncio.gather(*(call(m) for m in models))
                    _ = int(np.argmax([a[0, 0] for a in answers]))  # the same aggregation as the proxy
                except Exception:  # counted, like wrk's errors
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        try:
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(*(worker(until) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        finally:
            await client.close()
        values = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
        return Measurement(
            requests=len(latencies),
            seconds=elapsed,
            errors=errors,
            p50_ms=float(np.percentile(values, 50)),
            p90_ms=float(np.percentile(values, 90)),
            p99_ms=float(np.percentile(values, 99)),
        )

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


# -- CPU accounting -----------------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


class CpuMeter:
    """CPU seconds used by named process trees between ``start()`` and ``stop()``."""

    def __init__(self, roles: dict[str, int]) -> None:
        self.roles = roles
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {role: sum(_cpu_seconds(p) for p in process_tree(pid)) for role, pid in self.roles.items()}

    def start(self) -> None:
        self._before = self._read()
        self._own = time.process_time()

    def stop(self, include_self_as: str | None = None) -> dict[str, float]:
        after = self._read()
        used = {role: max(after[role] - self._before.get(role, 0.0), 0.0) for role in self.roles}
        if include_self_as:
            used[include_self_as] = time.process_time() - self._own
        return used


def interleaved_runs(
    proxies: dict[str, tuple[str, int]],
    path: str,
    body: bytes,
    concurrency: int,
    repeats: int,
    seconds: float,
    triton_pid: int,
    section: str,
) -> dict[str, list[Measurement]]:
    """wrk on ``path`` of each proxy (name -> (URL, pid)) in turn, ``repeats`` times, each run
    with the CPU its proxy and Triton used; each run printed under ``section``."""
    measured: dict[str, list[Measurement]] = {}
    width = max(len(name) for name in proxies)
    for repeat in range(repeats):
        for name, (url, pid) in proxies.items():
            meter = CpuMeter({"proxy": pid, "triton": triton_pid})
            meter.start()
            m = run_wrk(f"{url}{path}", body, concurrency, seconds)
            m.cpu_s = meter.stop()
            measured.setdefault(name, []).append(m)
            print(
                f"c={concurrency:<3} run {repeat + 1}/{repeats} {section}, {name:<{width}} "
                f"{m.throughput:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
                f"errors {m.errors}",
                flush=True,
            )
    return measured
