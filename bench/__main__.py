"""``python -m bench`` (``make bench``): every configuration that gives the label, side by side.

Rows: Triton's ``iris_ensemble`` called directly (the ceiling: the same work, fanned out inside
Triton), the three models called concurrently by an async tritonclient with no proxy, the
proxy's ``/predict/label`` over gRPC and over HTTP, its ``/predict/stream``, and the seed's
design rebuilt for comparison. Each at several concurrencies, repeated, medians reported, with
ratios to the ceiling and to the seed's design measured in the same run. Then the Open Inference
Protocol doors (perf_analyzer), 256 connections and the memory per connection
(``bench.connections``), a slow replica (balancing, hedging) and overload (shedding):
``bench.resilience``; rules whose webhook receivers are healthy, down, slow or failing:
``bench.alerts``; inputs by key, read by the proxy or by the models, from each store:
``bench.by_key``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import (
    alerts,
    by_key,
    connections,
    cpu_profile,
    peer_bench,
    perf_analyzer,
    resilience,
    shadows,
    workers,
)
from bench.loadgen import CpuMeter, Measurement, run_direct_fanout, run_wrk
from bench.otlp_receiver import Receiver, otlp_receiver
from bench.peer_bench import BLS, RAY
from bench.processes import MODELS, serve, start_proxy, stop_on_sigterm
from bench.reaping import process_tree
from bench.report import Row, check_targets, render_markdown, render_plot
from local_triton import TRITON_RELEASE, TRITON_SERVER_VERSION, TritonServer, free_ports

ROOT = Path(__file__).resolve().parent.parent
SEED_ROW = [[1.0, 2.0, 3.0, 4.0]]
PROXY_BODY = json.dumps({"data": SEED_ROW}).encode()
ENSEMBLE_BODY = json.dumps(
    {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": SEED_ROW}],
        "outputs": [{"name": "class_name"}, {"name": "proba"}],
    }
).encode()

BLS_BODY = peer_bench.bls_body("iris_bls", SEED_ROW)

CEILING = "Triton iris_ensemble, direct (HTTP)"
DIRECT = "direct fan-out, async tritonclient (gRPC)"
PROXY_GRPC = "proxy /predict/label over gRPC"
PROXY_HTTP = "proxy /predict/label over HTTP"
PROXY_STREAM = "proxy /predict/stream over gRPC"
PROXY_ENSEMBLE = "proxy /predict/label?route=ensemble over gRPC"
PROXY_TRACED = "proxy /predict/label over gRPC, tracing on"
PROXY_SAMPLED = "proxy /predict/label over gRPC, tracing 1% sampled"
SEED = "seed design (FastAPI services, httpx client per request)"


@dataclass
class Target:
    name: str
    run: Callable[[int, float], Measurement]
    roles: dict[str, int]
    """Process trees whose CPU this configuration uses."""
    self_role: str | None = None


def _seed_design(stack: ExitStack) -> tuple[str, list[int]]:
    ports = free_ports(len(MODELS) + 1)
    env = dict(os.environ)
    pids = []
    services = []
    for model, port in zip(MODELS, ports[1:], strict=True):
        args = [sys.executable, "-m", "bench.seed_design", "service", model, "--port", str(port)]
        pids.append(stack.enter_context(serve(args, env, f"http://127.0.0.1:{port}/health")).pid)
        services.append(f"{model}=http://127.0.0.1:{port}")
    args = [
        sys.executable,
        "-m",
        "bench.seed_design",
        "proxy",
        "--port",
        str(ports[0]),
        "--services",
        ",".join(services),
    ]
    url = f"http://127.0.0.1:{ports[0]}"
    process = stack.enter_context(serve(args, env, f"{url}/docs"))
    return url, [process.pid, *pids]


def _check_answer(url: str, body: bytes, expected: str) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    if expected not in text:
        raise SystemExit(f"bench: {url} answered {text[:200]!r}, expected the label {expected!r}")


def _measure(target: Target, concurrency: int, seconds: float) -> Measurement:
    meter = CpuMeter(target.roles)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter.start()
    measurement = target.run(concurrency, seconds)
    cpu = meter.stop(include_self_as=target.self_role)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    loadgen = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    if target.self_role is None:
        cpu["load generator"] = loadgen
    measurement.cpu_s = cpu
    return measurement


def _median(measurements: list[Measurement]) -> Measurement:
    by_throughput = sorted(measurements, key=lambda m: m.throughput)
    middle = by_throughput[len(by_throughput) // 2]
    roles = {role for m in measurements for role in m.cpu_s}
    return Measurement(
        requests=middle.requests,
        seconds=middle.seconds,
        errors=sum(m.errors for m in measurements),
        p50_ms=statistics.median(m.p50_ms for m in measurements),
        p90_ms=statistics.median(m.p90_ms for m in measurements),
        p99_ms=statistics.median(m.p99_ms for m in measurements),
        cpu_s={
            role: statistics.median(m.cpu_s.get(role, 0.0) / max(m.requests, 1) for m in measurements)
            * middle.requests
            for role in roles
        },
    )


OIP = (
    ("Triton iris_ensemble, gRPC", "iris_ensemble", "grpc"),
    ("proxy iris_fanout, gRPC (:9001)", "iris_fanout", "grpc"),
    ("proxy iris_fanout, gRPC, grpcio server and client (before)", "iris_fanout", "grpc"),
    ("Triton iris_ensemble, HTTP", "iris_ensemble", "http"),
    ("proxy iris_fanout, HTTP (/v2)", "iris_fanout", "http"),
)


#: perf_analyzer against the proxy's gRPC door over perf_analyzer against Triton's gRPC, at c=16.
OIP_TARGET = 1.0


def _perf_analyzer(
    args: argparse.Namespace,
    levels: list[int],
    triton: TritonServer,
    http_proxy: str,
    grpc_door: str,
    grpcio_door: str,
) -> str:
    """The Open Inference Protocol doors measured by perf_analyzer (interleaved, medians), as a
    markdown section; a line saying why when perf_analyzer is not installed."""
    if perf_analyzer.binary() is None:
        return "\n## perf_analyzer\n\nNot installed (`make perf-analyzer`): not measured.\n"
    urls = dict(zip([name for name, _, _ in OIP], [
        triton.grpc_url, grpc_door, grpcio_door, triton.http_url, http_proxy.removeprefix("http://"),
    ], strict=True))  # fmt: skip
    interval = 1000 if args.smoke else int(args.seconds * 1000)
    levels = [16] if 16 in levels else levels[-1:]  # the level the targets are set at
    found: dict[tuple[str, int], list[perf_analyzer.Result]] = {}
    for concurrency in levels:
        for repeat in range(args.repeats):
            for name, model, protocol in OIP:
                result = perf_analyzer.run(
                    urls[name], model, protocol, concurrency, interval, 100 if args.smoke else 10
                )
                found.setdefault((name, concurrency), []).append(result)
                print(
                    f"c={concurrency:<3} run {repeat + 1}/{args.repeats} perf_analyzer {name:<36} "
                    f"{result.throughput:8.1f} infer/s  p50 {result.p50_ms:7.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms  (stable within {result.stability_percentage}%)",
                    flush=True,
                )
    loose = sum(r.stability_percentage > 10 for results in found.values() for r in results)
    lines = [
        "",
        "## The Open Inference Protocol doors, measured by perf_analyzer",
        "",
        "perf_analyzer (the tritonclient 2.50.0 wheel's, unmodified) against Triton's `iris_ensemble` and "
        "the proxy's `iris_fanout` (the same inputs and outputs), one row per request, "
        f"{args.repeats} interleaved run(s) per row, medians; until stable, windows of {interval} ms "
        f"(within 10%; {loose} run(s) that did not settle were run again accepting "
        f"{perf_analyzer.LOOSE_STABILITY_PERCENTAGE}%). The door is served by the proxy's own HTTP/2 "
        "server and the proxy calls Triton with its own client; the row marked before is the same proxy "
        "with grpcio's server and client instead (`PROXY_GRPC_SERVER=grpcio PROXY_GRPC_CLIENT=grpcio`), "
        "the design until both were replaced.",
        "",
        "| door | concurrency | infer/s | vs Triton, same protocol | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in levels:
        medians = {
            name: (
                statistics.median(r.throughput for r in results),
                statistics.median(r.p50_ms for r in results),
                statistics.median(r.p99_ms for r in results),
            )
            for (name, c), results in found.items()
            if c == concurrency
        }
        ratios: dict[str, list[float]] = {}
        for name, model, protocol in OIP:
            throughput, p50, p99 = medians[name]
            ratio = ""
            if model == "iris_fanout":
                reference = next(n for n, m, p in OIP if m == "iris_ensemble" and p == protocol)
                ratios[name] = _paired_ratios(found[(name, concurrency)], found[(reference, concurrency)])
                ratio = f"{statistics.median(ratios[name]):.2f}x"
            lines.append(f"| {name} | {concurrency} | {throughput:,.0f} | {ratio} | {p50:.2f} | {p99:.2f} |")
        if concurrency == 16:
            pairs = ratios[OIP[1][0]]
            door_ratio = statistics.median(pairs)
            holds = "yes" if door_ratio >= OIP_TARGET else "**no**"
            lines += [
                "",
                "The ratios are medians of each repeat's pair (the door's run over Triton's run just "
                "before it), steadier than a ratio of medians when the machine's speed drifts between "
                "repeats.",
                "",
                f"Target: the gRPC door at c=16 >= {OIP_TARGET}x Triton's: {door_ratio:.2f}x, {holds} "
                f"(pairs: {', '.join(f'{r:.2f}' for r in pairs)}).",
            ]
    return "\n".join(lines) + "\n"


def _paired_ratios(door: list[perf_analyzer.Result], reference: list[perf_analyzer.Result]) -> list[float]:
    """Each repeat's door throughput over the reference's in the same repeat."""
    pairs = zip(door, reference, strict=True)
    return [d.throughput / r.throughput if r.throughput else 0.0 for d, r in pairs]


#: The proxy's gRPC as it was before its own HTTP/2 server and client: grpcio's.
GRPCIO = {"PROXY_GRPC_SERVER": "grpcio", "PROXY_GRPC_CLIENT": "grpcio"}
_WHEN = {"lean": "now", "grpcio": "before: grpcio's server and client"}


def _profiles(
    args: argparse.Namespace, proxies: dict[str, tuple[str, int]], doors: dict[str, tuple[str, int]]
) -> str:
    """Where the proxy's CPU goes at c=16, now and before (grpcio's server and client):
    ``/predict/label`` under wrk, the gRPC door under perf_analyzer (py-spy); a line saying why
    when it cannot be measured."""
    seconds = 2 if args.smoke else 8
    head = [
        "",
        "## Where the proxy's CPU goes (py-spy)",
        "",
        f"py-spy samples the proxy at {cpu_profile.RATE_HZ} Hz for {seconds} s under 16 requests in flight. "
        "On the stack: the share of samples a function was running or waiting under; at the top: "
        "running itself. `Runner.run` at the top is the event loop's own native code (uvloop) with the C "
        "extensions it calls (grpc's Cython, protobuf); `Thread.run` is grpc's poller thread. A stack py-spy "
        "could not read whole counts at the top only.",
        "",
    ]
    if cpu_profile.binary() is None:
        return "\n".join([*head, "py-spy is not installed: not measured.", ""])
    loads: list[tuple[str, int, Callable[[], object]]] = []
    for kind, (url, pid) in proxies.items():
        loads.append((
            f"`/predict/label` over gRPC, wrk c=16 ({_WHEN[kind]})", pid,
            functools.partial(run_wrk, f"{url}/predict/label", PROXY_BODY, 16, seconds + 2),
        ))  # fmt: skip
    if perf_analyzer.binary() is not None:
        for kind, (door, pid) in doors.items():
            loads.append((
                f"the gRPC door, perf_analyzer c=16 ({_WHEN[kind]})", pid, functools.partial(
                    perf_analyzer.run, door, "iris_fanout", "grpc", 16, seconds * 500, 100
                ),
            ))  # fmt: skip
    lines = head
    for title, pid, load in loads:
        try:
            lines += cpu_profile.render(title, cpu_profile.record(pid, seconds, load))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            lines += [f"#### {title}", "", f"Not measured: {exc}", ""]
    return "\n".join(lines)


def _tracing_section(
    results: dict[tuple[str, int], list[Measurement]],
    levels: list[int],
    receiver: Receiver,
    traced_requests: int,
) -> str:
    """What tracing on costs the proxy: the traced proxy (every request, then one in a hundred)
    against the same proxy untraced, run interleaved with it in the main table (medians of the
    same runs)."""
    lines = [
        "",
        "## Tracing on",
        "",
        "The proxy over gRPC with OpenTelemetry tracing on against the same proxy with tracing off, in",
        "the same interleaved runs as the table above: every request sampled (a request span, a span",
        "per service and one per Triton call, exported over OTLP/HTTP to a receiver in the",
        "benchmark's process), and one in a hundred (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`,",
        "`OTEL_TRACES_SAMPLER_ARG=0.01`). Triton is not tracing here (its cost is Triton's).",
        "",
        "| concurrency | sampled | req/s off | req/s on | on / off | p50 off (ms) | p50 on (ms) "
        "| p99 off (ms) | p99 on (ms) | proxy CPU/request off (ms) | on (ms) | added (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in levels:
        off = _median(results[(PROXY_GRPC, concurrency)])
        cpu_off = off.cpu_per_request_ms().get("proxy", 0.0)
        for name, share in ((PROXY_TRACED, "all"), (PROXY_SAMPLED, "1%")):
            on = _median(results[(name, concurrency)])
            cpu_on = on.cpu_per_request_ms().get("proxy", 0.0)
            ratio = on.throughput / off.throughput if off.throughput else 0.0
            lines.append(
                f"| {concurrency} | {share} | {off.throughput:.0f} | {on.throughput:.0f} | {ratio:.2f}x "
                f"| {off.p50_ms:.2f} | {on.p50_ms:.2f} | {off.p99_ms:.2f} | {on.p99_ms:.2f} "
                f"| {cpu_off:.3f} | {cpu_on:.3f} | {cpu_on - cpu_off:+.3f} |"
            )
    per_request = receiver.count / traced_requests if traced_requests else 0.0
    lines += [
        "",
        f"Spans received: {receiver.count} in {receiver.posts} exports, {per_request:.1f} per request "
        "measured with every request sampled (warm-up requests are traced too; the 1% proxy's spans "
        "are among them).",
        "",
    ]
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"Triton {TRITON_SERVER_VERSION} ({TRITON_RELEASE}) embedded, CPU only"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measured run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians are reported")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="report directory")
    parser.add_argument("--smoke", action="store_true", help="a short run that proves the harness works")
    parser.add_argument("--skip-seed", action="store_true", help="leave out the seed's design")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    if args.smoke:
        args.concurrency, args.seconds, args.repeats, args.warmup = "1,16", 1.0, 1, 0.5
    levels = [int(c) for c in args.concurrency.split(",")]

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with ExitStack() as stack:
        # model_repository/ and the BLS peers (bench/peer_bench.py), in one Triton.
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        triton = stack.enter_context(
            TritonServer(
                model_repository=peer_bench.triton_repository(folder),
                http_port=0,
                grpc_port=0,
                metrics_port=0,
            )
        )
        triton_pid = triton.pid
        assert triton_pid is not None
        grpc_door, grpcio_door = free_ports(2)
        grpc_proxy, grpc_pid = start_proxy(stack, triton, "grpc", grpc_port=grpc_door)
        grpcio_proxy, grpcio_pid = start_proxy(stack, triton, "grpc", extra_env=GRPCIO, grpc_port=grpcio_door)
        http_proxy, http_pid = start_proxy(stack, triton, "http")
        # The same proxy with tracing on (every request sampled), exporting to a receiver here.
        receiver = stack.enter_context(otlp_receiver(keep=False))
        traced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "bench-proxy"}
        traced_proxy, traced_pid = start_proxy(stack, triton, "grpc", extra_env=traced_env)
        # And as an operator would run it: a trace for one request in a hundred.
        sampled_env = {
            **traced_env,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
        sampled_proxy, sampled_pid = start_proxy(stack, triton, "grpc", extra_env=sampled_env)
        ensemble_url = f"http://{triton.http_url}/v2/models/iris_ensemble/infer"
        targets = [
            Target(CEILING, lambda c, s: run_wrk(ensemble_url, ENSEMBLE_BODY, c, s), {"triton": triton_pid}),
            Target(DIRECT, lambda c, s: run_direct_fanout(triton.grpc_url, MODELS, c, s),
                   {"triton": triton_pid}, self_role="client"),
            Target(PROXY_GRPC, lambda c, s: run_wrk(f"{grpc_proxy}/predict/label", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": grpc_pid}),
            Target(PROXY_HTTP, lambda c, s: run_wrk(f"{http_proxy}/predict/label", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": http_pid}),
            Target(PROXY_TRACED, lambda c, s: run_wrk(f"{traced_proxy}/predict/label", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": traced_pid}),
            Target(PROXY_SAMPLED, lambda c, s: run_wrk(f"{sampled_proxy}/predict/label", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": sampled_pid}),
            Target(PROXY_STREAM, lambda c, s: run_wrk(f"{grpc_proxy}/predict/stream", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": grpc_pid}),
            Target(PROXY_ENSEMBLE,
                   lambda c, s: run_wrk(f"{grpc_proxy}/predict/label?route=ensemble", PROXY_BODY, c, s),
                   {"triton": triton_pid, "proxy": grpc_pid}),
        ]  # fmt: skip
        # The peers a user might pick instead: Triton BLS on this Triton, Ray Serve beside it.
        bls_url = f"http://{triton.http_url}/v2/models/iris_bls/infer"
        targets.append(Target(BLS, lambda c, s: run_wrk(bls_url, BLS_BODY, c, s), {"triton": triton_pid}))
        ray, ray_reason = peer_bench.start_ray(stack, folder)
        if ray is not None:
            targets.append(
                Target(
                    RAY, lambda c, s: run_wrk(f"{ray.url}/predict/label", PROXY_BODY, c, s), {"ray": ray.pid}
                )
            )
        else:
            print(f"bench: Ray Serve not measured: {ray_reason}", flush=True)
        peer_bench.check_answers(grpc_proxy, triton.http_url, ray)
        _check_answer(bls_url, BLS_BODY, "virginica")
        _check_answer(ensemble_url, ENSEMBLE_BODY, "virginica")
        _check_answer(f"{traced_proxy}/predict/label", PROXY_BODY, "virginica")
        _check_answer(f"{sampled_proxy}/predict/label", PROXY_BODY, "virginica")
        for url in (grpc_proxy, http_proxy):
            _check_answer(f"{url}/predict/label", PROXY_BODY, "virginica")
            _check_answer(f"{url}/predict/stream", PROXY_BODY, '"final":true')
            _check_answer(f"{url}/predict/label?route=ensemble", PROXY_BODY, "virginica")
        if not args.skip_seed:
            seed_url, seed_pids = _seed_design(stack)
            roles = {f"seed {i}": pid for i, pid in enumerate(seed_pids)}
            targets.append(
                Target(SEED, lambda c, s: run_wrk(f"{seed_url}/predict/label", PROXY_BODY, c, s), roles)
            )
            _check_answer(f"{seed_url}/predict/label", PROXY_BODY, "virginica")

        results: dict[tuple[str, int], list[Measurement]] = {}
        traced_requests = 0
        for concurrency in levels:
            for target in targets:
                target.run(concurrency, args.warmup)
            for repeat in range(args.repeats):
                for target in targets:  # interleaved, so drift on the machine hits every row alike
                    m = _measure(target, concurrency, args.seconds)
                    results.setdefault((target.name, concurrency), []).append(m)
                    if target.name == PROXY_TRACED:
                        traced_requests += m.requests
                    print(
                        f"c={concurrency:<3} run {repeat + 1}/{args.repeats} {target.name:<58} "
                        f"{m.throughput:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
                        f"errors {m.errors}",
                        flush=True,
                    )

        doors = {
            "lean": (f"127.0.0.1:{grpc_door}", grpc_pid),
            "grpcio": (f"127.0.0.1:{grpcio_door}", grpcio_pid),
        }
        oip = _perf_analyzer(args, levels, triton, grpc_proxy, doors["lean"][0], doors["grpcio"][0])
        profiles = _profiles(
            args, {"lean": (grpc_proxy, grpc_pid), "grpcio": (grpcio_proxy, grpcio_pid)}, doors
        )
        conns = connections.connections_section(
            {"proxy over gRPC": (grpc_proxy, grpc_pid), "proxy over HTTP": (http_proxy, http_pid)},
            PROXY_BODY,
            args.seconds,
            args.repeats,
        )
        overload = resilience.overload_section(triton, 2.0 if args.smoke else 2 * args.seconds, args.repeats)
        tracing = _tracing_section(results, levels, receiver, traced_requests)
        triton_tree = process_tree(triton_pid)
        memory = peer_bench.memory_mib(
            {
                "Triton's ensemble": [triton_pid],
                "Triton BLS": triton_tree,  # Triton and its Python stubs (the BLS models')
                "proxy": [triton_pid, *process_tree(grpc_pid)],
                **({"Ray Serve": process_tree(ray.pid)} if ray is not None else {}),
            }
        )
        peers = peer_bench.peers_section(
            results,
            {"Triton's ensemble": CEILING, "Triton BLS": BLS, "Ray Serve": RAY, "proxy": PROXY_GRPC},
            memory,
            ray_reason,
        )
        rules = alerts.alerts_section(triton, args.seconds, args.repeats, args.warmup)
        shadowing = shadows.shadows_section(triton, args.seconds, args.repeats, args.warmup)
        several = workers.workers_section(triton, args.seconds, args.repeats, args.warmup)
    replicas = resilience.replicas_section(args.seconds, args.repeats, args.warmup)
    keys = by_key.by_key_section(args.seconds, args.repeats, args.warmup)

    rows = [Row(name, concurrency, _median(ms)) for (name, concurrency), ms in results.items()]
    header = {
        "command": "make bench" if not args.smoke else "python -m bench --smoke",
        "started": started,
        "machine": machine(),
        "method": (
            f"{args.repeats} run(s) of {args.seconds:g} s per configuration and concurrency, interleaved, "
            f"after {args.warmup:g} s of warm-up; medians. Closed loop: wrk (HTTP rows) or an asyncio "
            f"client (direct fan-out) keeps `concurrency` requests in flight; the seed's one-row request."
        ),
    }
    verdicts = check_targets(rows, CEILING, DIRECT, PROXY_GRPC, SEED)
    markdown = (
        render_markdown(rows, header, verdicts, CEILING, SEED)
        + peers
        + tracing
        + rules
        + shadowing
        + keys
        + oip
        + profiles
        + conns
        + several
        + replicas
        + overload
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(markdown)
    render_plot(rows, args.out / "latest.png", header)
    print(markdown)
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
