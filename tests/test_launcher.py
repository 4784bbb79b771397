"""``local_triton``: one-line errors, clean stops, explicit model control."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from local_triton import LaunchError, TritonServer, free_ports
from local_triton import server as server_module

from .conftest import MODEL_REPOSITORY, ROOT
from .helpers import processes_mentioning


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_is_a_one_line_error(busy_port: int) -> None:
    with pytest.raises(LaunchError, match=rf"port {busy_port} \(http\) is already in use"):
        TritonServer(http_port=busy_port, grpc_port=0, metrics_port=0).start()


def test_cli_port_in_use_exits_1_with_one_line_and_leaves_no_process(busy_port: int, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / "setosa", repository / "setosa")
    grpc, metrics = free_ports(2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local_triton",
            "--model-repository",
            str(repository),
            "--http-port",
            str(busy_port),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {busy_port}" in lines[0] and "already in use" in lines[0]
    assert processes_mentioning(str(repository)) == []


def test_model_that_fails_to_load_is_named(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / "setosa", repository / "setosa")
    config = repository / "setosa" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "1"', 'string_value: "many"'))
    server = TritonServer(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(LaunchError) as error:
        server.start()
    message = str(error.value)
    assert "'setosa' failed to load" in message and "intra_op_thread_count" in message
    assert "\n" not in message
    assert processes_mentioning(str(repository)) == []


def test_missing_repository_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="make train"):
        TritonServer(model_repository=tmp_path / "nowhere", http_port=0, grpc_port=0, metrics_port=0).start()


def test_wrong_platform_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.platform, "machine", lambda: "aarch64")
    with pytest.raises(LaunchError, match="Linux x86_64 only"):
        server_module.check_platform()


def test_old_glibc_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.os, "confstr", lambda name: "glibc 2.31")
    with pytest.raises(LaunchError, match=r"glibc >= 2\.35.*glibc 2\.31"):
        server_module.check_platform()


def test_missing_wheel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LaunchError, match="nvidia-pytriton wheel is not installed"):
        server_module.WheelLayout.find()


def test_python_without_a_stub_is_refused() -> None:
    with pytest.raises(LaunchError, match=r"no python backend stub for Python 3\.99"):
        server_module.WheelLayout.find(python_version=(3, 99))


def test_explicit_model_control_and_clean_stop(tmp_path: Path) -> None:
    server = TritonServer(
        model_repository=MODEL_REPOSITORY,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control_mode="explicit",
        load_models=["setosa"],
    )
    with server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("setosa")
        assert not client.is_model_ready("versicolor")
        client.load_model("versicolor")
        assert client.is_model_ready("versicolor")
        client.unload_model("setosa")
        assert not client.is_model_ready("setosa")
        client.close()
        pgid = server.pid
        assert pgid is not None
    # Stopped: the server and every python backend stub of its process group are gone.
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_cli_serves_until_sigterm_then_exits_0(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / "setosa", repository / "setosa")
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local_triton",
            "--quiet",
            "--model-repository",
            str(repository),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert "ready" in ready and f"127.0.0.1:{http}" in ready and "setosa" in ready
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        assert client.is_model_ready("setosa")
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    deadline = time.monotonic() + 10
    while processes_mentioning(str(repository)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(repository)) == []
