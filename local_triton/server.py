"""Run the real ``tritonserver`` 2.51.0 (Triton 24.10) that the ``nvidia-pytriton`` wheel ships.

Why: these machines have no Docker engine, and PyPI's ``tritonserver`` package holds no server.
The wheel carries the server binary, its libraries, Triton's python backend and one python
backend stub per Python version, but no ONNX Runtime backend. ``TritonServer`` assembles a
backend directory at run time from the installed wheel plus this package's Python-based
``onnxruntime`` backend, starts the server, waits until it is ready and stops it cleanly.
Nothing from the wheel is copied into the project: the directory is a temporary one.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

#: The Triton release the wheel ships; ``docker-compose.yml`` pins the same one.
TRITON_RELEASE = "24.10"
TRITON_SERVER_VERSION = "2.51.0"
PYTRITON_VERSION = "0.7.0"
MIN_GLIBC = (2, 35)
BACKEND_MODEL = Path(__file__).resolve().parent / "onnxruntime_backend" / "model.py"
#: The project's root: the ``by_key`` backend imports ``client_proxy`` from it.
PROJECT = Path(__file__).resolve().parent.parent
#: The Python-based backend of the models that read their own features (``backend: "by_key"``).
BY_KEY_BACKEND = PROJECT / "backends" / "by_key" / "model.py"
#: The models that take keys and read their features from the store themselves; served beside
#: ``model_repository/`` (whose models they call) when Triton is given a feature store.
BY_KEY_REPOSITORY = PROJECT / "model_repository_by_key"
DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"

ModelControlMode = Literal["none", "explicit"]


class LaunchError(RuntimeError):
    """The server could not be started; the message is one line saying what to do."""


@dataclass(frozen=True)
class WheelLayout:
    """Where the parts of the ``nvidia-pytriton`` wheel are on disk."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls, python_version: tuple[int, int] | None = None) -> WheelLayout:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise LaunchError(
                f"the nvidia-pytriton wheel is not installed: run 'make install' "
                f"(or pip install nvidia-pytriton=={PYTRITON_VERSION})"
            )
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        major, minor = python_version or sys.version_info[:2]
        layout = cls(
            binary=root / "bin" / "tritonserver",
            libs=package.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / f"{major}.{minor}" / "triton_python_backend_stub",
        )
        if not layout.stub.is_file():
            available = (
                sorted(p.name for p in (root / "python_backend_stubs").iterdir()) if root.exists() else []
            )
            raise LaunchError(
                f"nvidia-pytriton has no python backend stub for Python {major}.{minor} "
                f"(it has {', '.join(available) or 'none'}): use one of those Python versions"
            )
        for path in (layout.binary, layout.libs, layout.python_backend / "libtriton_python.so"):
            if not path.exists():
                raise LaunchError(
                    f"the nvidia-pytriton wheel is incomplete ({path} is missing): reinstall it"
                )
        return layout


def check_platform() -> None:
    """Refuse, in one line, a machine the wheel's binary cannot run on."""
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ("x86_64", "AMD64"):
        raise LaunchError(
            f"the embedded Triton runs on Linux x86_64 only (this is {sys.platform} {machine}): "
            "use docker compose with the official image instead"
        )
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    match = re.match(r"glibc (\d+)\.(\d+)", libc or "")
    if match is None or (int(match[1]), int(match[2])) < MIN_GLIBC:
        raise LaunchError(
            f"the embedded Triton needs glibc >= {MIN_GLIBC[0]}.{MIN_GLIBC[1]} (this machine has "
            f"{libc or 'no glibc'}): use a newer distribution or docker compose with the official image"
        )


def port_is_free(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option Triton's servers use, so a port in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS considers free now (for tests; another process may still race)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the thread that started it dies (Linux).

    So a launcher that is SIGKILLed (or a test runner that is) leaves no Triton behind. Start
    the server from a thread that lives as long as it should.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def terminate(process: subprocess.Popen[Any], timeout: float = 30) -> int:
    """SIGTERM, up to ``timeout`` seconds for a graceful exit, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _python_libdir() -> str | None:
    """The running interpreter's libpython directory, so the stub embeds this very Python."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        return str(libdir) if libdir else None
    return None


def _ask(python: Path, code: str) -> str:
    try:
        return subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"the stubs' Python {python} does not run: {exc}") from None


