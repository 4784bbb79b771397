"""The seed's other way of getting the input: Triton models that take keys and read their
features from the store themselves (``backends/by_key``, ``model_repository_by_key/``), composed
by the proxy like any other service (``keys: forward``). Real Triton, real proxy, real stores
(SQLite, Redis, PostgreSQL): both variants must give the same answers on the same data."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client_proxy.feature_loader import read_csv
from local_triton import TritonServer, free_ports
from local_triton.server import BY_KEY_REPOSITORY, LaunchError

from .conftest import TEST_MODELS
from .helpers import metric, running_proxy, services_on, settings
from .servers import IRIS_CSV, loaded_store

CLASSES = ("setosa", "versicolor", "virginica")
KEYS = [f"flower-{i}" for i in range(150)]

COMPOSITIONS = """
compositions:
  by_model:
    keys: forward
    services:
      setosa: {target: "grpc://TRITON/setosa_by_key"}
      versicolor: {target: "grpc://TRITON/versicolor_by_key"}
      virginica: {target: "grpc://TRITON/virginica_by_key"}
    aggregator: one_vs_rest
  by_proxy:
    services:
      setosa: {target: "grpc://TRITON/setosa"}
      versicolor: {target: "grpc://TRITON/versicolor"}
      virginica: {target: "grpc://TRITON/virginica"}
    aggregator: one_vs_rest
  by_model_named:  # the by-key models under names of their own, for the pipelines
    keys: forward
    services:
      setosa_k: {target: "grpc://TRITON/setosa_by_key"}
      versicolor_k: {target: "grpc://TRITON/versicolor_by_key"}
      virginica_k: {target: "grpc://TRITON/virginica_by_key"}
    aggregator: one_vs_rest
"""

#: The Iris cascade twice: its steps' models reading the keys' rows themselves, or the proxy
#: reading them once for the plain models.
PIPELINES = """
pipelines:
  cascade_by_model:
    keys: forward
    steps:
      - {name: setosa, services: [setosa_k], stop_if: "setosa_k >= 0.9"}
      - {name: others, services: [versicolor_k, virginica_k]}
  cascade_by_proxy:
    steps:
      - {name: setosa, services: [setosa], stop_if: "setosa >= 0.9"}
      - {name: others, services: [versicolor, virginica]}
