"""Models with several inputs, reached with named tensors (the Open Inference Protocol's JSON),
against the real embedded Triton and the test-only ``two_inputs`` model (FP32 ``petals`` and
FP64 ``sepals``, answering [P, 1 - P] with P = sigmoid(sum(petals) - sum(sepals)))."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from local_triton import TritonServer

from .helpers import metric, running_proxy, services_on, settings

COMPOSITIONS = """
compositions:
  two:
    services:
      two_inputs: {target: "grpc://GRPC/two_inputs"}
    aggregator: none
  two_http:
    services:
      two_inputs: {target: "http://HTTP/two_inputs"}
    aggregator: none
  mixed:
    description: a two-input model next to a one-input one; each takes its own tensors
    services:
      two_inputs: {target: "grpc://GRPC/two_inputs"}
      setosa: {target: "grpc://GRPC/setosa"}
    aggregator: one_vs_rest
"""


@pytest.fixture(scope="module")
def proxy(explicit_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("named") / "compositions.yaml"
    path.write_text(
        COMPOSITIONS.replace("GRPC", explicit_triton.grpc_url).replace("HTTP", explicit_triton.http_url)
    )
    with running_proxy(settings(compositions_file=path), services_on(explicit_triton, "grpc")) as url:
        yield url


def _tensor(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.reshape(-1).tolist(),
    }


def _expected(petals: np.ndarray, sepals: np.ndarray) -> np.ndarray:
    p = 1 / (1 + np.exp(-(petals.astype(np.float64).sum(axis=1) - sepals.sum(axis=1))))
    return np.stack([p, 1 - p], axis=1)


def _inputs(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 2)).astype(np.float32), rng.normal(size=(rows, 2))


@pytest.mark.parametrize("composition", ["two", "two_http"])
def test_a_two_input_model_answers_named_tensors(proxy: str, composition: str) -> None:
    petals, sepals = _inputs(5, seed=1)
    body = {"inputs": [_tensor("petals", petals, "FP32"), _tensor("sepals", sepals, "FP64")]}
    response = httpx.post(f"{proxy}/compositions/{composition}/predict", json=body)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["two_inputs"]["prediction"], _expected(petals, sepals), atol=1e-6
    )


def test_each_service_takes_its_own_tensors_from_one_request(proxy: str, iris: Any) -> None:
    import onnxruntime as ort

    from .conftest import MODEL_REPOSITORY

    x, _ = iris
    petals, sepals = _inputs(len(x), seed=2)
    body = {
        "inputs": [
            _tensor("input", x, "FP32"),
            _tensor("petals", petals, "FP32"),
            _tensor("sepals", sepals, "FP64"),
        ]
    }
    answer = httpx.post(f"{proxy}/compositions/mixed/predict", json=body).json()
    setosa = ort.InferenceSession(str(MODEL_REPOSITORY / "setosa" / "1" / "model.onnx"))
    np.testing.assert_allclose(answer["setosa"]["prediction"], setosa.run(None, {"input": x})[0], atol=1e-6)
    two = _expected(petals, sepals)
    np.testing.assert_allclose(answer["two_inputs"]["prediction"], two, atol=1e-6)
    labels = httpx.post(f"{proxy}/compositions/mixed/label", json=body).json()["prediction"]
    setosa_p = setosa.run(None, {"input": x})[0][:, 0]
    expected = ["two_inputs" if t > s else "setosa" for t, s in zip(two[:, 0], setosa_p, strict=True)]
    assert [r["label"] for r in labels] == expected
    assert len(set(expected)) == 2  # both services win some rows, or the test proves little


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"data": [[1.0, 2.0]]}, "two_inputs: model 'two_inputs' takes 2 inputs"),
        (
            {"inputs": [{"name": "petals", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
            "two_inputs: model 'two_inputs' needs input 'sepals' FP64 [N, 2], not sent",
        ),
        (
            {
                "inputs": [
                    {"name": "petals", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                    {"name": "sepals", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]},
                ]
            },
            "two_inputs: expects input 'petals' FP32 [N, 2], got tensor 'petals' of shape [1, 3]",
        ),
        (
            {"inputs": [{"name": "petals", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]},
            "inputs[0] ('petals').data: 3 values, the shape [2, 2] needs 4",
        ),
        (
            {"inputs": [{"name": "petals", "shape": [1, 2], "datatype": "FP48", "data": [1, 2]}]},
            "inputs[0] ('petals').datatype: must be one of",
        ),
        (
            {
                "inputs": [
                    {"name": "petals", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                    {"name": "sepals", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]},
                ]
            },
            "every tensor needs the same number of rows",
        ),
        (
            {"inputs": [{"name": "petals", "shape": [1, 1], "datatype": "INT8", "data": [300]}]},
            "does not fit INT8",
        ),
        ({"inputs": [], "data": [[1]]}, "not both"),
    ],
)
def test_tensors_that_do_not_fit_are_422_naming_the_problem(
    proxy: str, body: dict[str, Any], message: str
) -> None:
    response = httpx.post(f"{proxy}/compositions/two/predict", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


def test_concurrent_named_tensor_requests_each_get_their_own_rows(proxy: str) -> None:
    """Under load the coalescer joins calls to one service into one Triton call: named tensors
    are joined per name, and every caller gets its own rows back."""

    async def one(client: httpx.AsyncClient, seed: int) -> tuple[np.ndarray, np.ndarray]:
        petals, sepals = _inputs(1 + seed % 3, seed)
        body = {"inputs": [_tensor("petals", petals, "FP32"), _tensor("sepals", sepals, "FP64")]}
        response = await client.post(f"{proxy}/compositions/two/predict", json=body)
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["two_inputs"]["prediction"]), _expected(petals, sepals)

    async def many() -> list[tuple[np.ndarray, np.ndarray]]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client, seed) for seed in range(64)))

    before = httpx.get(f"{proxy}/metrics").text
    for got, expected in asyncio.run(many()):
        np.testing.assert_allclose(np.atleast_2d(got), expected, atol=1e-6)
    after = httpx.get(f"{proxy}/metrics").text

    def grew(name: str) -> float:
        return metric(after, name, service="two_inputs") - metric(before, name, service="two_inputs")

    # The 64 requests went to Triton in fewer calls: some shared one (named tensors joined).
    assert grew("proxy_coalesced_batch_requests_sum") == 64
    assert grew("proxy_coalesced_batch_requests_count") < 64


def test_the_example_body_in_the_readme_is_a_valid_request(proxy: str, tmp_path: Path) -> None:
    body = {
        "inputs": [
            {"name": "petals", "shape": [1, 2], "datatype": "FP32", "data": [[1.4, 0.2]]},
            {"name": "sepals", "shape": [1, 2], "datatype": "FP64", "data": [[5.1, 3.5]]},
        ]
    }
    response = httpx.post(f"{proxy}/compositions/two/predict", json=body)
    assert response.status_code == 200
    p = 1 / (1 + np.exp(-(1.4 + 0.2 - 5.1 - 3.5)))
    assert response.json()["two_inputs"]["prediction"] == pytest.approx([p, 1 - p], abs=1e-6)
