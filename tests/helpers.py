"""Running the real proxy as its own process (``python -m client_proxy``), for tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
from pydantic import SecretStr

from client_proxy import Service, Settings
from local_triton import TritonServer, free_ports
from local_triton.server import terminate
from tests.conftest import MODEL_REPOSITORY, ROOT


def services_on(server: TritonServer, protocol: str, models: dict[str, str] | None = None) -> list[Service]:
    """Services named after ``models`` (name -> model) on ``server``; the three Iris models by default."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    models = models or {n: n for n in ("setosa", "versicolor", "virginica")}
    return [Service(name, protocol, url, model) for name, model in models.items()]  # type: ignore[arg-type]


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until ``url``/health answers 200; fails if ``process`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not start within {timeout:g} s")
        time.sleep(0.05)


def iris_repository(root: Path, with_ensemble: bool = False) -> Path:
    """A copy of the project's three classifiers (and, if asked, everything else make run serves),
    for servers a test may kill or break; its path also tells the server's processes apart."""
    repository = root / "repo"
    names = ["setosa", "versicolor", "virginica"]
    if with_ensemble:  # and the rest of what make run serves: the ensemble and the wine models
        names += ["aggregate", "iris_ensemble", "wine_logreg", "wine_gbt", "wine_knn"]
    for name in names:
        shutil.copytree(MODEL_REPOSITORY / name, repository / name)
    return repository


def proxy_environment(settings: Settings, services: list[Service], port: int) -> dict[str, str]:
    """The environment ``python -m client_proxy`` reads: ``PROXY_*`` and ``SERVICE_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))}
    for name, value in settings.model_dump().items():
        if value is None:
            env[f"PROXY_{name.upper()}"] = ""
        elif isinstance(value, SecretStr):
            env[f"PROXY_{name.upper()}"] = value.get_secret_value()
        elif isinstance(value, list):
            env[f"PROXY_{name.upper()}"] = json.dumps(value)
        else:
            env[f"PROXY_{name.upper()}"] = str(value)
    env["PROXY_HOST"], env["PROXY_PORT"] = "127.0.0.1", str(port)
    if settings.grpc_port == Settings.model_fields["grpc_port"].default:
        # Not asked for by the test: a free port, so that proxies never share one.
        env["PROXY_GRPC_PORT"] = str(free_ports(1)[0])
    for service in services:
        env[f"SERVICE_{service.name.upper()}"] = service.describe()
    return env


@contextmanager
def running_proxy(settings: Settings, services: list[Service], log: IO[str] | None = None) -> Iterator[str]:
    """``python -m client_proxy`` (as the Dockerfile runs it) on a free port; yields its base URL."""
    with proxy_process(settings, services, log) as (url, _):
        yield url


@contextmanager
def proxy_process(
    settings: Settings, services: list[Service], log: IO[str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``running_proxy``, yielding its process too."""
    (port,) = free_ports(1)
    own_log = None
    if log is None and os.environ.get("PROXY_TEST_LOG_DIR"):
        # Keep each test proxy's own log, for a failure that needs reading after the fact.
        name = f"proxy-{port}-{time.time_ns()}.log"  # ports are reused: the time keeps each log
        log = own_log = open(os.path.join(os.environ["PROXY_TEST_LOG_DIR"], name), "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "client_proxy"],
        env=proxy_environment(settings, services, port),
        stdout=log or subprocess.DEVNULL,
        stderr=log or subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process
    finally:
        terminate(process)
        if own_log is not None:
            own_log.close()


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temporary directory of the test's own directly under /tmp, removed afterwards: for a
    program started with it as ``TMPDIR`` that puts Unix sockets below it (Ray: its session in
    ``$TMPDIR/ray``, instead of ``/tmp/ray``), whose paths pytest's ``tmp_path`` makes too long
    (108 bytes at most)."""
    folder = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))
    folder.chmod(0o711)  # other users may pass through, as /tmp lets them (PostgreSQL runs as its own)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def processes_mentioning(text: str, *also: str) -> list[int]:
    """Pids of the processes (not this one) whose command line holds ``text`` and, if given, one of
    ``also``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and (not also or any(word in cmdline for word in also)):
            found.append(int(entry.name))
    return found


def stub_processes(repository: Path) -> list[int]:
    """Pids of python backend stubs (and Triton servers) serving models from ``repository``."""
    return processes_mentioning(str(repository), "triton_python_backend_stub", "tritonserver")


def triton_stats(
    triton: TritonServer,
    models: tuple[str, ...] = ("setosa", "versicolor", "virginica"),
    what: str = "requests",
) -> dict[str, int]:
    """Triton's own statistics per model (its /v2/models/<name>/stats endpoint): ``requests``, the
    successful inference requests it received, or ``rows``, the rows they carried in all."""
    counts = {}
    for name in models:
        stats = httpx.get(f"http://{triton.http_url}/v2/models/{name}/stats", timeout=5).json()[
            "model_stats"
        ][0]
        counts[name] = int(
            stats["inference_stats"]["success"]["count"] if what == "requests" else stats["inference_count"]
        )
    return counts


def settings(**overrides: object) -> Settings:
    return Settings(**{"log_level": "WARNING", **overrides})  # type: ignore[arg-type]


def get_json(client: httpx.Client, path: str) -> dict:  # type: ignore[type-arg]
    response = client.get(path)
    assert response.headers["content-type"].startswith("application/json")
    return response.json()  # type: ignore[no-any-return]


def read_http_response(sock: socket.socket) -> str:
    """One whole HTTP/1.1 response from a raw socket: its head and a Content-Length body,
    however the server split them into segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels``
    (each label equal to the value given); 0 if there is none."""
    total = 0.0
    for found, value in re.findall(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", text, re.M):
        found_labels = dict(re.findall(r'(\w+)="([^"]*)"', found))
        if all(found_labels.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


class Stack:
    """``python -m local_triton.stack`` (what ``make run`` runs) on free ports and a copy of the
    Iris repository (``whole``: of the project's own repository, every model ``make run``
    serves; or ``repository``, one of the test's own), its output kept in files;
    ``environment``: variables set for it, as a user would set them before ``make run``."""

    def __init__(
        self,
        tmp_path: Path,
        *extra: str,
        whole: bool = False,
        repository: Path | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        if repository is not None:
            self.repository = repository
        elif whole:  # a copy: the session's Triton serves the repository itself, and its processes name it
            self.repository = tmp_path / "model_repository"
            shutil.copytree(MODEL_REPOSITORY, self.repository)
        else:
            self.repository = iris_repository(tmp_path, with_ensemble=True)
        self.proxy_port, http, grpc, self.metrics_port, self.proxy_grpc_port = free_ports(5)
        self.url = f"http://127.0.0.1:{self.proxy_port}"
        self.out, self.err = tmp_path / "stack.out", tmp_path / "stack.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "local_triton.stack", "--proxy-port", str(self.proxy_port),
                 "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(self.metrics_port),
                 "--model-repository", str(self.repository),
                 "--proxy-grpc-port", str(self.proxy_grpc_port), *extra],
                cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **(environment or {})},
            )  # fmt: skip
        self.started = time.monotonic()
        self.ports = (self.proxy_port, http, grpc, self.metrics_port, self.proxy_grpc_port)

    def wait_serving(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the stack exited: {self.err.read_text()}"
            try:
                if httpx.get(f"{self.url}/health/all", timeout=2).json().get("status") == "ok":
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.2)

    def pids(self, what: str) -> list[int]:
        """Every pid the stack printed for ``what`` ("Triton" or "proxy"), oldest first."""
        pattern = r"^Triton .*\(pid (\d+)\)$" if what == "Triton" else r"^proxy: .*pid (\d+)\)"
        return [int(m[1]) for m in re.finditer(pattern, self.out.read_text(), re.M)]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # let it stop what it started
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def assert_nothing_left(self) -> None:
        for port in self.ports:
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
        deadline = time.monotonic() + 10
        while stub_processes(self.repository):
            assert time.monotonic() < deadline, f"left behind: {stub_processes(self.repository)}"
            time.sleep(0.2)
