"""``make bench``'s resilience sections: a slow replica (balancing and hedging), and overload
(shedding at 1,024 connections). Each returns a markdown section for the report.

Slow replica: two embedded Tritons serve all three models, each behind a relay
(``local_triton.slow_port``) so that both replicas pay the same relay cost; one relay pauses
its Triton for ``PAUSE_MS`` in every ``EVERY_MS``. The reference is the same two Tritons with
no pause at all. Each configuration is a proxy of its own; runs are interleaved; medians.

Overload: ``bench.overload`` (a closed-loop client that, like wrk, ignores ``Retry-After``)
keeps 1,024 connections busy against a proxy with the default bound and one with none.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from bench.loadgen import Measurement, run_wrk
from bench.processes import MODELS, serve
from local_triton import TritonServer, free_ports
from local_triton.slow_port import slow_port

PAUSE_MS = 200
EVERY_MS = 2000
DELAY_FRACTION = 0.05
DELAY_MS = 100
REPLICA_CONCURRENCY = 16
OVERLOAD_CONNECTIONS = 1024
CLIENT_TIMEOUT_S = 2.0
BODY = json.dumps({"data": [[1.0, 2.0, 3.0, 4.0]]}).encode()


@dataclass(frozen=True)
class Config:
    name: str
    relays: tuple[str, str]
    """The relays in front of the two replicas (keys of ``_relays``)."""
    env: dict[str, str]


def _env(balancer: str, hedge: str) -> dict[str, str]:
    return {"PROXY_BALANCER": balancer, "PROXY_HEDGE": hedge}


#: Scenario name -> its configurations; the first one of each is its reference.
SCENARIOS = {
    f"one replica pausing {PAUSE_MS} ms in every {EVERY_MS} ms (gRPC)": [
        Config("no slow replica (reference), p2c, no hedging", ("grpc a", "grpc b"), _env("p2c", "off")),
        Config("pausing, round robin, no hedging", ("grpc a pausing", "grpc b"), _env("round_robin", "off")),
        Config("pausing, p2c, no hedging", ("grpc a pausing", "grpc b"), _env("p2c", "off")),
        Config("pausing, p2c, hedging p95", ("grpc a pausing", "grpc b"), _env("p2c", "p95")),
    ],
    f"{DELAY_FRACTION:.0%} of one replica's calls {DELAY_MS} ms late (HTTP)": [
        Config("no slow calls (reference), p2c, no hedging", ("http a", "http b"), _env("p2c", "off")),
        Config(
            "slow calls, round robin, no hedging", ("http a delaying", "http b"), _env("round_robin", "off")
        ),
        Config("slow calls, p2c, no hedging", ("http a delaying", "http b"), _env("p2c", "off")),
        Config("slow calls, p2c, hedging p95", ("http a delaying", "http b"), _env("p2c", "p95")),
    ],
}


def _proxy(stack: ExitStack, targets: dict[str, str], env_extra: dict[str, str]) -> tuple[str, int]:
    (port, grpc_port) = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))}
    env.update({f"SERVICE_{m.upper()}": targets[m] for m in MODELS})
    env.update(PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), PROXY_GRPC_PORT=str(grpc_port), **env_extra)
    process = stack.enter_context(
        serve([sys.executable, "-m", "client_proxy"], env, f"http://127.0.0.1:{port}/health")
    )
    return f"http://127.0.0.1:{port}", process.pid


def _hedging(url: str) -> tuple[int, int]:
    """(hedges sent, calls) over the three services so far."""
    with urllib.request.urlopen(f"{url}/health/all", timeout=30) as response:
        services = json.load(response)["services"]
    hedges = sum(int(s.get("hedging", {}).get("hedges", 0)) for s in services.values())
    calls = sum(int(s.get("hedging", {}).get("calls", 0)) for s in services.values())
    return hedges, calls


def replicas_section(seconds: float, repeats: int, warmup: float) -> str:
    configs = [c for scenario in SCENARIOS.values() for c in scenario]
    measured: dict[str, list[Measurement]] = {}
    extra: dict[str, tuple[int, int]] = {}
    with ExitStack() as stack:
        a, b = (stack.enter_context(TritonServer(http_port=0, grpc_port=0, metrics_port=0)) for _ in range(2))
        relays = {
            "grpc a": slow_port(a.grpc_url),
            "grpc b": slow_port(b.grpc_url),
            "grpc a pausing": slow_port(a.grpc_url, PAUSE_MS, EVERY_MS, seed=7),
            "http a": slow_port(a.http_url),
            "http b": slow_port(b.http_url),
            "http a delaying": slow_port(
                a.http_url, seed=7, delay_fraction=DELAY_FRACTION, delay_ms=DELAY_MS
            ),
        }
        address = {key: stack.enter_context(relay).address for key, relay in relays.items()}
        proxies = {}
        for config in configs:
            protocol = config.relays[0].split()[0]
            first, second = (address[key] for key in config.relays)
            targets = {m: f"{protocol}://{first}/{m},{protocol}://{second}/{m}" for m in MODELS}
            proxies[config.name] = _proxy(stack, targets, {"PROXY_PROTOCOL": protocol, **config.env})[0]
        for config in configs:
            run_wrk(f"{proxies[config.name]}/predict/label", BODY, REPLICA_CONCURRENCY, warmup)
        before = {name: _hedging(url) for name, url in proxies.items()}
        for repeat in range(repeats):
            for config in configs:
                m = run_wrk(f"{proxies[config.name]}/predict/label", BODY, REPLICA_CONCURRENCY, seconds)
                measured.setdefault(config.name, []).append(m)
                print(
                    f"c={REPLICA_CONCURRENCY} run {repeat + 1}/{repeats} {config.name:<48} "
                    f"{m.throughput:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
                    f"errors {m.errors}",
                    flush=True,
                )
        for name, url in proxies.items():
            hedges, calls = _hedging(url)
            extra[name] = (hedges - before[name][0], calls - before[name][1])
        # A replica that died mid-section leaves every later row on one replica: say so rather
        # than print figures that measure something else.
        died = {name: s.returncode for name, s in (("a", a), ("b", b)) if s.returncode is not None}
    lines = [
        "",
        "## A slow replica: balancing and hedging",
        "",
        "Two embedded Tritons serve the three models, each behind a relay (`local_triton.slow_port`), so "
        "that both replicas pay the same relay cost; one relay slows its Triton down. wrk at "
        f"c={REPLICA_CONCURRENCY} on `/predict/label`, {repeats} interleaved run(s) of {seconds:g} s, "
        "medians. Extra calls: hedges sent per call over the measured runs (the hedging budget is 10%).",
    ]
    if died:
        lines += [
            "",
            "**Void: Triton "
            + ", ".join(f"{name} exited ({code})" for name, code in died.items())
            + " during this section; the rows after its death ran on one replica.**",
        ]
        print(f"warning: Triton replica(s) exited during the replicas section: {died}", flush=True)
    for scenario, scenario_configs in SCENARIOS.items():
        reference = statistics.median(m.p99_ms for m in measured[scenario_configs[0].name])
        lines += [
            "",
            f"### {scenario}",
            "",
            "| configuration | req/s | p50 ms | p99 ms | p99 vs reference | extra calls | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for config in scenario_configs:
            runs = measured[config.name]
            p99 = statistics.median(m.p99_ms for m in runs)
            hedges, calls = extra[config.name]
            lines.append(
                f"| {config.name} | {statistics.median(m.throughput for m in runs):,.0f} | "
                f"{statistics.median(m.p50_ms for m in runs):.2f} | {p99:.1f} | {p99 / reference:.2f}x | "
                f"{hedges / calls if calls else 0:.1%} | {sum(m.errors for m in runs)} |"
            )
    return "\n".join(lines) + "\n"


def _overload(url: str, seconds: float) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.overload", f"{url}/predict/label",
         "--connections", str(OVERLOAD_CONNECTIONS), "--seconds", str(seconds),
         "--timeout", str(CLIENT_TIMEOUT_S)],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    )  # fmt: skip
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def overload_section(triton: TritonServer, seconds: float, repeats: int) -> str:
    configs = {"bound 512 (default)": {}, "no bound (PROXY_MAX_IN_FLIGHT=0)": {"PROXY_MAX_IN_FLIGHT": "0"}}
    runs: dict[str, list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        targets = {m: f"grpc://{triton.grpc_url}/{m}" for m in MODELS}
        proxies = {name: _proxy(stack, targets, env)[0] for name, env in configs.items()}
        for repeat in range(repeats):
            for name, url in proxies.items():
                r = _overload(url, seconds)
                runs.setdefault(name, []).append(r)
                print(
                    f"c={OVERLOAD_CONNECTIONS} run {repeat + 1}/{repeats} overload, {name:<34} "
                    f"{r['ok_per_s']:8.1f} ok/s  shed {r['shed_fraction']:.1%}  timeouts {r['timeout']}  "
                    f"ok p99 {r['ok_p99_ms']} ms",
                    flush=True,
                )

    def med(name: str, key: str) -> float:
        values = [float(r[key]) for r in runs[name] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    lines = [
        "",
        "## Overload: 1,024 connections",
        "",
        f"`bench.overload`: {OVERLOAD_CONNECTIONS} keep-alive connections, each sending the next request as "
        f"soon as it has an answer (a 503's `Retry-After` ignored, as wrk does), client timeout "
        f"{CLIENT_TIMEOUT_S:g} s (the proxy's deadline is 2 s); {repeats} interleaved run(s) of "
        f"{seconds:g} s, medians (timeouts and 504s: summed over the runs). Admitted: answered 200.",
        "",
        "| proxy | admitted/s | shed (503) | client timeouts | 504 | admitted p50 ms | admitted p99 ms "
        "| admitted max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in configs:
        timeouts = sum(int(r["timeout"]) for r in runs[name])
        gateway_timeouts = sum(int(r["statuses"].get("504", 0)) for r in runs[name])
        lines.append(
            f"| {name} | {med(name, 'ok_per_s'):,.0f} | {med(name, 'shed_fraction'):.1%} | {timeouts} | "
            f"{gateway_timeouts} | {med(name, 'ok_p50_ms'):.0f} | {med(name, 'ok_p99_ms'):.0f} | "
            f"{med(name, 'ok_max_ms'):.0f} |"
        )
    return "\n".join(lines) + "\n"
