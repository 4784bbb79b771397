"""What inputs fetched by key cost: ``make bench``'s "Inputs by key" section (also
``python -m bench.by_key``).

The seed's two ways of getting the input, on the same data (the Iris rows, ``features/iris.csv``),
against each store (SQLite, Redis, PostgreSQL, each a real server on this machine):

- rows in the body: the reference, no store;
- keys fetched by the proxy: one batched lookup per request, then the fan-out of the rows;
- keys fetched by the models: the proxy forwards the keys (``keys: forward``), and each of the
  three ``<class>_by_key`` models reads the store itself and has its ONNX model score the rows
  (BLS): three lookups per request.

One Triton per store (its ``FEATURE_STORE`` is the store), one proxy composing all three ways
(``/compositions/<way>/label``, one_vs_rest, one key per request), wrk at c=1 (what a request
costs, without queueing) and c=16, interleaved.
Where the time goes: the proxy's mean lookup (``proxy_feature_lookup_duration_seconds``), and
Triton's own mean compute time per execution of a by-key model and of the ONNX model it calls
(``nv_inference_compute_infer_duration_us`` / ``nv_inference_exec_count``, over the measured runs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench.loadgen import CpuMeter, Measurement, run_wrk
from bench.processes import MODELS, compositions_proxy, stop_on_sigterm
from client_proxy.feature_loader import read_csv
from local_triton import TritonServer
from local_triton.server import BY_KEY_REPOSITORY
from tests.servers import IRIS_CSV, loaded_store

CONCURRENCY = 16
LEVELS = (1, CONCURRENCY)
KEY = "flower-17"
WAYS = {
    "rows in the body": "rows",
    "keys fetched by the proxy": "by_proxy",
    "keys fetched by the models": "by_model",
}
STORES = ("sqlite", "redis", "postgresql")


def _compositions(folder: Path, triton: TritonServer) -> Path:
    def services(suffix: str) -> str:
        return "".join(f"      {m}: {{target: 'grpc://{triton.grpc_url}/{m}{suffix}'}}\n" for m in MODELS)

    text = "compositions:\n"
    for name, suffix, extra in (
        ("rows", "", ""),
        ("by_proxy", "", ""),
        ("by_model", "_by_key", "keys: forward"),
    ):
        text += f"  {name}:\n" + (f"    {extra}\n" if extra else "")
        text += f"    services:\n{services(suffix)}    aggregator: one_vs_rest\n"
    path = folder / "compositions.yaml"
    path.write_text(text)
    return path


def _metrics(url: str) -> dict[str, float]:
    """The counters of ``url`` (Prometheus text) by full series name."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                found[series] = float(value)
            except ValueError:
                continue
    return found


def _per_execution(before: dict[str, float], after: dict[str, float], model: str) -> tuple[float, float]:
    """Triton's compute time (us) over the executions of ``model`` between two scrapes, and their count."""

    def delta(metric: str) -> float:
        series = f'{metric}{{model="{model}",version="1"}}'
        return after.get(series, 0.0) - before.get(series, 0.0)

    executions = delta("nv_inference_exec_count")
    return (delta("nv_inference_compute_infer_duration_us") / executions if executions else 0.0), executions


def _lookup_ms(before: dict[str, float], after: dict[str, float], kind: str) -> float:
    """The proxy's mean lookup (ms) between two scrapes of its /metrics."""

    def delta(metric: str) -> float:
        series = f'{metric}{{store="{kind}"}}'
        return after.get(series, 0.0) - before.get(series, 0.0)

    count = delta("proxy_feature_lookup_duration_seconds_count")
    return 1000 * delta("proxy_feature_lookup_duration_seconds_sum") / count if count else 0.0


