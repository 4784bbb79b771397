"""make bench's peers (bench/peer_bench.py) answer as the proxy's models do before they are timed:
Triton BLS on the real embedded Triton (iris_bls on the 150 Iris rows, wine_bls on the 178 wine
rows, against onnxruntime), and Ray Serve from its own environment (the 150 rows; a bad body
refused; its whole cluster gone once stopped)."""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from bench import peer_bench
from bench.reaping import process_tree, running
from local_triton import TritonServer
from training import wine

from .conftest import MODEL_REPOSITORY
from .helpers import short_tmpdir

CLASSES = ("setosa", "versicolor", "virginica")


def _p(name: str, x: NDArray[np.float32]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(MODEL_REPOSITORY / name / "1" / "model.onnx"))
    return session.run(None, {"input": x})[0][:, 0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def bls_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = peer_bench.triton_repository(tmp_path_factory.mktemp("peers"))
    with TritonServer(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0) as server:
        yield server


def test_triton_bls_answers_the_iris_rows_as_onnxruntime(
    bls_triton: TritonServer, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    x, _ = iris
    scores = np.stack([_p(n, x) for n in CLASSES], axis=1)
    expected = [CLASSES[i] for i in scores.argmax(axis=1)]
    assert peer_bench._oip(bls_triton.http_url, "iris_bls", x.tolist()) == expected
    answer = peer_bench._post(
        f"http://{bls_triton.http_url}/v2/models/iris_bls/infer", peer_bench.bls_body("iris_bls", x.tolist())
    )
    (proba,) = [o for o in answer["outputs"] if o["name"] == "proba"]
    np.testing.assert_allclose(proba["data"], scores.max(axis=1), atol=1e-6)
    # The same as Triton's own ensemble, row for row.
    assert peer_bench._oip(bls_triton.http_url, "iris_ensemble", x.tolist()) == expected


def test_triton_bls_answers_the_wine_rows_as_the_weighted_mean(bls_triton: TritonServer) -> None:
    x, _ = wine.load()
    probabilities = [
        ort.InferenceSession(str(MODEL_REPOSITORY / m.name / "1" / "model.onnx")).run(
            None, {m.input_name: x.astype(m.dtype)}
        )[0]
        for m in wine.MODELS
    ]
    mean = wine.soft_vote(probabilities, [m.weight for m in wine.MODELS])
    expected = [wine.WINE_CLASSES[i] for i in mean.argmax(axis=1)]
    rows = x.astype(np.float32).tolist()
    assert peer_bench._oip(bls_triton.http_url, "wine_bls", rows, wine.N_FEATURES) == expected


def test_ray_serve_answers_the_iris_rows_as_onnxruntime_and_stops_whole(
    tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, _ = iris
    scores = np.stack([_p(n, x) for n in CLASSES], axis=1)
    expected = [CLASSES[i] for i in scores.argmax(axis=1)]
    with ExitStack() as stack:
        # Ray's session (its logs and sockets) in a directory of the test's own, not /tmp/ray.
        monkeypatch.setenv("TMPDIR", str(stack.enter_context(short_tmpdir())))
        ray, reason = peer_bench.start_ray(stack, tmp_path)
        assert ray is not None, f"Ray Serve did not start: {reason}"
        assert peer_bench._labels(f"{ray.url}/predict/label", x.tolist()) == expected
        one = peer_bench._post(f"{ray.url}/predict/label", json.dumps({"data": x[:1].tolist()}).encode())
        assert one["prediction"]["label"] == expected[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            peer_bench._post(f"{ray.url}/predict/label", b'{"data": [[1, 2]]}')
        assert refused.value.code == 422
        refused.value.close()
        cluster = process_tree(ray.pid)
        assert len(cluster) > 3  # the driver, Ray's own processes and the deployments' workers
    assert not [pid for pid in cluster if running(pid)]  # none left behind
