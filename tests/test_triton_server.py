"""The embedded Triton serves the committed repository: the real binary, the real models."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from local_triton import TritonServer, models_in
from training import CLASS_NAMES, wine
from training.models import CANDIDATE

from .conftest import MODEL_REPOSITORY

Client = httpclient.InferenceServerClient | grpcclient.InferenceServerClient


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, triton: TritonServer) -> Client:
    if request.param == "http":
        return httpclient.InferenceServerClient(triton.http_url)
    return grpcclient.InferenceServerClient(triton.grpc_url)


def _module(client: Client):  # type: ignore[no-untyped-def]
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def infer(client: Client, model: str, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    module = _module(client)
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def test_every_model_in_the_repository_is_ready(client: Client) -> None:
    names = models_in(MODEL_REPOSITORY)
    assert set(names) == {
        *CLASS_NAMES,
        CANDIDATE,
        "aggregate",
        "iris_ensemble",
        *(m.name for m in wine.MODELS),
    }
    assert client.is_server_ready()
    for name in names:
        assert client.is_model_ready(name), name


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_classifier_matches_onnxruntime_on_all_rows(
    client: Client, name: str, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    (served,) = infer(client, name, x, ["probabilities"])
    session = ort.InferenceSession(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
    (direct,) = session.run(None, {"input": x})
    assert served.shape == (150, 2) and served.dtype == np.float32
    np.testing.assert_allclose(served, direct, atol=1e-6, rtol=0)


def test_ensemble_aggregates_the_three_classifiers(
    client: Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = iris
    p_class = np.stack([infer(client, n, x, ["probabilities"])[0][:, 0] for n in CLASS_NAMES], axis=1)
    scores, label, proba, class_name = infer(
        client, "iris_ensemble", x, ["scores", "label", "proba", "class_name"]
    )
    np.testing.assert_allclose(scores, p_class, atol=1e-6, rtol=0)
    assert label.shape == (150, 1)
    assert label.ravel().tolist() == p_class.argmax(axis=1).tolist()
    np.testing.assert_allclose(proba.ravel(), p_class.max(axis=1), atol=1e-6, rtol=0)
    assert [c.decode() for c in class_name.ravel()] == [CLASS_NAMES[i] for i in label.ravel()]

    report = (MODEL_REPOSITORY / "TRAINING.md").read_text()
    reported = float(re.search(r"all_rows_label_accuracy: ([\d.]+)", report)[1])  # type: ignore[index]
    assert round(float((label.ravel() == y).mean()), 4) == reported


def test_ensemble_config_names_the_classes(triton: TritonServer) -> None:
    config = httpclient.InferenceServerClient(triton.http_url).get_model_config("iris_ensemble")
    assert config["parameters"]["class_names"]["string_value"].split(",") == list(CLASS_NAMES)


def test_wrong_shape_is_an_error_and_the_server_keeps_serving(
    client: Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    module = _module(client)
    bad = module.InferInput("input", [2, 3], "FP32")
    bad.set_data_from_numpy(x[:2, :3].copy())
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        client.infer("setosa", [bad])
    wrong_name = module.InferInput("features", [1, 4], "FP32")
    wrong_name.set_data_from_numpy(x[:1])
    with pytest.raises(InferenceServerException):
        client.infer("versicolor", [wrong_name])
    (after,) = infer(client, "setosa", x[:3], ["probabilities"])
    assert after.shape == (3, 2)


def test_metrics_count_successful_requests_per_model(
    triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris

    def successes() -> dict[str, int]:
        with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
            text = response.read().decode()
        counts = {}
        for name in [*CLASS_NAMES, "aggregate", "iris_ensemble"]:
            match = re.search(
                rf'^nv_inference_request_success{{model="{name}",version="1"}} (\d+)', text, re.M
            )
            counts[name] = int(match[1]) if match else 0
        return counts

    before = successes()
    client = httpclient.InferenceServerClient(triton.http_url)
    for name in [*CLASS_NAMES, "iris_ensemble"]:
        infer(client, name, x[:5], ["probabilities"] if name in CLASS_NAMES else ["label"])
    after = successes()
    # One request to each classifier directly, and one more through the ensemble's steps.
    expected = {**dict.fromkeys(CLASS_NAMES, 2), "aggregate": 1, "iris_ensemble": 1}
    assert {n: after[n] - before[n] for n in after} == expected


@pytest.mark.parametrize("model", wine.MODELS, ids=lambda m: m.name)
def test_wine_models_serve_their_own_tensors_equal_to_onnxruntime(
    client: Client, model: wine.WineModel
) -> None:
    """Other names, other widths, FP64 on one: Triton serves them as their configs declare."""
    x, _ = wine.load()
    rows = x.astype(model.dtype)
    module = _module(client)
    datatype = "FP64" if model.dtype == np.float64 else "FP32"
    tensor = module.InferInput(model.input_name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    result = client.infer(model.name, [tensor], outputs=[module.InferRequestedOutput(model.output_name)])
    served = result.as_numpy(model.output_name)
    session = ort.InferenceSession(str(MODEL_REPOSITORY / model.name / "1" / "model.onnx"))
    (expected,) = session.run(None, {model.input_name: rows})
    assert served.dtype == model.dtype and served.shape == (len(x), len(wine.WINE_CLASSES))
    np.testing.assert_allclose(served, expected, atol=1e-6, rtol=0)
    metadata = (
        client.get_model_metadata(model.name, as_json=True)
        if module is grpcclient
        else client.get_model_metadata(model.name)
    )
    assert [i["name"] for i in metadata["inputs"]] == [model.input_name]
    assert [o["datatype"] for o in metadata["outputs"]] == [datatype]
