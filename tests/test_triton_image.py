"""The Triton image of docker compose and Kubernetes (``deploy/triton/Dockerfile``), as far as a
machine without a Docker engine can show it: its install step replayed in a Python 3.10 of
our own (the 24.10 image's Python), exactly as the Dockerfile runs it; then the real Triton
(2.51.0, the embedded server) running its Python models in that 3.10, with only those packages,
serving the by_key models against each real store. What differs from the image: the embedded
server serves the ONNX models with its Python-based ONNX Runtime backend, which needs onnxruntime
in that Python too (``requirements/triton-by-key-test.txt``, the tests' alone)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client_proxy.feature_loader import read_csv
from local_triton import TritonServer
from local_triton.server import BY_KEY_REPOSITORY, PROJECT

from .servers import IRIS_CSV, loaded_store

DOCKERFILE = PROJECT / "deploy" / "triton" / "Dockerfile"
LOCK = PROJECT / "requirements" / "triton-by-key.txt"
TEST_LOCK = PROJECT / "requirements" / "triton-by-key-test.txt"
KEYS = ["flower-0", "flower-60", "flower-149", "flower-60"]


def python310() -> Path:
    """A Python 3.10 that runs (pyenv's, or one on PATH): the tests need it, as CI's machines have it."""
    for candidate in [
        shutil.which("python3.10"),
        *sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python3.10")),
        "/usr/local/bin/python3.10",
        "/usr/bin/python3.10",
    ]:
        if candidate and os.access(candidate, os.X_OK):
            done = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.startswith("Python 3.10"):
                return Path(candidate)
    raise AssertionError("no Python 3.10 here: install one (pyenv install 3.10) to test the Triton image")


def _install_step() -> tuple[str, str, str]:
    """The Dockerfile's install step: its script, the lock it installs, and where to."""
    run = re.search(r"^RUN (\S+install\.sh) python3 (\S+) (\S+)", DOCKERFILE.read_text(), re.M)
    assert run is not None, "the Dockerfile's install step changed: replay it here"
    return run[1], run[2], run[3]


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A Python 3.10 with the image's packages, installed as the Dockerfile installs them; yields
    its interpreter and the PYTHONPATH the image sets (plus the tests' onnxruntime)."""
    root = tmp_path_factory.mktemp("py310")
    subprocess.run([str(python310()), "-m", "venv", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    script, lock, target = _install_step()
    assert Path(lock).name == LOCK.name and Path(script).name == "install.sh"
    packages = root / target.lstrip("/")
    for requirements, into in ((LOCK, packages), (TEST_LOCK, root / "test-packages")):
        subprocess.run(
            [
                "sh",
                str(PROJECT / "deploy" / "triton" / "install.sh"),
                str(python),
                str(requirements),
                str(into),
            ],
            check=True,
            timeout=600,
        )
    env = re.search(r"^ENV PYTHONPATH=(\S+)", DOCKERFILE.read_text(), re.M)
    assert env is not None and env[1] == f"{target}:/opt/by_key/project"
    yield python, os.pathsep.join([str(packages), str(PROJECT), str(root / "test-packages")])


def test_the_install_step_gives_exactly_the_locked_versions(image_python: tuple[Path, str]) -> None:
    python, path = image_python
    locked = dict(re.findall(r"^([a-z0-9_-]+)==(\S+)", LOCK.read_text(), re.M))
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, importlib.metadata as m; "
            "print(sys.version_info[:2]); "
            f"[print(n, m.version(n)) for n in {sorted(locked)!r}]",
        ],
        env={**os.environ, "PYTHONPATH": path.split(os.pathsep)[0]},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\n")
    assert found[0] == "(3, 10)"
    assert dict(line.split() for line in found[1:] if line) == locked
    assert "async-timeout" in locked  # what redis and asyncpg need on 3.10 and not on 3.11.3+


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgresql"])
def test_the_by_key_models_run_in_python_3_10_with_those_packages_against_each_store(
    kind: str, image_python: tuple[Path, str], tmp_path: Path
) -> None:
    python, path = image_python
    iris = read_csv(IRIS_CSV)
    rows = np.array([iris[k] for k in KEYS], dtype=np.float32)
    with (
        loaded_store(kind, tmp_path) as store,
        TritonServer(
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            extra_repositories=[BY_KEY_REPOSITORY],
            environment={"FEATURE_STORE": store, "PYTHONPATH": path},
            python=python,
        ) as triton,
    ):
        # The stubs Triton started embed Python 3.10.
        stubs = subprocess.run(
            ["pgrep", "-f", "-g", str(os.getpgid(triton.pid or 0)), "triton_python_backend_stub"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert stubs
        for pid in stubs:
            assert "libpython3.10" in Path(f"/proc/{pid}/maps").read_text()
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            keys = grpcclient.InferInput("keys", [len(KEYS), 1], "BYTES")
            keys.set_data_from_numpy(np.array([[k] for k in KEYS], dtype=np.object_))
            direct = grpcclient.InferInput("input", list(rows.shape), "FP32")
            direct.set_data_from_numpy(rows)
            for name in ("setosa", "versicolor", "virginica"):
                by_key = client.infer(f"{name}_by_key", [keys]).as_numpy("probabilities")
                expected = client.infer(name, [direct]).as_numpy("probabilities")
                np.testing.assert_allclose(by_key, expected, rtol=1e-6, atol=1e-7)
            unknown = grpcclient.InferInput("keys", [1, 1], "BYTES")
            unknown.set_data_from_numpy(np.array([["no-such-flower"]], dtype=np.object_))
            with pytest.raises(Exception, match="holds none of the keys: 'no-such-flower'"):
                client.infer("setosa_by_key", [unknown])
        finally:
            client.close()
