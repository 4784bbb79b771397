"""Requests by key, end to end: the real proxy process reads the features from a real store
(SQLite, Redis, PostgreSQL) before fanning out to the real Triton."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_proxy.feature_loader import read_csv
from local_triton import TritonServer, free_ports

from .conftest import ROOT
from .helpers import metric, running_proxy, services_on, settings
from .servers import IRIS_CSV, WINE_CSV, load_features, loaded_store, redis_server


@pytest.fixture(scope="module", params=["sqlite", "redis", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with loaded_store(request.param, tmp_path_factory.mktemp(request.param)) as url:
        yield url


WINE_COMPOSITION = """
compositions:
  wine:
    features: wine
    services:
      wine_logreg: {target: "grpc://TRITON/wine_logreg"}
      wine_gbt: {target: "grpc://TRITON/wine_gbt"}
      wine_knn: {target: "grpc://TRITON/wine_knn"}
    aggregator: mean
"""


@pytest.fixture(scope="module")
def keyed(triton: TritonServer, store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("keyed") / "compositions.yaml"
    path.write_text(WINE_COMPOSITION.replace("TRITON", triton.grpc_url))
    with running_proxy(
        settings(feature_store=store, compositions_file=path), services_on(triton, "grpc")
    ) as url:
        yield url


def test_rows_by_key_answer_as_the_same_rows_sent_in_the_body(keyed: str) -> None:
    iris = read_csv(IRIS_CSV)
    keys = ["flower-0", "flower-77", "flower-149", "flower-0"]
    by_key = httpx.post(f"{keyed}/predict/label", json={"keys": keys})
    assert by_key.status_code == 200, by_key.text
    by_body = httpx.post(f"{keyed}/predict/label", json={"data": [iris[k] for k in keys]}).json()
    assert by_key.json() == {**by_body, "keys": keys}
    predicted = httpx.post(f"{keyed}/predict", json={"keys": ["flower-77"]}).json()
    assert predicted["keys"] == ["flower-77"] and len(predicted["setosa"]["prediction"]) == 2


def test_keys_serve_the_stream_and_the_pipelines_as_rows_do(keyed: str) -> None:
    iris = read_csv(IRIS_CSV)
    keys = ["flower-3", "flower-120"]
    rows = [iris[k] for k in keys]
    by_key = httpx.post(f"{keyed}/predict/stream", json={"keys": keys})
    by_body = httpx.post(f"{keyed}/predict/stream", json={"data": rows})
    assert by_key.status_code == by_body.status_code == 200, by_key.text
    final_by_key = [json.loads(line) for line in by_key.text.splitlines() if line][-1]
    final_by_body = [json.loads(line) for line in by_body.text.splitlines() if line][-1]
    assert final_by_key["final"] is True and final_by_key["prediction"] == final_by_body["prediction"]
    by_key = httpx.post(f"{keyed}/pipelines/iris_cascade", json={"keys": keys})
    by_body = httpx.post(f"{keyed}/pipelines/iris_cascade", json={"data": rows})
    assert by_key.status_code == by_body.status_code == 200, by_key.text
    assert by_key.json()["keys"] == keys
    assert by_key.json()["prediction"] == by_body.json()["prediction"]


def test_a_composition_reads_its_own_feature_set(keyed: str) -> None:
    wine = read_csv(WINE_CSV)
    keys = ["wine-0", "wine-100", "wine-177"]
    by_key = httpx.post(f"{keyed}/compositions/wine/label", json={"keys": keys}).json()
    by_body = httpx.post(f"{keyed}/compositions/wine/label", json={"data": [wine[k] for k in keys]}).json()
    assert by_key == {**by_body, "keys": keys}
    # The Iris composition (default) reads the default set: a wine key is unknown there.
    unknown = httpx.post(f"{keyed}/compositions/default/label", json={"keys": ["wine-0"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_keys"


def test_unknown_keys_are_a_404_naming_them_or_a_partial_answer(keyed: str) -> None:
    none = httpx.post(f"{keyed}/predict/label", json={"keys": ["flower-999", "nope"]})
    assert none.status_code == 404
    assert none.json()["error"]["keys"] == ["flower-999", "nope"]
    assert "'flower-999', 'nope'" in none.json()["error"]["message"]
    some = httpx.post(f"{keyed}/predict/label", json={"keys": ["flower-1", "nope", "flower-2"]})
    assert some.status_code == 200
    body = some.json()
    assert body["keys"] == ["flower-1", "flower-2"] and body["missing_keys"] == ["nope"]
    assert body["partial"] is True and len(body["prediction"]) == 2
    strict = httpx.post(
        f"{keyed}/predict/label",
        json={"keys": ["flower-1", "nope"]},
        headers={"X-Timeout-Policy": "all_or_nothing"},
    )
    assert strict.status_code == 404 and strict.json()["error"]["keys"] == ["nope"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"keys": []}, "keys"),
        ({"keys": "flower-1"}, "keys"),
        ({"keys": ["flower 1"]}, "keys"),
        ({"keys": [1]}, "keys"),
        ({"keys": ["flower-1"], "data": [[1, 2, 3, 4]]}, "not both"),
    ],
)
def test_bad_keys_are_a_422_naming_the_problem(keyed: str, body: dict, says: str) -> None:  # type: ignore[type-arg]
    response = httpx.post(f"{keyed}/predict/label", json=body)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


def test_the_lookup_is_counted(keyed: str, store: str) -> None:
    kind = store.split(":", 1)[0]
    before = httpx.get(f"{keyed}/metrics").text
    httpx.post(f"{keyed}/predict/label", json={"keys": ["flower-3", "flower-4"]})
    after = httpx.get(f"{keyed}/metrics").text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("proxy_feature_lookups_total", store=kind, outcome="ok") == 1  # one lookup, two keys
    assert grew("proxy_feature_keys_total", outcome="found") == 2


def test_a_store_that_is_down_is_a_503_and_rows_in_the_body_still_answer(
    triton: TritonServer, tmp_path: Path
) -> None:
    store = contextlib.ExitStack()
    url = store.enter_context(redis_server(tmp_path / "redis"))
    with store, running_proxy(settings(feature_store=url), services_on(triton, "grpc")) as proxy:
        load_features(url)
        assert httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-5"]}).status_code == 200
        ready_before = httpx.get(f"{proxy}/health/all").json()["feature_store"]
        store.close()  # the store goes away while the proxy runs (its pooled connections too)
        down = httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-5"]})
        assert down.status_code == 503 and down.json()["error"]["code"] == "feature_store_unavailable"
        assert "redis://127.0.0.1" in down.json()["error"]["message"]
        rows = httpx.post(f"{proxy}/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]})
        assert rows.status_code == 200
        assert httpx.get(f"{proxy}/health/all").json()["feature_store"]["ready"] is False
    assert ready_before["ready"] is True


def test_a_slow_store_is_a_504_within_the_deadline(triton: TritonServer, tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as url:
        load_features(url)
        with running_proxy(
            settings(feature_store=url, deadline_ms=500), services_on(triton, "grpc")
        ) as proxy:
            assert httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-5"]}).status_code == 200
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            with socket.create_connection(("127.0.0.1", port)) as stall:
                # DEBUG SLEEP 3: the whole server stops answering for 3 s (the reply is not awaited).
                stall.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n3\r\n")
                time.sleep(0.1)
                started = time.monotonic()
                response = httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-5"]}, timeout=10)
                elapsed = time.monotonic() - started
                rows = httpx.post(f"{proxy}/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]})
    assert response.status_code == 504 and response.json()["error"]["code"] == "feature_store_timeout"
    assert elapsed < 2.0  # the 500-ms deadline, not the 3-s stall
    assert rows.status_code == 200  # and the requests that carry their rows are served meanwhile


def test_without_a_store_a_request_by_key_is_refused_naming_the_setting(triton: TritonServer) -> None:
    (grpc_port,) = free_ports(1)
    with running_proxy(settings(grpc_port=grpc_port), services_on(triton, "grpc")) as proxy:
        response = httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-5"]})
    assert response.status_code == 400 and "PROXY_FEATURE_STORE" in response.json()["error"]["message"]


def test_composes_loader_fills_the_redis_the_proxy_reads(triton: TritonServer, tmp_path: Path) -> None:
    """docker-compose.yml's ``features`` service, its own command run against a real Redis (the
    compose host rewritten to the test's server, the mounted folder to features/), and the
    proxy with compose's PROXY_FEATURE_STORE (rewritten the same way) reading what it loaded."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    loader = compose["features"]
    assert "./features:/features:ro" in loader["volumes"]
    assert compose["redis"]["image"].startswith("redis:7.0.")  # Debian's redis-server: 7.0
    proxy_env = dict(entry.split("=", 1) for entry in compose["proxy"]["environment"])
    assert compose["proxy"]["depends_on"]["features"]["condition"] == "service_completed_successfully"
    with redis_server(tmp_path / "redis") as url:
        address = url.removeprefix("redis://").split("/")[0]
        command = [arg.replace("redis:6379", address).replace("/features/", f"{ROOT}/features/")
                   for arg in loader["command"]]  # fmt: skip
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "loaded 150 vectors" in result.stdout and "loaded 178 vectors" in result.stdout
        store = proxy_env["PROXY_FEATURE_STORE"].replace("redis:6379", address)
        with running_proxy(settings(feature_store=store), services_on(triton, "grpc")) as proxy:
            answer = httpx.post(f"{proxy}/predict/label", json={"keys": ["flower-0"]})
    assert answer.status_code == 200 and answer.json()["prediction"]["label"] == "setosa"
