"""``make bench``'s harness, end to end in smoke mode: it runs, and writes its report and plot.

No figure is asserted: performance is measured by ``make bench``, never by a unit test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import ROOT
from .helpers import short_tmpdir

ROWS = [
    "Triton iris_ensemble, direct (HTTP)",
    "direct fan-out, async tritonclient (gRPC)",
    "proxy /predict/label over gRPC",
    "proxy /predict/label over HTTP",
    "proxy /predict/stream over gRPC",
    "proxy /predict/label?route=ensemble over gRPC",
    "seed design (FastAPI services, httpx client per request)",
    "Triton BLS iris_bls, direct (HTTP)",
]


@pytest.mark.timeout(600)  # every section once, Ray Serve's cluster started and stopped among them
def test_bench_smoke_writes_the_report_and_the_plot(tmp_path: Path) -> None:
    result = _bench(["--smoke", "--out", str(tmp_path)], timeout=570)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (tmp_path / "latest.md").read_text()
    for row in ROWS:
        for concurrency in (1, 16):
            assert f"| {row} | {concurrency} |" in report, (row, concurrency)
    assert "## Targets" in report and "machine:" in report
    # The resilience rows: a slow replica (balancing, hedging) and overload (shedding).
    assert "## A slow replica: balancing and hedging" in report and "## Overload: 1,024 connections" in report
    for row in ("pausing, p2c, hedging p95", "slow calls, p2c, hedging p95", "bound 512 (default)"):
        assert f"| {row} |" in report, row
    # 256 connections and the memory each costs the proxy.
    assert "## Connections: 256 at once, and memory per connection" in report
    for row in ("proxy over gRPC", "proxy over HTTP"):
        assert f"| {row} |" in report, row
    # The proxy's profiles: each a table, or the reason it could not be taken (py-spy needs ptrace).
    assert "## Where the proxy's CPU goes (py-spy)" in report
    assert "## Rules and webhooks" in report
    for row in ("no rules", "rule, no webhook", "receiver answers at once",
                "receiver down (connection refused)", "receiver slow (answers after 1 s)",
                "receiver answers 500"):  # fmt: skip
        assert f"| {row} |" in report, row
    # Peers: Triton's ensemble, BLS and the proxy; Ray Serve, or the reason it was not measured.
    peers = report.split("## Peers", 1)[1].split("\n## ", 1)[0]
    for row in ("Triton's ensemble", "Triton BLS", "proxy"):
        for concurrency in (1, 16):
            assert f"| {row} | {concurrency} |" in peers, (row, concurrency)
    assert "| Ray Serve | 16 |" in peers or "Ray Serve was not measured on this machine: " in peers
    assert "Where a peer is ahead of the proxy: " in peers or "No peer is ahead" in peers
    # Shadows: none, on every request, sampled; every shadow's copies were answered or dropped.
    assert "## Shadows" in report
    shadows = report.split("## Shadows", 1)[1].split("\n## ", 1)[0]
    for row in ("no experiment", "shadow on every request", "shadow on 10 % (sampled)"):
        assert f"| {row} |" in shadows, row
    every = next(line for line in shadows.splitlines() if line.startswith("| shadow on every request |"))
    assert int(every.split("|")[-3].strip().replace(",", "")) > 0  # copies answered
    # Several workers: one and two, each measured, and the ratio between them.
    several = report.split("## Several workers", 1)[1].split("\n## ", 1)[0]
    for workers in (1, 2):
        assert f"| {workers} | 16 |" in several, workers
    assert "Two workers against one, requests per second: c=16: " in several
    # Inputs by key: the three ways on each store, and where the time goes.
    assert "## Inputs by key" in report and "Where the time goes" in report
    for store in ("sqlite", "redis", "postgresql"):
        for way in ("rows in the body", "keys fetched by the proxy", "keys fetched by the models"):
            assert f"| {store} | {way} |" in report, (store, way)
    for title in (
        "`/predict/label` over gRPC, wrk c=16 (now)",
        "`/predict/label` over gRPC, wrk c=16 (before: grpcio's server and client)",
        "the gRPC door, perf_analyzer c=16 (now)",
        "the gRPC door, perf_analyzer c=16 (before: grpcio's server and client)",
    ):
        section = report.split(f"#### {title}", 1)[1].split("####", 1)[0]
        assert "| on the stack |" in section or "Not measured: " in section, title
    assert "| proxy iris_fanout, gRPC, grpcio server and client (before) | 16 |" in report
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report in result.stdout  # printed as well as written


def _bench(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench args``; past ``timeout`` it is stopped as a user would (SIGTERM, so it
    stops the servers it started; subprocess.run's timeout would SIGKILL it) and the test fails."""
    with (
        short_tmpdir() as tmpdir,  # the bench's temporary directories and Ray's, not /tmp/ray
        subprocess.Popen(
            [sys.executable, "-m", "bench", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TMPDIR": str(tmpdir)},
        ) as process,
    ):  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=120)
            pytest.fail(f"the bench took over {timeout:.0f} s: {stdout[-2000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _bench_measuring(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """The smoke bench, once it has started its servers and measures; and its descendants."""
    output = tmp_path / "bench.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench", "--smoke", "--skip-seed", "--out", str(tmp_path)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            # its temporary directories here: a bench killed outright leaves them behind
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)},
        )  # fmt: skip
    while b" run 1/1 " not in output.read_bytes():
        assert process.poll() is None, output.read_text()[-2000:]
        time.sleep(0.2)
    children = psutil.Process(process.pid).children(recursive=True)
    names = {child.name() for child in children}
    assert "tritonserver" in names and sum(n.startswith("python") for n in names) >= 1, names
    return process, children


def _left(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of ``processes`` still running (not zombies) after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_a_bench_stopped_with_sigterm_stops_every_server_it_started(tmp_path: Path) -> None:
    # As CI's or a user's timeout stops it: the bench unwinds and stops Triton and its proxies.
    process, children = _bench_measuring(tmp_path)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    left = _left(children, within=30)
    for child in left:
        child.kill()
    assert code == 128 + signal.SIGTERM  # it exited as SIGTERM asks, through its cleanup
    assert not left, [(child.pid, child.name()) for child in left]


@pytest.mark.timeout(300)
def test_a_bench_killed_outright_still_takes_its_servers_with_it(tmp_path: Path) -> None:
    # SIGKILL runs no cleanup: each server the bench started gets SIGTERM when it dies (Linux).
    process, children = _bench_measuring(tmp_path)
    process.kill()
    process.wait()
    left = _left(children, within=60)
    for child in left:
        child.kill()
    assert not left, [(child.pid, child.name()) for child in left]


def test_a_reference_that_completed_nothing_is_not_measured_rather_than_a_crash() -> None:
    # Seen in CI: a short smoke window on a loaded machine, the seed's design at c=16 finished
    # no request at all, and the ratio divided by zero.
    from bench.loadgen import Measurement
    from bench.report import CPU_TARGET_MS, THROUGHPUT_TARGET, Row, check_targets

    def measured(per_second: float) -> Measurement:
        return Measurement(int(per_second * 5), 5.0, 0, 1.0, 2.0, 3.0)

    rows = [
        Row("proxy", 16, measured(500)),
        Row("ensemble", 16, measured(1000)),
        Row("seed", 16, measured(0)),
    ]
    verdicts = {v.target: v for v in check_targets(rows, "ensemble", "direct", "proxy", "seed")}
    seed = verdicts["proxy throughput at c=16 >= 40x the seed's design"]
    assert (seed.measured, seed.holds) == ("not measured", None)
    throughput = verdicts[f"proxy throughput at c=16 >= {THROUGHPUT_TARGET}x iris_ensemble direct"]
    assert (throughput.measured, throughput.holds) == ("0.50x", False)
    assert (
        verdicts[f"proxy CPU per request at c=16 <= {CPU_TARGET_MS} ms"].holds is None
    )  # no CPU was metered


def test_a_py_spy_profile_is_read_into_shares_of_samples() -> None:
    from bench.cpu_profile import parse

    raw = (
        "<module> (client_proxy/__main__.py:54);Runner.run (asyncio/runners.py:118) 50\n"
        "<module> (client_proxy/__main__.py:54);Runner.run (asyncio/runners.py:118);"
        "serve (client_proxy/api/fastlane.py:122);infer (client_proxy/core/served.py:350) 30\n"
        "<module> (client_proxy/__main__.py:54);Runner.run (asyncio/runners.py:118);"
        "serve (client_proxy/api/fastlane.py:125) 20\n"
    )
    profile = parse(raw)
    assert profile.samples == 100
    # The entry frames (on every stack) are left out of "on the stack"; lines of one function merge.
    assert profile.inclusive == [
        ("serve (client_proxy/api/fastlane.py)", 0.5),
        ("infer (client_proxy/core/served.py)", 0.3),
    ]
    assert profile.self[0] == ("Runner.run (asyncio/runners.py)", 0.5)
