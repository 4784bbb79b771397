"""Real Redis and PostgreSQL servers (Debian's packages), started by the tests on spare ports
and stopped after them, each in a temporary folder of its own."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from local_triton import free_ports
from local_triton.server import terminate

ROOT = Path(__file__).resolve().parent.parent
IRIS_CSV = ROOT / "features" / "iris.csv"
WINE_CSV = ROOT / "features" / "wine.csv"


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: make tools installs it (apt-get install redis-server)"
        )
    return found


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A Redis server with no persistence on a free port (DEBUG allowed from loopback, to stall it
    on purpose); yields its URL."""
    (port,) = free_ports(1)
    folder.mkdir(parents=True, exist_ok=True)
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--logfile", str(folder / "redis.log"),
            "--enable-debug-command", "local"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        terminate(process, timeout=10)


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH)."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: make tools installs it (apt-get install postgresql)")
    return Path(found[-1]).parent


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster made for the test (trust authentication, loopback only) on a free
    port, in a folder of its own under the system's temporary folder (pytest's are closed to the
    ``postgres`` user); yields its URL, and removes the folder after."""
    binaries = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="test-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    log_path = folder / "postgres.log"
    try:
        subprocess.run(
            _as_postgres(
                [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        (port,) = free_ports(1)
        args = [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip
        with open(log_path, "w") as log:
            process = subprocess.Popen(_as_postgres(args), stdout=log, stderr=log)
            try:
                _wait_port(port, process, "postgres")
                _wait_accepting(binaries, port)
                yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
            finally:
                terminate(process, timeout=15)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_accepting(binaries: Path, port: int, timeout: float = 30) -> None:
    """Until the server accepts connections (it listens a little before it is ready)."""
    ready = binaries / "pg_isready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run([str(ready), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        if result.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"postgres on {port} did not accept connections within {timeout:g} s")


def load_features(url: str) -> None:
    """Both shipped feature sets into the store at ``url``, each named after its file, as a user
    loads them (``python -m client_proxy.feature_loader``)."""
    command = [
        sys.executable,
        "-m",
        "client_proxy.feature_loader",
        "--store",
        url,
        str(IRIS_CSV),
        str(WINE_CSV),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@contextmanager
def loaded_store(kind: str, folder: Path) -> Iterator[str]:
    """A feature store of ``kind`` (``sqlite``, ``redis``, ``postgresql``) holding the shipped
    feature sets; yields its URL."""
    if kind == "sqlite":
        url = f"sqlite://{folder / 'features.db'}"
        load_features(url)
        yield url
        return
    with redis_server(folder) if kind == "redis" else postgres_server() as url:
        load_features(url)
        yield url