def _libdir_of(python: Path) -> str | None:
    """``_python_libdir`` of another interpreter."""
    found = _ask(
        python,
        "import sysconfig; print(sysconfig.get_config_var('LIBDIR') "
        "if sysconfig.get_config_var('Py_ENABLE_SHARED') else '')",
    )
    return found or None


@dataclass
class TritonServer:
    """One ``tritonserver`` process. Use as a context manager, or ``start()`` / ``stop()``.

    Ports of 0 are replaced by free ones at start.
    """

    model_repository: Path = DEFAULT_REPOSITORY
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    log_verbose: int = 0
    model_control_mode: ModelControlMode = "none"
    load_models: Sequence[str] = ()
    ready_timeout: float = 120.0
    #: Triton's own --exit-timeout-secs: how long SIGTERM waits for in-flight requests and open
    #: connections (an idle keep-alive client counts) before the server exits anyway.
    exit_timeout: int = 5
    #: How long stop() waits after SIGTERM before SIGKILL.
    stop_timeout: float = 30.0
    #: Where the server's own log lines go as they arrive (None: only kept for error messages).
    log_stream: IO[str] | None = None
    extra_args: Sequence[str] = ()
    #: More repositories served beside ``model_repository`` (``--model-repository`` each).
    extra_repositories: Sequence[Path] = ()
    #: Variables added to the server's environment (its Python models see them):
    #: ``FEATURE_STORE`` for the ``by_key`` models.
    environment: Mapping[str, str] = field(default_factory=dict)
    #: The Python the python backend's stubs embed, its version's stub among the wheel's (None:
    #: this one). Another Python's models find their packages through ``environment``'s PYTHONPATH.
    python: Path | None = None
    #: Set from another thread (a signal handler) to abandon a start that is still waiting.
    cancel: threading.Event | None = None
    _process: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _backend_dir: Path | None = field(default=None, init=False, repr=False)
    _log_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=400), init=False
    )
    _reader: threading.Thread | None = field(default=None, init=False, repr=False)

    # -- addresses -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient takes it (no scheme)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """None while the server runs (or before it starts); its exit status once it has ended."""
        return self._process.poll() if self._process else None

    def log_text(self) -> str:
        return "".join(self._log_tail)

    # -- lifecycle -------------------------------------------------------------------------
    def command(self, layout: WheelLayout, backend_dir: Path) -> list[str]:
        args = [
            str(layout.binary),
            f"--model-repository={self.model_repository}",
            *(f"--model-repository={Path(r).resolve()}" for r in self.extra_repositories),
            f"--backend-directory={backend_dir}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--log-verbose={self.log_verbose}",
            f"--model-control-mode={self.model_control_mode}",
            "--allow-gpu-metrics=false",
            # CPU only: no pinned (CUDA host) memory, which would only log an allocation failure.
            "--pinned-memory-pool-byte-size=0",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--exit-on-error=true",
        ]
        args += [f"--load-model={name}" for name in self.load_models]
        args += list(self.extra_args)
        return args

    def start(self) -> TritonServer:
        if self._process is not None:
            raise RuntimeError("server already started")
        check_platform()
        layout = WheelLayout.find(self._python_version())
        repository = Path(self.model_repository).resolve()
        if not repository.is_dir():
            raise LaunchError(f"model repository {repository} does not exist: run 'make train' to create it")
        self.model_repository = repository
        if self.model_control_mode not in ("none", "explicit"):
            raise LaunchError(
                f"model control mode must be 'none' or 'explicit', not {self.model_control_mode!r}"
            )
        self._pick_ports()

        self._backend_dir = assemble_backend_dir(layout)
        env = self._environment(layout)
        self._check_stub_links(layout, env)
        self._process = subprocess.Popen(
            self.command(layout, self._backend_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            # Own process group: the python backend's stubs are its children, and stop()
            # can then reach every one of them even after the server itself is gone.
            start_new_session=True,
            preexec_fn=die_with_parent,  # one fork-safe libc call
        )
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _pick_ports(self) -> None:
        wanted = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        spare = iter(free_ports(sum(1 for p in wanted.values() if p == 0)))
        for kind, port in wanted.items():
            if port == 0:
                setattr(self, f"{kind}_port", next(spare))
            elif not port_is_free(port, self._client_host if self.address != "0.0.0.0" else "0.0.0.0"):
                raise LaunchError(
                    f"port {port} ({kind}) is already in use: stop what holds it "
                    f"(ss -ltnp 'sport = :{port}') or choose another with --{kind}-port"
                )

    def _python_version(self) -> tuple[int, int] | None:
        if self.python is None:
            return None
        version = _ask(self.python, "import sys; print(*sys.version_info[:2])").split()
        return int(version[0]), int(version[1])

    def _environment(self, layout: WheelLayout) -> dict[str, str]:
        env = dict(os.environ)
        lib_path = [str(layout.libs)]
        libdir = _python_libdir() if self.python is None else _libdir_of(self.python)
        if libdir:
            lib_path.insert(0, libdir)
        if env.get("LD_LIBRARY_PATH"):
            lib_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
        # The stub finds numpy and onnxruntime through the python first on PATH: make it ours.
        python = self.python or Path(sys.executable)
        env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
        # The by_key backend reads the feature store with the proxy's own code.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT), env.get("PYTHONPATH", "")) if p)
        env.update(self.environment)
        return env

    def _check_stub_links(self, layout: WheelLayout, env: dict[str, str]) -> None:
        ldd = shutil.which("ldd")
        if ldd is None:
            return
        result = subprocess.run([ldd, str(layout.stub)], capture_output=True, text=True, env=env, check=False)
        missing = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
        if missing:
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            raise LaunchError(
                f"the python backend stub cannot find {', '.join(missing)}: install libpython{version} "
                f"(apt-get install libpython{version}) or use a Python built with --enable-shared"
            )

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log_tail.append(line)
            if self.log_stream is not None:
                try:
                    self.log_stream.write(line)
                    self.log_stream.flush()
                except (ValueError, OSError):
                    self.log_stream = None

    def _wait_ready(self) -> None:
        assert self._process is not None
        url = f"http://{self._client_host}:{self.http_port}/v2/health/ready"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.cancel is not None and self.cancel.is_set():
                raise LaunchError("start cancelled")
            if self._process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise LaunchError(diagnose(self.log_text(), self._process.returncode))
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise LaunchError(
            f"Triton was not ready within {self.ready_timeout:.0f} s: see its log (--log-verbose=1 for more)"
        )

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        """Block until the server exits by itself; its exit code."""
        assert self._process is not None
        return self._process.wait()

    def kill(self) -> None:
        """SIGKILL the server alone, as a crash would (its stubs are left to exit by themselves)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; then no process of the server's group is left."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            _reap_group(process.pid, grace=5.0)
            if self._reader is not None:
                self._reader.join(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


#: Backend directories are named ``<prefix><pid of the process that made it>-<random>``.
BACKEND_DIR_PREFIX = "local-triton-backends-"


def remove_stale_backend_dirs(parent: Path) -> list[Path]:
    """Remove the backend directories in ``parent`` whose maker is gone (a launcher that was
    SIGKILLed cannot remove its own); the removed ones. A directory of a live process, or one
    named otherwise, is left alone."""
    removed = []
    for path in parent.glob(f"{BACKEND_DIR_PREFIX}*-*"):
        pid_text = path.name[len(BACKEND_DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:
            pass  # another user's live process
    return removed


def assemble_backend_dir(layout: WheelLayout, into: Path | None = None) -> Path:
    """``<dir>/python/`` (the wheel's python backend and this Python's stub),
    ``<dir>/onnxruntime/model.py`` (the Python-based ONNX Runtime backend) and
    ``<dir>/by_key/model.py`` (the models that read their own features).

    Copies, not symlinks: Triton resolves a backend library's real path and refuses one that
    "escapes" the backend directory.
    """
    if into is None:
        remove_stale_backend_dirs(Path(tempfile.gettempdir()))
    root = into or Path(tempfile.mkdtemp(prefix=f"{BACKEND_DIR_PREFIX}{os.getpid()}-"))
    python = root / "python"
    python.mkdir(parents=True, exist_ok=True)
    files = {
        python / "libtriton_python.so": layout.python_backend / "libtriton_python.so",
        python / "triton_python_backend_utils.py": layout.python_backend / "triton_python_backend_utils.py",
        python / "triton_python_backend_stub": layout.stub,
        root / "onnxruntime" / "model.py": BACKEND_MODEL,
        root / "by_key" / "model.py": BY_KEY_BACKEND,
    }
    for copy, source in files.items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy)
    return root


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _reap_group(pgid: int, grace: float) -> None:
    """Give the stubs ``grace`` seconds to exit after the server, then SIGKILL what remains."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


_FIX_HINT = "(fix the model or its config.pbtxt, then retry)"
_FAILED_MODEL = re.compile(r"failed to load '([^']+)'[^:]*:\s*(.*)")
_POLL_FAILED = re.compile(r"Poll failed for model directory '([^']+)':\s*(.*?)\"?$")
_TABLE_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*UNAVAILABLE:\s*(.*?)\s*\|\s*$")


def diagnose(log: str, returncode: int | None) -> str:
    """One line saying why the server exited during start-up, from its log."""
    lines = log.splitlines()
    for line in lines:
        row = _TABLE_ROW.match(line.strip())
        if row:
            return (
                f"model '{row[1]}' failed to load: {row[3]} (fix the model or its config.pbtxt, then retry)"
            )
    for line in lines:
        failed = _FAILED_MODEL.search(line) or _POLL_FAILED.search(line.strip())
        if failed:
            return f"model '{failed[1]}' failed to load: {failed[2]} {_FIX_HINT}"
    for line in lines:
        if "Address already in use" in line or "failed to start" in line.lower():
            return f"Triton could not open its ports ({line.strip()}): choose other ports"
    errors = [line.strip() for line in lines if line.startswith("E")]
    last = errors[-1] if errors else (lines[-1].strip() if lines else "no output")
    return f"Triton exited with code {returncode} during start-up: {last}"


def models_in(repository: Path) -> list[str]:
    """Model folders (those with a ``config.pbtxt``) in a repository, sorted."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


def trace_args(traces_url: str, service_name: str = "triton-inference-server") -> list[str]:
    """Triton's own OpenTelemetry tracing (``--trace-config``) of the requests that arrive with a
    trace context, and only those (``rate=0``: Triton then traces every request whose headers
    carry one, whatever the rate), exported over OTLP/HTTP to ``traces_url``: the proxy's
    sampled calls, with Triton's spans beneath the proxy's call spans.

    The 2.51 binary misses the context of some requests that carry one (4 to 10% of them,
    measured here, sequential or concurrent, over gRPC): at ``rate=0`` those are not traced, at
    ``rate=1`` they are traced under a trace id of their own. ``rate=0`` keeps Triton's traces
    to the proxy's, and nothing unparented."""
    return [
        "--trace-config=mode=opentelemetry",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=0",
        "--trace-config=count=-1",
        f"--trace-config=opentelemetry,url={traces_url}",
        f"--trace-config=opentelemetry,resource=service.name={service_name}",
    ]


def format_ready_line(server: TritonServer, models: Iterable[str]) -> str:
    return (
        f"Triton {TRITON_SERVER_VERSION} ({TRITON_RELEASE}) ready: HTTP {server.http_url}, "
        f"gRPC {server.grpc_url}, metrics {server.metrics_url}; models: {', '.join(models)}"
    )