"""


def _triton(store: str) -> TritonServer:
    return TritonServer(
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        extra_repositories=[BY_KEY_REPOSITORY],
        environment={"FEATURE_STORE": store},
    )


@pytest.fixture(scope="module", params=["sqlite", "redis", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonServer, str]]:
    """Triton serving the by-key models beside the Iris ones, reading a store of each kind, and
    a proxy composing either; yields both."""
    folder = tmp_path_factory.mktemp(request.param)
    with loaded_store(request.param, folder) as store, _triton(store) as triton:
        path, pipelines = folder / "compositions.yaml", folder / "pipelines.yaml"
        path.write_text(COMPOSITIONS.replace("TRITON", triton.grpc_url))
        pipelines.write_text(PIPELINES)
        proxy_settings = settings(feature_store=store, compositions_file=path, pipelines_file=pipelines)
        with running_proxy(proxy_settings, services_on(triton, "grpc")) as url:
            yield triton, url


def _keys_tensor(keys: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("keys", [len(keys), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[k] for k in keys], dtype=np.object_))
    return tensor


def test_a_by_key_model_answers_as_its_model_does_on_the_stored_rows(
    served: tuple[TritonServer, str],
) -> None:
    triton, _ = served
    iris = read_csv(IRIS_CSV)
    rows = np.array([iris[k] for k in KEYS], dtype=np.float32)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for name in CLASSES:
            by_key = client.infer(f"{name}_by_key", [_keys_tensor(KEYS)]).as_numpy("probabilities")
            direct_input = grpcclient.InferInput("input", list(rows.shape), "FP32")
            direct_input.set_data_from_numpy(rows)
            direct = client.infer(name, [direct_input]).as_numpy("probabilities")
            assert by_key.shape == (150, 2)
            np.testing.assert_allclose(by_key, direct, rtol=1e-6, atol=1e-7)
    finally:
        client.close()


def _both_ways(url: str, by_model: str, by_proxy: str, keys: list[str]) -> tuple[Any, Any]:
    """The answers of ``by_model`` and ``by_proxy`` to the same keys, each checked to say the same
    labels (``_k``, the by-key services' suffix, aside) and probabilities, and the same keys."""
    bodies = []
    for path in (by_model, by_proxy):
        answer = httpx.post(f"{url}{path}", json={"keys": keys}, timeout=30)
        assert answer.status_code == 200, answer.text
        bodies.append(answer.json())
    model_body, proxy_body = bodies
    assert model_body["keys"] == proxy_body["keys"] == keys
    rows = [b["prediction"] if isinstance(b["prediction"], list) else [b["prediction"]] for b in bodies]
    assert [p["label"].removesuffix("_k") for p in rows[0]] == [p["label"] for p in rows[1]]
    assert [p["proba"] for p in rows[0]] == pytest.approx([p["proba"] for p in rows[1]], rel=1e-6)
    return model_body, proxy_body


def test_both_variants_give_the_same_answers_through_the_proxy(served: tuple[TritonServer, str]) -> None:
    _, url = served
    for keys in (KEYS, ["flower-17"], ["flower-42", "flower-42", "flower-120"]):
        _both_ways(url, "/compositions/by_model/label", "/compositions/by_proxy/label", keys)


def test_a_pipeline_forwards_its_keys_to_models_that_read_their_own_rows(
    served: tuple[TritonServer, str],
) -> None:
    """``keys: forward`` for a pipeline: its steps' by-key models get the keys, and the answers,
    paths and stops are those of the same cascade on the rows the proxy reads itself."""
    _, url = served
    pipelines = ("/pipelines/cascade_by_model", "/pipelines/cascade_by_proxy")
    model_body, proxy_body = _both_ways(url, *pipelines, KEYS)
    stops = [[step["stopped_rows"] for step in body["path"]] for body in (model_body, proxy_body)]
    assert stops[0] == stops[1] and stops[0][0] == 50  # the 50 setosa rows stop at the first step


def test_an_unknown_key_is_a_422_naming_it_and_the_models_keep_serving(
    served: tuple[TritonServer, str],
) -> None:
    _, url = served
    before = httpx.get(f"{url}/metrics", timeout=30).text
    refused = httpx.post(
        f"{url}/compositions/by_model/label", json={"keys": ["flower-1", "nope"]}, timeout=30
    )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "input_rejected"
    assert set(error["services"]) == set(CLASSES)
    assert all(s["reason"] == "rejected" and "'nope'" in s["message"] for s in error["services"].values())
    # The replicas answered: each call is counted rejected (not failed), none is ejected, and the
    # next requests are served.
    for _ in range(5):
        again = httpx.post(f"{url}/compositions/by_model/label", json={"keys": ["flower-1"]}, timeout=30)
        assert again.status_code == 200, again.text
    after = httpx.get(f"{url}/metrics", timeout=30).text
    for service in error["services"]:
        calls = "proxy_replica_calls_total"
        rejected = metric(after, calls, service=service, outcome="rejected")
        assert rejected - metric(before, calls, service=service, outcome="rejected") == 1, service
        assert (
            metric(after, calls, service=service, outcome="ok")
            - metric(before, calls, service=service, outcome="ok")
            == 5
        )
        assert metric(after, "proxy_replica_ejections_total", service=service) == 0, service


def test_a_bad_key_in_a_coalesced_batch_fails_only_its_own_request(served: tuple[TritonServer, str]) -> None:
    """Concurrent requests share Triton calls (the coalescer): the one naming an unknown key is
    refused, the others are answered."""
    _, url = served

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            bodies = [{"keys": [f"flower-{i}"]} for i in range(40)]
            bodies[17] = {"keys": ["flower-3", "missing-17"]}
            return await asyncio.gather(
                *(client.post("/compositions/by_model/label", json=b) for b in bodies)
            )

    for _ in range(3):
        answers = asyncio.run(burst())
        assert answers[17].status_code == 422 and "'missing-17'" in answers[17].text
        assert [a.status_code for i, a in enumerate(answers) if i != 17] == [200] * 39


def test_a_store_that_is_down_is_a_503_and_the_other_models_keep_serving(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    with _triton(f"redis://127.0.0.1:{port}/0") as triton:
        path = tmp_path / "compositions.yaml"
        path.write_text(COMPOSITIONS.replace("TRITON", triton.grpc_url))
        with running_proxy(settings(compositions_file=path), services_on(triton, "grpc")) as url:
            down = httpx.post(f"{url}/compositions/by_model/label", json={"keys": ["flower-1"]}, timeout=30)
            assert down.status_code == 503, down.text
            failures = down.json()["error"]["services"]
            assert all(f"feature store redis://127.0.0.1:{port}/0" in f["message"] for f in failures.values())
            rows = httpx.post(f"{url}/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
            assert rows.status_code == 200 and rows.json()["prediction"]["label"] == "setosa"


def test_the_by_key_models_refuse_to_load_without_a_store() -> None:
    with pytest.raises(LaunchError, match="FEATURE_STORE"):
        TritonServer(http_port=0, grpc_port=0, metrics_port=0, extra_repositories=[BY_KEY_REPOSITORY]).start()


def test_a_by_key_model_names_an_unknown_key_as_invalid_argument(served: tuple[TritonServer, str]) -> None:
    """The keys are sent as they are ([N, 1] BYTES): a key with every character a key may have."""
    triton, _ = served
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(
            InferenceServerException, match=re.escape("holds none of the keys: 'a.b_c:d@e/f-1'")
        ) as raised:
            client.infer("setosa_by_key", [_keys_tensor(["a.b_c:d@e/f-1"])])
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_a_scoring_model_that_is_late_fails_the_batch_in_model_timeout_ms_and_frees_the_instance(
    tmp_path: Path,
) -> None:
    """``model_timeout_ms`` bounds the BLS call (a Triton request timeout would bound only its
    queueing): a by-key model whose scorer takes 3 s answers INTERNAL naming it after 300 ms, and
    its one instance takes the next request at once instead of waiting out the late call."""
    repository = tmp_path / "repository"
    shutil.copytree(TEST_MODELS / "slow", repository / "very_slow")
    slow = repository / "very_slow" / "config.pbtxt"
    slow.write_text(slow.read_text().replace('name: "slow"', 'name: "very_slow"').replace('"400"', '"3000"'))
    shutil.copytree(BY_KEY_REPOSITORY / "setosa_by_key", repository / "slow_by_key")
    config = repository / "slow_by_key" / "config.pbtxt"
    config.write_text(
        config.read_text()
        .replace('name: "setosa_by_key"', 'name: "slow_by_key"')
        .replace('"setosa"', '"very_slow"')
        + 'parameters {\n  key: "model_timeout_ms"\n  value: { string_value: "300" }\n}\n'
    )
    with (
        loaded_store("sqlite", tmp_path) as store,
        TritonServer(
            model_repository=repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            environment={"FEATURE_STORE": store},
        ) as triton,
    ):
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            for _ in range(2):  # the second: the instance is free again
                started = time.monotonic()
                with pytest.raises(InferenceServerException, match="model 'very_slow' did not answer within"):
                    client.infer("slow_by_key", [_keys_tensor(["flower-3"])])
                assert 0.25 < time.monotonic() - started < 2.0  # 300 ms, far from the model's 3 s
        finally:
            client.close()
