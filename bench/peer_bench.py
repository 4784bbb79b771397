"""``make bench``'s "Peers": the proxy beside what a user might pick instead to compose the same
models, in the same run, on the same models, rows and concurrency.

- **Triton's ensemble** (``iris_ensemble``) and **Triton BLS** (``bench/peers/iris_bls``: one
  Python-backend model calling the three classifiers at once with ``async_exec``), both on the
  bench's Triton, which serves ``model_repository/`` and the BLS models together
  (``triton_repository``);
- **Ray Serve** (``bench/peers/ray_serve.py``: three deployments running the same ONNX files with
  onnxruntime, an ingress calling them through ``DeploymentHandle``s), from its own environment
  (``RAY_PYTHON``, which ``make bench`` installs from ``requirements/ray.txt``), on a port of its
  own. If it cannot start, the report says so and why (``start_ray``), and the rest is measured.

Before any timing, every peer's labels on the 150 Iris rows are checked equal to the proxy's, and
the wine BLS's on the 178 wine rows to the weighted mean onnxruntime gives (``check_answers``).
The timed runs are the bench's own (its targets, interleaved); this module renders them as one
table, with each process's CPU per request and memory, the ratios to the proxy, and every figure
on which a peer is ahead of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.connections import rss_kib
from bench.loadgen import Measurement
from bench.reaping import end_leftovers, process_tree
from local_triton import free_ports
from local_triton.server import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
RAY_PYTHON = ROOT / ".venv" / "ray" / "bin" / "python"
#: How long Ray may take to start its cluster and the four deployments.
RAY_START_S = 240.0
BLS = "Triton BLS iris_bls, direct (HTTP)"
RAY = "Ray Serve: three deployments and an ingress (HTTP)"


def triton_repository(folder: Path) -> Path:
    """``model_repository/`` and the BLS models, copied into ``folder`` (a few MB of ONNX)."""
    repository = folder / "repository"
    shutil.copytree(ROOT / "model_repository", repository, ignore=shutil.ignore_patterns("*.md"))
    for model in ("iris_bls", "wine_bls"):
        shutil.copytree(PEERS / model, repository / model)
    return repository


def bls_body(model: str, rows: list[list[float]], width: int = 4) -> bytes:
    """An Open Inference Protocol request for ``rows``, asking for the class names and probability."""
    tensor = {"name": "input", "shape": [len(rows), width], "datatype": "FP32", "data": rows}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "class_name"}, {"name": "proba"}]}).encode()


@dataclass
class RayPeer:
    url: str
    pid: int


def start_ray(stack: ExitStack, folder: Path) -> tuple[RayPeer | None, str]:
    """Ray Serve on a free port, stopped with ``stack``; or None and why it could not start."""
    if not RAY_PYTHON.exists():
        return (
            None,
            f"{RAY_PYTHON.relative_to(ROOT)} is missing (make bench installs it from requirements/ray.txt)",
        )
    (port,) = free_ports(1)
    log = folder / "ray.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(RAY_PYTHON), "-m", "bench.peers.ray_serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ray's processes are its descendants: stopped as a group
            preexec_fn=die_with_parent,  # and Serve shuts its cluster down if the bench is killed
        )
    stack.callback(_stop, process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + RAY_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None, f"it exited with code {process.returncode}: {_tail(log)}"
        try:
            _post(f"{url}/predict/label", json.dumps({"data": [[5.1, 3.5, 1.4, 0.2]]}).encode(), timeout=5)
            return RayPeer(url, process.pid), ""
        except (OSError, urllib.error.URLError):
            time.sleep(1)
    return None, f"it did not answer within {RAY_START_S:.0f} s: {_tail(log)}"


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-600:] or "(no output)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ray Serve stopped as it stops itself (SIGTERM: serve and ray shut down, and the driver
    ends what is left of its cluster), then whatever of it is still there a few seconds later
    killed."""
    cluster = process_tree(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
    end_leftovers(cluster, grace=10)
    process.kill()
    process.wait()


def _post(url: str, body: bytes, timeout: float = 30) -> Any:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _labels(url: str, rows: list[list[float]]) -> list[str]:
    """The labels the seed's JSON route at ``url`` gives ``rows``."""
    answer = _post(url, json.dumps({"data": rows}).encode())["prediction"]
    return [p["label"] for p in answer]


def _oip(triton_http: str, model: str, rows: list[list[float]], width: int = 4) -> list[str]:
    """The class names Triton's ``model`` gives ``rows``."""
    answer = _post(f"http://{triton_http}/v2/models/{model}/infer", bls_body(model, rows, width))
    (names,) = [o for o in answer["outputs"] if o["name"] == "class_name"]
    return [str(v) for v in names["data"]]


def check_answers(proxy_url: str, triton_http: str, ray: RayPeer | None) -> None:
    """Every peer's labels on the 150 Iris rows equal the proxy's; the wine BLS's on the 178 wine
    rows equal onnxruntime's weighted mean (SystemExit naming the peer and row otherwise)."""
    import onnxruntime as ort

    from training import data, wine

    rows = data.load()[0].tolist()
    proxy = _labels(f"{proxy_url}/predict/label", rows)
    found = {
        "Triton iris_ensemble": _oip(triton_http, "iris_ensemble", rows),
        "Triton BLS iris_bls": _oip(triton_http, "iris_bls", rows),
    }
    if ray is not None:
        found["Ray Serve"] = _labels(f"{ray.url}/predict/label", rows)
    for peer, labels in found.items():
        if labels != proxy:
            first = next(i for i, (a, b) in enumerate(zip(labels, proxy, strict=False)) if a != b)
            raise SystemExit(
                f"bench: {peer} answers row {first} {labels[first]!r}, the proxy {proxy[first]!r}"
            )
    wine_x, _ = wine.load()
    probabilities = []
    for m in wine.MODELS:
        session = ort.InferenceSession(str(ROOT / "model_repository" / m.name / "1" / "model.onnx"))
        probabilities.append(session.run(None, {m.input_name: wine_x.astype(m.dtype)})[0])
    mean = wine.soft_vote(probabilities, [m.weight for m in wine.MODELS]).argmax(axis=1)
    expected = [wine.WINE_CLASSES[i] for i in mean]
    if _oip(triton_http, "wine_bls", wine_x.astype(np.float32).tolist(), wine.N_FEATURES) != expected:
        raise SystemExit("bench: Triton BLS wine_bls does not answer the weighted mean of the wine models")


def memory_mib(pids: dict[str, list[int]]) -> dict[str, float]:
    """Resident memory of each named set of processes, MiB."""
    found = {}
    for name, group in pids.items():
        total = 0
        for pid in group:
            try:
                total += rss_kib(pid)
            except (OSError, RuntimeError):
                continue
        found[name] = total / 1024
    return found


def peers_section(
    results: dict[tuple[str, int], list[Measurement]],
    names: dict[str, str],
    memory: dict[str, float],
    ray_reason: str,
) -> str:
    """The "Peers" table from the bench's own runs: ``names`` maps each row's label to its
    target's name (the proxy's row named ``proxy``); ``memory``, each row's MiB."""
    levels = sorted({c for (name, c) in results if name in names.values()})
    proxy_name = names["proxy"]

    def median(name: str, c: int, what: str) -> float:
        runs = results.get((name, c), [])
        if not runs:
            return float("nan")
        if what in ("throughput", "p50_ms", "p99_ms"):
            return float(statistics.median(getattr(m, what) for m in runs))
        return float(statistics.median(sum(m.cpu_per_request_ms().values()) for m in runs))

    lines = [
        "",
        "## Peers: Triton's ensemble, Triton BLS and Ray Serve",
        "",
        "`bench/peer_bench.py`: the same three Iris classifiers and the seed's rule, composed four ways, "
        "measured in the runs above (interleaved with every other row, medians): Triton's ensemble and "
        "Triton BLS (`bench/peers/iris_bls`, `async_exec`) called directly over HTTP with one row; Ray "
        "Serve (`bench/peers/ray_serve.py`: three deployments on the same ONNX files with onnxruntime, an "
        "ingress calling them through `DeploymentHandle`s) and the proxy (`/predict/label`, gRPC to "
        "Triton) with the seed's JSON row. Before any timing each one's labels on the 150 Iris rows were "
        "checked equal to the proxy's (and the wine BLS's on the 178 wine rows to onnxruntime's weighted "
        "mean). CPU per request counts every process the row uses (Triton's with its Python stubs, the "
        "proxy's, Ray's whole cluster); memory is their resident size after the runs.",
        "",
    ]
    if ray_reason:
        lines += [f"Ray Serve was not measured on this machine: {ray_reason}", ""]
    lines += [
        "| peer | concurrency | req/s | vs the proxy | p50 ms | p99 ms | CPU ms/request, all its processes "
        "| memory MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ahead: list[str] = []
    for label, name in names.items():
        for c in levels:
            if (name, c) not in results:
                continue
            rps, base = median(name, c, "throughput"), median(proxy_name, c, "throughput")
            p50, p99, cpu = median(name, c, "p50_ms"), median(name, c, "p99_ms"), median(name, c, "cpu")
            lines.append(
                f"| {label} | {c} | {rps:,.0f} | {rps / base:.2f}x | {p50:.2f} | {p99:.2f} | {cpu:.3f} "
                f"| {memory.get(label, float('nan')):,.0f} |"
            )
            if label == "proxy":
                continue
            for figure, theirs, ours, better in (
                ("req/s", rps, base, rps > base),
                ("p50", p50, median(proxy_name, c, "p50_ms"), p50 < median(proxy_name, c, "p50_ms")),
                ("p99", p99, median(proxy_name, c, "p99_ms"), p99 < median(proxy_name, c, "p99_ms")),
                ("CPU per request", cpu, median(proxy_name, c, "cpu"), cpu < median(proxy_name, c, "cpu")),
            ):
                if better:
                    ahead.append(f"{label} at c={c}: {figure} {theirs:,.2f} against {ours:,.2f}")
        if label != "proxy" and memory.get(label, float("inf")) < memory.get("proxy", 0):
            ahead.append(f"{label}: memory {memory[label]:,.0f} MiB against {memory['proxy']:,.0f}")
    lines += [
        "",
        ("Where a peer is ahead of the proxy: " + "; ".join(ahead) + ".")
        if ahead
        else "No peer is ahead of the proxy on any of these figures.",
        "",
    ]
    return "\n".join(lines)