def _one_store(
    kind: str, folder: Path, seconds: float, repeats: int, warmup: float
) -> tuple[dict[tuple[str, int], list[Measurement]], dict[tuple[str, int], list[float]]]:
    folder.mkdir(parents=True, exist_ok=True)
    row = [float(v) for v in read_csv(IRIS_CSV)[KEY]]
    by_key = f'{{"keys": ["{KEY}"]}}'.encode()
    bodies = {
        way: (name, by_key if name != "rows" else f'{{"data": [{row}]}}'.encode())
        for way, name in WAYS.items()
    }
    with ExitStack() as stack:
        store = stack.enter_context(loaded_store(kind, folder))
        triton = stack.enter_context(
            TritonServer(
                http_port=0,
                grpc_port=0,
                metrics_port=0,
                extra_repositories=[BY_KEY_REPOSITORY],
                environment={"FEATURE_STORE": store},
            )
        )
        url, proxy = compositions_proxy(stack, _compositions(folder, triton), PROXY_FEATURE_STORE=store)
        for way, (name, body) in bodies.items():
            answer = urllib.request.urlopen(
                urllib.request.Request(
                    f"{url}/compositions/{name}/label", body, {"Content-Type": "application/json"}
                ),
                timeout=30,
            ).read()
            if b'"label":"setosa"' not in answer:
                raise RuntimeError(f"{kind}, {way}: unexpected answer {answer[:200]!r}")
            run_wrk(f"{url}/compositions/{name}/label", body, CONCURRENCY, warmup)
        measured: dict[tuple[str, int], list[Measurement]] = {}
        #: (what, concurrency) -> per-run means, ms: the proxy's lookup, a by-key model's
        #: execution and its ONNX model's, from the metrics scraped around each run.
        spent: dict[tuple[str, int], list[float]] = {}
        for repeat in range(repeats):
            for level in LEVELS:
                for way, (name, body) in bodies.items():
                    before = _metrics(triton.metrics_url) | _metrics(f"{url}/metrics")
                    meter = CpuMeter({"proxy": proxy, "triton": triton.pid or 0})
                    meter.start()
                    m = run_wrk(f"{url}/compositions/{name}/label", body, level, seconds)
                    m.cpu_s = meter.stop()
                    after = _metrics(triton.metrics_url) | _metrics(f"{url}/metrics")
                    measured.setdefault((way, level), []).append(m)
                    if name == "by_proxy":
                        spent.setdefault(("lookup", level), []).append(_lookup_ms(before, after, kind))
                    if name == "by_model":
                        for model in ("setosa_by_key", "setosa"):
                            us = _per_execution(before, after, model)[0]
                            spent.setdefault((model, level), []).append(us / 1000)
                    print(
                        f"c={level:<3} run {repeat + 1}/{repeats} {kind:<10} {way:<28} "
                        f"{m.throughput:8.1f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms  "
                        f"errors {m.errors}",
                        flush=True,
                    )
    return measured, spent


def _median(
    measured: dict[tuple[str, int], list[Measurement]],
    way: str,
    level: int,
    value: Callable[[Measurement], float],
) -> float:
    return float(statistics.median(value(m) for m in measured[(way, level)]))


def _median_ms(spent: dict[tuple[str, int], list[float]], what: str, level: int) -> float:
    return float(statistics.median(spent[(what, level)]))


def by_key_section(seconds: float, repeats: int, warmup: float) -> str:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-by-key-") as folder:
        for kind in STORES:
            results[kind] = _one_store(kind, Path(folder) / kind, seconds, repeats, warmup)

    lines = [
        "",
        "## Inputs by key",
        "",
        "`bench.by_key`: one key (or its row) per request to a composition of the three Iris models "
        "(one_vs_rest), the three ways: the row in the body; the key, its row read by the proxy "
        "(one lookup per request); the key forwarded to the `<class>_by_key` models, each reading "
        "the store itself and calling its ONNX model by BLS (three lookups per request). One Triton "
        "and one proxy per store, the store a real server on the same two cores (its own CPU is "
        f"not counted; SQLite's is the reader's). wrk at c=1 and c={CONCURRENCY}, {repeats} "
        f"interleaved run(s) of {seconds:g} s, medians.",
        "",
        f"| store | way | c=1 p50 ms | added | c={CONCURRENCY} req/s | vs rows | c={CONCURRENCY} p99 ms "
        "| proxy CPU/request ms | Triton CPU/request ms | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for kind, (measured, spent) in results.items():
        med = functools.partial(_median, measured)
        base = med("rows in the body", CONCURRENCY, lambda m: m.throughput)
        base_p50 = med("rows in the body", 1, lambda m: m.p50_ms)
        for way in WAYS:
            throughput = med(way, CONCURRENCY, lambda m: m.throughput)
            p50 = med(way, 1, lambda m: m.p50_ms)
            errors = sum(m.errors for level in LEVELS for m in measured[(way, level)])
            lines.append(
                f"| {kind} | {way} | {p50:.2f} | {p50 - base_p50:+.2f} | {throughput:,.0f} "
                f"| {throughput / base:.2f}x | {med(way, CONCURRENCY, lambda m: m.p99_ms):.2f} "
                f"| {med(way, CONCURRENCY, lambda m: m.cpu_per_request_ms().get('proxy', 0.0)):.3f} "
                f"| {med(way, CONCURRENCY, lambda m: m.cpu_per_request_ms().get('triton', 0.0)):.3f} "
                f"| {errors} |"
            )
        ms = functools.partial(_median_ms, spent)
        notes.append(
            f"{kind}: the proxy's lookup {ms('lookup', 1):.2f} ms at c=1, {ms('lookup', CONCURRENCY):.2f} ms "
            f"at c={CONCURRENCY}; an execution of setosa_by_key (its lookup and its BLS call) "
            f"{ms('setosa_by_key', 1):.2f} / {ms('setosa_by_key', CONCURRENCY):.2f} ms, of which the ONNX "
            f"model computes {ms('setosa', 1):.2f} / {ms('setosa', CONCURRENCY):.2f} ms"
        )
    lines += [
        "",
        "Where the time goes (Triton's and the proxy's own metrics around each run, medians of the "
        "runs' means): " + "; ".join(notes) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.by_key", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    print(by_key_section(args.seconds, args.repeats, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
