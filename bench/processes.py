"""Starting the processes a benchmark measures, and stopping them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from local_triton import TritonServer, free_ports
from local_triton.server import die_with_parent, terminate

MODELS = ["setosa", "versicolor", "virginica"]


def stop_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does: its ``with`` blocks and ``finally`` clauses run,
    so the servers it started are stopped (Python's default for SIGTERM ends it on the spot, and
    a server started with its own session, as Ray's cluster is, would be left running)."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the stopping itself is not interrupted
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


@contextmanager
def serve(
    args: list[str], env: dict[str, str], health_url: str, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        preexec_fn=die_with_parent,  # a benchmark killed outright still takes its servers with it
    )
    try:
        wait_http(health_url)
        yield process
    finally:
        terminate(process)


def start_proxy(
    stack: ExitStack,
    triton: TritonServer,
    protocol: str,
    extra_env: dict[str, str] | None = None,
    grpc_port: int | None = None,
    checkout: Path | None = None,
) -> tuple[str, int]:
    """``python -m client_proxy`` on a free port, calling ``triton``; its URL and pid. Its Open
    Inference Protocol gRPC service on ``grpc_port`` (default: another free port). ``checkout``:
    the directory whose ``client_proxy`` it runs (default: this one)."""
    (port,) = free_ports(1)
    grpc_port = grpc_port or free_ports(1)[0]
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))}
    env.update({f"SERVICE_{m.upper()}": f"{protocol}://{url}/{m}" for m in MODELS})
    env.update(PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), PROXY_GRPC_PORT=str(grpc_port))
    env.update(PROXY_PROTOCOL=protocol, **(extra_env or {}))
    process = stack.enter_context(
        serve([sys.executable, "-m", "client_proxy"], env, f"http://127.0.0.1:{port}/health", checkout)
    )
    return f"http://127.0.0.1:{port}", process.pid


def compositions_proxy(stack: ExitStack, compositions: Path, **extra_env: str) -> tuple[str, int]:
    """``python -m client_proxy`` on free ports serving the compositions file ``compositions``
    (no ``SERVICE_`` variable: its services are the file's); its URL and pid."""
    port, grpc_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))}
    env.update(PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), PROXY_GRPC_PORT=str(grpc_port))
    env.update(PROXY_COMPOSITIONS_FILE=str(compositions), **extra_env)
    process = stack.enter_context(
        serve([sys.executable, "-m", "client_proxy"], env, f"http://127.0.0.1:{port}/health")
    )
    return f"http://127.0.0.1:{port}", process.pid


def counts_by_outcome(url: str, family: str) -> dict[str, float]:
    """The samples of the counter ``family`` (``proxy_..._total``) that ``url``/metrics shows,
    summed by their ``outcome`` label (``""`` for samples without one)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith((f"{family}{{", f"{family} ")):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0] if 'outcome="' in line else ""
            found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return found
