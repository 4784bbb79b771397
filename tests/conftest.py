"""Shared fixtures: one real embedded Triton for the whole session, on free ports."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from local_triton import TritonServer
from training import data

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "model_repository"


#: The session's Triton servers, once started: each test checks they are still alive after it.
_SESSION_SERVERS: list[TritonServer] = []


#: Where Triton's Python backend makes a directory per Python model it loads (a fixed path in
#: its code, not $TMPDIR), left behind, empty, by a server that is stopped.
PYTHON_ENVS = "/tmp/python_env_*"


@pytest.fixture(scope="session", autouse=True)
def _no_python_envs_left() -> Iterator[None]:
    """The empty ``python_env_*`` directories the session's Tritons left are removed at its end;
    those that were there before it, or that hold anything, are not touched."""
    before = set(glob.glob(PYTHON_ENVS))
    yield
    for folder in set(glob.glob(PYTHON_ENVS)) - before:
        with contextlib.suppress(OSError):  # not empty, or not ours to remove
            os.rmdir(folder)


@pytest.fixture(autouse=True)
def _session_tritons_stay_alive() -> Iterator[None]:
    """The session's Triton servers, checked around every test.

    A server that dies during a test fails that test, with the end of Triton's log (a crash
    prints its backtrace there): a crash the proxy causes (the gRPC-cancel segfault of Triton
    24.10, say) must not pass unnoticed. It is started again on its ports before the next test,
    so that the tests after it still run against a live server.
    """
    for server in _SESSION_SERVERS:
        if not server.is_running():  # died in an earlier test, which failed for it
            server.stop()
            server.start()
    yield
    dead = [server for server in _SESSION_SERVERS if not server.is_running()]
    if dead:
        pytest.fail(
            "".join(
                f"the session's Triton serving {server.model_repository} died during this test. "
                f"Its last log lines:\n{_log_tail(server)}\n"
                for server in dead
            ),
            pytrace=False,
        )


def _log_tail(server: TritonServer, lines: int = 40) -> str:
    return "".join(server.log_text().splitlines(keepends=True)[-lines:])


@pytest.fixture(scope="session")
def triton() -> Iterator[TritonServer]:
    """The project's model repository served by the real ``tritonserver`` binary."""
    with TritonServer(model_repository=MODEL_REPOSITORY, http_port=0, grpc_port=0, metrics_port=0) as server:
        _SESSION_SERVERS.append(server)
        yield server


@pytest.fixture(scope="session")
def iris() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    return data.load()


TEST_MODELS = Path(__file__).resolve().parent / "model_repository"
VERY_SLOW_MS = 3000


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's classifiers plus the test-only ``slow`` and ``failing`` models."""
    import shutil

    repository = tmp_path_factory.mktemp("test_repository")
    for name in ("setosa", "versicolor", "virginica"):
        shutil.copytree(MODEL_REPOSITORY / name, repository / name)
    for model in TEST_MODELS.iterdir():
        shutil.copytree(model, repository / model.name)
    # `very_slow`: `slow` at 3 s, for tests whose claim is a time ("answered without waiting for
    # it"), so that their bounds can sit a second away from both the deadline and the model.
    shutil.copytree(TEST_MODELS / "slow", repository / "very_slow")
    config = repository / "very_slow" / "config.pbtxt"
    config.write_text(
        config.read_text().replace('name: "slow"', 'name: "very_slow"').replace('"400"', f'"{VERY_SLOW_MS}"')
    )
    return repository


@pytest.fixture(scope="session")
def explicit_triton(test_repository: Path) -> Iterator[TritonServer]:
    """A second real Triton, with explicit model control, serving ``test_repository``."""
    with TritonServer(
        model_repository=test_repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control_mode="explicit",
        load_models=["*"],
    ) as server:
        _SESSION_SERVERS.append(server)
        yield server
