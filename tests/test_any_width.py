"""The seed's routes are the default composition of any ``SERVICE_*`` one-vs-rest classifiers:
three 30-feature binary models, wired with ``SERVICE_*`` lines alone and served by the
project's own Triton, answer ``/predict``, ``/predict/label`` and ``/predict/stream`` with the
rows' width read from their contracts, as onnxruntime computes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from client_proxy.core.services import Service
from local_triton import TritonServer
from training.export import renamed_classifier_to_onnx

from .helpers import running_proxy, settings

WIDTH = 30
NAMES = ("alpha", "beta", "gamma")
CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 64
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {width} ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] }} ]
"""


@pytest.fixture(scope="module")
def wide(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TritonServer, np.ndarray, dict[str, np.ndarray]]]:
    """A Triton serving three 30-feature one-vs-rest classifiers; 20 rows; onnxruntime's answers."""
    root = tmp_path_factory.mktemp("wide")
    x, y = make_classification(n_samples=300, n_features=WIDTH, n_informative=8, n_classes=3, random_state=7)
    x = x.astype(np.float32)
    rows = x[:20]
    expected = {}
    for i, name in enumerate(NAMES):
        # Its class labelled 0, the others 1: the probabilities are [P(class), P(other)], as the seed's.
        model = LogisticRegression(max_iter=2000).fit(x, (y != i).astype(int))
        proto = renamed_classifier_to_onnx(model, name, "input", "probabilities", WIDTH, np.float32)
        directory = root / name / "1"
        directory.mkdir(parents=True)
        onnx.save(proto, directory / "model.onnx")
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, width=WIDTH))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        expected[name] = session.run(None, {"input": rows})[0]
    with TritonServer(model_repository=Path(root), http_port=0, grpc_port=0, metrics_port=0) as server:
        yield server, rows, expected


def test_the_seed_routes_and_metadata_take_the_models_width_from_their_contracts(
    wide: tuple[TritonServer, np.ndarray, dict[str, np.ndarray]],
) -> None:
    server, rows, expected = wide
    services = [Service(name, "grpc", server.grpc_url, name) for name in NAMES]
    with running_proxy(settings(), services) as url:
        body = {"data": rows.tolist()}
        predictions = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert predictions.status_code == 200, predictions.text
        for name in NAMES:
            np.testing.assert_allclose(predictions.json()[name]["prediction"], expected[name], atol=1e-5)
        label = httpx.post(f"{url}/predict/label", json=body, timeout=30)
        assert label.status_code == 200, label.text
        p_class = np.stack([expected[name][:, 0] for name in NAMES], axis=1)
        assert [p["label"] for p in label.json()["prediction"]] == [NAMES[i] for i in p_class.argmax(axis=1)]
        np.testing.assert_allclose(
            [p["proba"] for p in label.json()["prediction"]], p_class.max(axis=1), atol=1e-5
        )
        lines = httpx.post(
            f"{url}/predict/stream", json={"data": rows[:1].tolist()}, timeout=30
        ).text.splitlines()
        final = json.loads(lines[-1])
        assert final["final"] is True and final["prediction"]["label"] == NAMES[int(p_class[0].argmax())]
        # A row of the Iris width is refused by the models' contract, naming the service.
        short = httpx.post(f"{url}/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
        assert short.status_code == 422
        assert "FP32 [N, 30], got rows of shape [1, 4]" in short.json()["error"]["message"]
        # /metadata describes the rows these models take, not the Iris example's.
        metadata = httpx.get(f"{url}/metadata", timeout=30).json()
        assert (metadata["data_type"], metadata["data_structure"]) == ("float32", "(N,30)")
        assert metadata["data_sample"] == [[0.0] * 30]
