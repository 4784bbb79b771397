"""The Open Inference Protocol over HTTP, proven with the clients people use: unmodified
``tritonclient.http`` (sync and aio) calls Triton's ``iris_ensemble`` and the proxy's
``iris_fanout`` with the same code, only the URL and model name differ."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from local_triton import TritonServer
from training import wine

from .helpers import running_proxy, services_on, settings

OUTPUTS = ("scores", "label", "proba", "class_name")


@pytest.fixture(scope="module")
def proxy(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("v2") / "compositions.yaml"
    path.write_text(
        "compositions:\n  wine:\n    services:\n"
        + "".join(
            f'      {m}: {{target: "{triton.grpc_url}/{m}"}}\n'
            for m in ("wine_logreg", "wine_gbt", "wine_knn")
        )
        + "    aggregator: mean\n"
    )
    with running_proxy(settings(compositions_file=path), services_on(triton, "grpc")) as url:
        yield url.removeprefix("http://")


def _infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(n) for n in OUTPUTS])
    return {n: result.as_numpy(n) for n in OUTPUTS}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        if got[name].dtype == object:
            assert got[name].tolist() == expected[name].tolist(), name
        else:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)


def test_the_ensembles_code_calls_the_fan_out_batched_and_row_by_row(
    proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    with (
        httpclient.InferenceServerClient(triton.http_url) as direct,
        httpclient.InferenceServerClient(proxy) as through,
    ):
        _assert_same(_infer(through, "iris_fanout", x), _infer(direct, "iris_ensemble", x))
        for row in x:
            _assert_same(
                _infer(through, "iris_fanout", row[None, :]), _infer(direct, "iris_ensemble", row[None, :])
            )


def test_the_aio_client_too(proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = iris

    async def both() -> list[tuple[Any, Any]]:
        async with (
            httpaio.InferenceServerClient(triton.http_url) as direct,
            httpaio.InferenceServerClient(proxy) as through,
        ):

            async def call(
                client: httpaio.InferenceServerClient, model: str, rows: np.ndarray
            ) -> dict[str, np.ndarray]:
                tensor = httpaio.InferInput("input", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows, binary_data=False)  # the JSON encoding this time
                result = await client.infer(model, [tensor])  # every output, binary by default
                return {n: result.as_numpy(n) for n in OUTPUTS}

            pairs = [(await call(through, "iris_fanout", x), await call(direct, "iris_ensemble", x))]
            for row in x:
                one = row[None, :]
                pairs.append(
                    (await call(through, "iris_fanout", one), await call(direct, "iris_ensemble", one))
                )
            return pairs

    for got, expected in asyncio.run(both()):
        _assert_same(got, expected)


def test_metadata_and_config_show_what_the_ensemble_shows(proxy: str, triton: TritonServer) -> None:
    with (
        httpclient.InferenceServerClient(triton.http_url) as direct,
        httpclient.InferenceServerClient(proxy) as through,
    ):
        ours, theirs = through.get_model_metadata("iris_fanout"), direct.get_model_metadata("iris_ensemble")
        assert ours["inputs"] == theirs["inputs"] and ours["outputs"] == theirs["outputs"]
        config, ensemble = through.get_model_config("iris_fanout"), direct.get_model_config("iris_ensemble")
        assert config["max_batch_size"] == ensemble["max_batch_size"]
        for key in ("input", "output"):
            assert [(t["name"], t["data_type"], t["dims"]) for t in config[key]] == [
                (t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in ensemble[key]
            ]
        assert through.is_server_live() and through.is_server_ready()
        assert through.is_model_ready("iris_fanout") and not through.is_model_ready("nope")
        assert through.get_server_metadata()["name"] == "client_proxy"


def test_a_version_other_than_1_is_an_unknown_model_as_in_triton(proxy: str, triton: TritonServer) -> None:
    """Every model route under ``/versions/{version}``: version 1 is the model, any other a 404 in
    Triton's words (metadata, config, infer), and not ready; Triton's own classifier alike."""
    row = httpclient.InferInput("input", [1, 4], "FP32")
    row.set_data_from_numpy(np.asarray([[6.3, 3.3, 6.0, 2.5]], dtype=np.float32))
    with (
        httpclient.InferenceServerClient(triton.http_url) as direct,
        httpclient.InferenceServerClient(proxy) as through,
    ):
        for client, model in ((direct, "virginica"), (through, "iris_fanout"), (through, "virginica")):
            calls = {
                "metadata": partial(client.get_model_metadata, model, "2"),
                "config": partial(client.get_model_config, model, "2"),
                "infer": partial(client.infer, model, [row], model_version="2"),
            }
            for what, call in calls.items():
                with pytest.raises(InferenceServerException) as error:
                    call()
                assert str(error.value.status()) == "404", (model, what)
                assert f"Request for unknown model: '{model}' version 2 is not found" in str(error.value)
            assert not client.is_model_ready(model, "2") and client.is_model_ready(model, "1")
            assert client.get_model_metadata(model, "1")["name"] == model
            assert client.get_model_config(model, "1")["name"] == model
            assert (
                client.infer(model, [row], model_version="1").as_numpy(
                    "class_name" if model == "iris_fanout" else "probabilities"
                )
                is not None
            )


def test_a_service_passes_through_as_its_model(
    proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    with (
        httpclient.InferenceServerClient(triton.http_url) as direct,
        httpclient.InferenceServerClient(proxy) as through,
    ):
        assert through.get_model_metadata("setosa")["inputs"] == direct.get_model_metadata("setosa")["inputs"]
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = through.infer("setosa", [tensor], request_id="abc").as_numpy("probabilities")
        expected = direct.infer("setosa", [tensor]).as_numpy("probabilities")
        np.testing.assert_array_equal(got, expected)


def test_a_wine_composition_answers_with_its_classes(proxy: str) -> None:
    x, _ = wine.load()
    with httpclient.InferenceServerClient(proxy) as client:
        metadata = client.get_model_metadata("wine")
        (only,) = metadata["inputs"]  # three models, three input names: one shared input of rows
        tensor = httpclient.InferInput(only["name"], list(x.shape), only["datatype"])
        tensor.set_data_from_numpy(x.astype(np.float64 if only["datatype"] == "FP64" else np.float32))
        result = client.infer("wine", [tensor])
    rows = httpx.post(f"http://{proxy}/compositions/wine/label", json={"data": x.tolist()}).json()[
        "prediction"
    ]
    assert [n.decode() for n in result.as_numpy("class_name").reshape(-1)] == [r["label"] for r in rows]
    np.testing.assert_allclose(result.as_numpy("proba").reshape(-1), [r["proba"] for r in rows], atol=1e-6)
    assert result.as_numpy("label").reshape(-1).tolist() == [int(r["label"][-1]) for r in rows]
    assert result.as_numpy("scores").shape == (len(x), 3)


@pytest.mark.parametrize(
    ("model", "tensor", "message"),
    [
        ("nope", ("input", [1, 4], "FP32"), "unknown model: 'nope'"),
        ("iris_fanout", ("inputs", [1, 4], "FP32"), "missing 'input'"),
        (
            "iris_fanout",
            ("input", [1, 3], "FP32"),
            "expects input 'input' FP32 [N, 4], got rows of shape [1, 3]",
        ),
        ("iris_fanout", ("input", [1, 4], "BYTES"), "do not convert to FP32"),
    ],
)
def test_bad_requests_get_the_protocols_error(
    proxy: str, model: str, tensor: tuple[str, list[int], str], message: str
) -> None:
    name, shape, datatype = tensor
    data = np.ones(shape, dtype=object if datatype == "BYTES" else np.float32)
    if datatype == "BYTES":
        data = np.full(shape, b"x", dtype=object)
    with httpclient.InferenceServerClient(proxy) as client:
        inferred = httpclient.InferInput(name, shape, datatype)
        inferred.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [inferred])
    assert message in str(error.value)
    assert error.value.status() in ("400", "404", 400, 404)


_BINARY = (
    b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", '
    b'"parameters": {"binary_data_size": 16}}]}'
)
_AT = {"Inference-Header-Content-Length": str(len(_BINARY))}
_JSON_ROW = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]'


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{", {}, 400, "failed to parse"),
        (b'{"inputs": []}', {}, 400, "non-empty list"),
        (_BINARY, {"Inference-Header-Content-Length": "999"}, 400, "Inference-Header-Content-Length 999"),
        (_BINARY + b"1234", _AT, 400, "binary_data_size 16 is beyond"),
        (_BINARY + b"x" * 20, _AT, 400, "4 bytes of binary data after"),
        (_BINARY + b"\xff" * 16, _AT, 400, "finite"),
        (_JSON_ROW + b', "parameters": {"timeout": -1}}', {}, 400, "timeout"),
        (_JSON_ROW + b', "outputs": [{"name": "nope"}]}', {}, 400, "unexpected inference output 'nope'"),
        (b"x" * 2_000_000, {}, 413, "limit"),
    ],
)  # fmt: skip
def test_malformed_requests_are_4xx_never_a_500(
    proxy: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = httpx.post(f"http://{proxy}/v2/models/iris_fanout/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    ok = httpx.post(
        f"http://{proxy}/v2/models/iris_fanout/infer",
        json={
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
        },
    )
    assert ok.status_code == 200 and ok.json()["outputs"][3]["data"] == ["setosa"]


def test_a_partial_answer_says_so_in_the_parameters(explicit_triton: TritonServer, tmp_path: Path) -> None:
    models = {"setosa": "setosa", "versicolor": "versicolor", "very_slow": "very_slow"}
    # Neither the deadline nor the service timeout (10 s each) cuts very_slow (3 s) unless asked:
    # the first requests ask with X-Deadline-Ms, the last with Triton's ``timeout`` parameter.
    bounds = settings(deadline_ms=10_000, service_timeout_ms=10_000)
    short = {"X-Deadline-Ms": "600"}
    with running_proxy(bounds, services_on(explicit_triton, "grpc", models)) as url:
        body = {
            "id": "r1",
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
        }
        partial = httpx.post(
            f"{url}/v2/models/iris_fanout/infer", json=body, headers=short, timeout=20
        ).json()
        assert partial["id"] == "r1"
        assert partial["parameters"]["partial"] is True and partial["parameters"]["missing"] == "very_slow"
        assert partial["parameters"]["missing.very_slow"].startswith("timeout: ")
        # A missing one-vs-rest service scores 0, in the services' order (setosa, versicolor, very_slow).
        (scores,) = [o for o in partial["outputs"] if o["name"] == "scores"]
        assert scores["shape"] == [1, 3] and scores["data"][2] == 0 and min(scores["data"][:2]) > 0
        strict = {**body, "parameters": {"timeout_policy": "all_or_nothing"}}
        late = httpx.post(f"{url}/v2/models/iris_fanout/infer", json=strict, headers=short, timeout=20)
        assert late.status_code == 504 and "very_slow" in late.json()["error"]
        quick = {**body, "parameters": {"timeout": 100_000}}  # 100 ms, in microseconds
        response = httpx.post(f"{url}/v2/models/iris_fanout/infer", json=quick, timeout=20).json()
        assert response["parameters"]["missing"] == "very_slow"
        whole = httpx.post(f"{url}/v2/models/iris_fanout/infer", json=body, timeout=20).json()
        assert "missing" not in whole.get("parameters", {})  # the same request, no parameter: all three


def test_a_compositions_own_deadline_and_policy_hold_on_every_door(
    explicit_triton: TritonServer, tmp_path: Path
) -> None:
    """One path: a composition's ``deadline_ms`` and ``timeout_policy`` bound its Open Inference
    Protocol requests (HTTP and gRPC) as they bound its JSON routes: very_slow (3 s) is cut at
    the composition's 600 ms though ``PROXY_DEADLINE_MS`` is 10 s."""
    path = tmp_path / "compositions.yaml"
    path.write_text(
        "compositions:\n"
        + "".join(
            f"  {name}:\n    services:\n"
            + "".join(
                f'      {m}: {{target: "{explicit_triton.grpc_url}/{m}"}}\n' for m in ("setosa", "very_slow")
            )
            + f"    aggregator: one_vs_rest\n    deadline_ms: 600\n    timeout_policy: {policy}\n"
            for name, policy in (("quick", "partial"), ("strict", "all_or_nothing"))
        )
    )
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
    with running_proxy(
        settings(deadline_ms=10_000, service_timeout_ms=10_000, compositions_file=path), []
    ) as url:
        for door in ("/compositions/quick/label", "/v2/models/quick/infer"):
            body = {"data": [tensor["data"]]} if door.startswith("/compositions") else {"inputs": [tensor]}
            response = httpx.post(f"{url}{door}", json=body, timeout=20)
            assert response.status_code == 200, (door, response.text)
            assert response.elapsed.total_seconds() < 2.5, door  # far from both 0.6 s and 3 s
            answer = response.json()
            missing = answer["missing"] if "missing" in answer else answer["parameters"]["missing"]
            assert "very_slow" in missing, door
        for door in ("/compositions/strict/label", "/v2/models/strict/infer"):
            body = {"data": [tensor["data"]]} if door.startswith("/compositions") else {"inputs": [tensor]}
            response = httpx.post(f"{url}{door}", json=body, timeout=20)
            assert response.status_code == 504 and "very_slow" in response.text, (door, response.text)


@pytest.mark.parametrize(
    ("path", "unknown"),
    [
        ("/v2/models/{}/infer", "nope"),
        ("/compositions/{}/label", "nope"),
        ("/pipelines/{}", "nope"),
    ],
)
def test_a_body_that_cannot_be_read_is_a_404_for_an_unknown_model_whatever_the_door(
    proxy: str, path: str, unknown: str
) -> None:
    """The doors do not look the model up before reading a request; one they cannot read is a
    404 when the model does not exist (as in Triton), else a 400 saying what was wrong."""
    known = {
        "/v2/models/{}/infer": "iris_fanout",
        "/compositions/{}/label": "wine",
        "/pipelines/{}": "iris_cascade",
    }
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=f"http://{proxy}", timeout=10) as client:
        missing = client.post(path.format(unknown), content=b"{not json", headers=headers)
        bad = client.post(path.format(known[path]), content=b"{not json", headers=headers)
    assert missing.status_code == 404, missing.text
    assert unknown in missing.text
    assert bad.status_code == 400, bad.text
    assert "JSON" in bad.text
