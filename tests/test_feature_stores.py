"""The three feature stores against their real servers (a SQLite file, Debian's redis-server and
PostgreSQL on spare ports): the same behaviour on each."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client_proxy.core.features import fetch_rows
from client_proxy.core.services import TimeoutPolicy
from client_proxy.errors import FeatureStoreError, UnknownKeys
from client_proxy.feature_loader import read_csv
from client_proxy.stores import open_store
from local_triton import free_ports

from .conftest import ROOT
from .servers import postgres_server, redis_server

IRIS_CSV = ROOT / "features" / "iris.csv"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'features.db'}"
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "postgres_url"))


def _run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_the_loader_writes_the_iris_rows_and_a_batched_lookup_reads_them_back(store_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "client_proxy.feature_loader",
            "--store",
            store_url,
            "--set",
            "iris",
            str(IRIS_CSV),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded 150 vectors" in result.stdout
    expected = read_csv(IRIS_CSV)

    async def lookup() -> object:
        store = open_store(store_url)
        try:
            assert await store.ready()
            keys = ["flower-17", "flower-149", "flower-17", "flower-0"]
            return await fetch_rows(store, "iris", keys, _later(5), TimeoutPolicy.PARTIAL)
        finally:
            await store.aclose()

    fetched = _run(lookup())
    assert fetched.keys == ["flower-17", "flower-149", "flower-17", "flower-0"]  # a repeated key: two rows
    np.testing.assert_array_equal(fetched.rows, [expected[k] for k in fetched.keys])
    assert fetched.missing == []


def _later(seconds: float) -> float:
    import time

    return time.monotonic() + seconds


def test_unknown_keys_are_missing_and_another_set_is_another_namespace(store_url: str) -> None:
    async def scenario() -> None:
        store = open_store(store_url)
        try:
            await store.write("iris", {"a": [1.0, 2.0], "b": [3.0, 4.0]})
            await store.write("other", {"c": [5.0]})
            fetched = await fetch_rows(store, "iris", ["a", "c", "zz", "b"], _later(5), TimeoutPolicy.PARTIAL)
            assert fetched.keys == ["a", "b"] and fetched.missing == ["c", "zz"]
            np.testing.assert_array_equal(fetched.rows, [[1.0, 2.0], [3.0, 4.0]])
            with pytest.raises(UnknownKeys, match="does not hold 'c', 'zz' \\(all_or_nothing\\)"):
                await fetch_rows(store, "iris", ["a", "c", "zz"], _later(5), TimeoutPolicy.ALL_OR_NOTHING)
            with pytest.raises(UnknownKeys, match="holds none of the keys: 'x'"):
                await fetch_rows(store, "iris", ["x"], _later(5), TimeoutPolicy.PARTIAL)
            await store.write("iris", {"a": [9.0, 9.0]})  # replaced
            again = await fetch_rows(store, "iris", ["a"], _later(5), TimeoutPolicy.PARTIAL)
            np.testing.assert_array_equal(again.rows, [[9.0, 9.0]])
        finally:
            await store.aclose()

    _run(scenario())


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgresql"])
def test_a_store_that_is_not_there_is_a_feature_store_error_naming_it(kind: str, tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    url = {
        "sqlite": f"sqlite://{tmp_path / 'absent.db'}",
        "redis": f"redis://127.0.0.1:{port}/0",
        "postgresql": f"postgresql://postgres:secret@127.0.0.1:{port}/postgres",
    }[kind]

    async def scenario() -> None:
        store = open_store(url)
        try:
            assert not await store.ready()
            with pytest.raises(FeatureStoreError) as error:
                await fetch_rows(store, "iris", ["flower-1"], _later(5), TimeoutPolicy.PARTIAL)
            assert error.value.status_code == 503 and "feature store" in error.value.message
            assert "secret" not in error.value.message  # the password is never shown
        finally:
            await store.aclose()

    _run(scenario())
