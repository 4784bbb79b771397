"""``python -m local_triton.stack`` (``make run``): the embedded Triton and the proxy, supervised.

Triton starts first (ports 8000/8001/8002); the proxy (``python -m client_proxy``, port 9000)
then runs as its own process with ``SERVICE_*`` pointing at it, as docker compose runs it.

Supervised as compose's ``restart: unless-stopped`` would: a process that crashes (a SIGKILL,
the OOM killer) is started again after a back-off that doubles with each crash in a row, on
the same ports, while the other keeps running. With Triton gone the proxy keeps answering
(503/504 JSON) and answers 200 again as soon as Triton is back, with no restart of its own.
A process that keeps dying soon after its start is given up on after ``--max-restarts``
crashes in a row, with one line saying so, and the exit code is 1. A proxy that refuses its
configuration (exit code 2: a setting, a ``SERVICE_*`` variable, the compositions or pipelines
file) is a mistake to fix, not a crash: the configuration is checked before Triton starts
(``python -m client_proxy --check``), its one line printed, and the stack exits 2 at once; a
proxy that exits 2 later is not restarted either. A restarted proxy is said to be back once it
answers ``/health/ready``. Ctrl-C or SIGTERM stops both and leaves no process behind.

The example compositions and pipelines (``examples/``, the wine models) are served when the
user names neither ``PROXY_COMPOSITIONS_FILE`` nor ``PROXY_PIPELINES_FILE``: the files a user
names are what is served, alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from client_proxy.config import TracingSettings
from client_proxy.feature_loader import load, read_csv
from local_triton.server import (
    BY_KEY_REPOSITORY,
    DEFAULT_REPOSITORY,
    LaunchError,
    TritonServer,
    die_with_parent,
    format_ready_line,
    models_in,
    terminate,
    trace_args,
)

SERVICES = ("setosa", "versicolor", "virginica")
#: ``python -m client_proxy``'s exit code for a configuration it refuses.
CONFIG_ERROR = 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FEATURES = Path(__file__).resolve().parent.parent / "features"
#: make run's feature store (requests by key), loaded afresh from features/*.csv at each start.
FEATURES_DB = Path(__file__).resolve().parent.parent / ".cache" / "features.db"


def shipped_feature_store(path: Path = FEATURES_DB) -> str:
    """A SQLite feature store holding the shipped feature sets (Iris, wine); its URL."""
    url = f"sqlite://{path.resolve()}"
    for csv in sorted(FEATURES.glob("*.csv")):
        asyncio.run(load(url, csv.stem, read_csv(csv)))
    return url


def log(message: str) -> None:
    print(f"stack: {message}", file=sys.stderr, flush=True)


@dataclass
class RestartPolicy:
    """A crash-loop guard: back-off doubling from ``first_delay`` to ``max_delay`` seconds.

    A process that ran at least ``stable_after`` seconds before it crashed starts the count
    afresh; ``max_restarts`` crashes in a row, each sooner than that, and it is given up on.
    """

    first_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    max_restarts: int = 5
    crashes: int = field(default=0, init=False)

    def crashed(self, ran_for: float) -> float | None:
        """Record a crash after ``ran_for`` seconds of life; the delay before the restart, or None."""
        self.crashes = 1 if ran_for >= self.stable_after else self.crashes + 1
        if self.crashes > self.max_restarts:
            return None
        return min(self.first_delay * 2.0 ** (self.crashes - 1), self.max_delay)


class Stack:
    """Triton and the proxy, each restarted when it crashes."""

    def __init__(self, args: argparse.Namespace, stopping: threading.Event) -> None:
        self.args = args
        self.feature_store: str | None = None
        self.stopping = stopping
        self.server: TritonServer | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.triton_policy = self._policy()
        self.proxy_policy = self._policy()
        self.triton_started = self.proxy_started = 0.0

    def _policy(self) -> RestartPolicy:
        return RestartPolicy(
            first_delay=self.args.restart_delay,
            max_delay=max(self.args.restart_delay, 30.0),
            max_restarts=self.args.max_restarts,
        )

    # -- the two processes -------------------------------------------------------------------
    def store(self) -> str:
        """The feature store: ``PROXY_FEATURE_STORE``, else make run's SQLite file, filled once."""
        if self.feature_store is None:
            self.feature_store = os.environ.get("PROXY_FEATURE_STORE") or shipped_feature_store()
        return self.feature_store

    def start_triton(self) -> None:
        """Start Triton on the configured ports; raises ``LaunchError``. The models that read their
        own features (``model_repository_by_key/``) read the proxy's feature store."""
        # Where the proxy traces (OTEL_* variables), Triton traces the same requests.
        traced = TracingSettings.from_environ(os.environ)
        self.server = TritonServer(
            model_repository=self.args.model_repository,
            http_port=self.args.http_port,
            grpc_port=self.args.grpc_port,
            metrics_port=self.args.metrics_port,
            log_stream=sys.stderr if self.args.triton_log else None,
            cancel=self.stopping,
            extra_repositories=[BY_KEY_REPOSITORY],
            environment={"FEATURE_STORE": self.store()},
            extra_args=trace_args(traced.traces_url) if traced.enabled else (),
        )
        self.server.start()
        self.triton_started = time.monotonic()
        ready = format_ready_line(
            self.server, models_in(self.server.model_repository) + models_in(BY_KEY_REPOSITORY)
        )
        print(f"{ready} (pid {self.server.pid})", flush=True)

    def proxy_environment(self) -> dict[str, str]:
        """The proxy's environment: the user's, with this Triton's services and ports."""
        args, server = self.args, self.server
        grpc, http = (server.grpc_port, server.http_port) if server else (args.grpc_port, args.http_port)
        port = grpc if args.protocol == "grpc" else http
        env = dict(os.environ, PROXY_PORT=str(args.proxy_port), PROXY_PROTOCOL=args.protocol)
        env["PROXY_GRPC_PORT"] = str(args.proxy_grpc_port)
        if "PROXY_COMPOSITIONS_FILE" not in os.environ and "PROXY_PIPELINES_FILE" not in os.environ:
            # The examples (the wine models), as a set: only when the user named no file of theirs.
            env["PROXY_COMPOSITIONS_FILE"] = str(EXAMPLES / "compositions.yaml")
            env["PROXY_PIPELINES_FILE"] = str(EXAMPLES / "pipelines.yaml")
        env.setdefault("TRITON_GRPC_URL", f"127.0.0.1:{grpc}")
        env["PROXY_FEATURE_STORE"] = self.store()
        for name in SERVICES:
            env.setdefault(f"SERVICE_{name.upper()}", f"127.0.0.1:{port}")
        return env

    def check_proxy(self) -> int:
        """The proxy's configuration checked as its start checks it: 0, or its exit code (2:
        refused, its one line already printed)."""
        check = subprocess.run(
            [sys.executable, "-m", "client_proxy", "--check"], env=self.proxy_environment(), check=False
        )
        return check.returncode

    def start_proxy(self) -> None:
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "client_proxy"], env=self.proxy_environment(), preexec_fn=die_with_parent
        )
        self.proxy_started = time.monotonic()
        grpc = f", gRPC 127.0.0.1:{self.args.proxy_grpc_port}" if self.args.proxy_grpc_port else ""
        print(
            f"proxy: http://127.0.0.1:{self.args.proxy_port}{grpc} (docs at /docs, pid {self.proxy.pid}); "
            "Ctrl-C stops both",
            flush=True,
        )

    # -- supervision -----------------------------------------------------------------------------
    def run(self) -> int:
        checked = self.check_proxy()
        if checked != 0:
            return checked if checked == CONFIG_ERROR else 1
        try:
            self.start_triton()
        except LaunchError as exc:
            log(f"error: {exc}")
            return 1
        self.start_proxy()
        triton_due: float | None = None  # when a crashed Triton is to be started again
        proxy_due: float | None = None
        proxy_returning = False  # restarted, and not yet ready
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            if (
                proxy_returning
                and self.proxy is not None
                and self.proxy.poll() is None
                and self._proxy_ready()
            ):
                log("proxy is back (ready)")
                proxy_returning = False
            if triton_due is None and self.server is not None and not self.server.is_running():
                code = self.server.wait()
                self.server.stop()  # reaps its stubs and backend directory
                triton_due = self._crashed(
                    "Triton", _how(code), now - self.triton_started, self.triton_policy
                )
                if triton_due is None:
                    return 1
            if triton_due is not None and now >= triton_due:
                triton_due = self._restart("Triton", self.start_triton, self.triton_policy)
                if triton_due is not None and triton_due < 0:
                    return 1
            if proxy_due is None and self.proxy is not None and self.proxy.poll() is not None:
                if self.proxy.returncode == CONFIG_ERROR:
                    return CONFIG_ERROR  # a mistake, said in the proxy's one line: not restarted
                proxy_returning = False
                proxy_due = self._crashed(
                    "proxy", _how(self.proxy.returncode), now - self.proxy_started, self.proxy_policy
                )
                if proxy_due is None:
                    return 1
            if proxy_due is not None and now >= proxy_due:
                proxy_due = self._restart("proxy", self.start_proxy, self.proxy_policy, say_back=False)
                if proxy_due is not None and proxy_due < 0:
                    return 1
                proxy_returning = proxy_due is None
        return 0

    def _crashed(self, name: str, how: str, ran_for: float, policy: RestartPolicy) -> float | None:
        """Log a crash; when to restart (a monotonic instant), or None after one give-up line."""
        delay = policy.crashed(ran_for)
        if delay is None:
            log(
                f"error: {name} stopped {policy.crashes} times in a row, each within "
                f"{policy.stable_after:g} s of its start (last: it {how}): giving up"
            )
            return None
        after = f" after {ran_for:.1f} s" if ran_for else ""
        log(
            f"{name} {how}{after}; restarting it in {delay:g} s "
            f"(restart {policy.crashes} of at most {policy.max_restarts} in a row)"
        )
        return time.monotonic() + delay

    def _proxy_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.args.proxy_port}/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def _restart(
        self, name: str, start: Callable[[], None], policy: RestartPolicy, say_back: bool = True
    ) -> float | None:
        """None when ``name`` runs again; else the next attempt's instant, or -1 to give up.
        ``say_back``: say it is back now (else its caller says so once it answers)."""
        try:
            start()
        except LaunchError as exc:
            if self.stopping.is_set():
                return None
            log(f"{name} did not start again: {exc}")
            due = self._crashed(name, "failed to start", 0.0, policy)
            return -1 if due is None else due
        if say_back:
            log(f"{name} is back")
        return None

    def reload(self) -> None:
        """SIGHUP, handed on to the proxy: it reads its compositions, pipelines and services files
        again (``client_proxy.reloading``), as a service manager's ``reload`` does."""
        proxy = self.proxy
        if proxy is not None and proxy.poll() is None:
            log("SIGHUP: the proxy reloads its configuration")
            proxy.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proxy is not None:
            terminate(self.proxy, timeout=15)
        if self.server is not None:
            self.server.stop()


def _how(code: int | None) -> str:
    return f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m local_triton.stack", description=__doc__)
    parser.add_argument("--proxy-port", type=int, default=int(os.environ.get("PROXY_PORT", "9000")))
    parser.add_argument(
        "--proxy-grpc-port",
        type=int,
        default=int(os.environ.get("PROXY_GRPC_PORT", "9001")),
        help="the proxy's Open Inference Protocol gRPC port (0: none)",
    )
    parser.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument(
        "--protocol", choices=["grpc", "http"], default=os.environ.get("PROXY_PROTOCOL", "grpc")
    )
    parser.add_argument("--triton-log", action="store_true", help="echo Triton's own log")
    parser.add_argument(
        "--restart-delay", type=float, default=1.0, help="first back-off after a crash, seconds (doubles)"
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="crashes in a row, each soon after a start, before giving up",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = Stack(args, stopping)
    signal.signal(signal.SIGHUP, lambda signum, frame: stack.reload())
    try:
        return stack.run()
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
