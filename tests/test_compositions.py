"""The compositions file: what it declares, and one line naming each mistake."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from client_proxy.core.aggregators import mean, vote
from local_triton import TritonServer, free_ports
from training import wine

from .conftest import MODEL_REPOSITORY
from .helpers import proxy_environment, running_proxy, services_on, settings, triton_stats

# -- against the real Triton: the wine models, composed by configuration alone ------------------
WINE_FILE = """
compositions:
  wine_mean:
    description: the three wine classifiers, soft vote
    services:
      wine_logreg: {target: "grpc://TRITON/wine_logreg", weight: 2}
      wine_gbt: {target: "grpc://TRITON/wine_gbt"}
      wine_knn: {target: "http://TRITON_HTTP/wine_knn"}
    aggregator: mean
  wine_vote:
    services:
      wine_logreg: {target: "grpc://TRITON/wine_logreg"}
      wine_gbt: {target: "grpc://TRITON/wine_gbt"}
      wine_knn: {target: "grpc://TRITON/wine_knn"}
    aggregator: vote
  with_ghost:
    services:
      wine_logreg: {target: "grpc://TRITON/wine_logreg"}
      wine_gbt: {target: "grpc://TRITON/wine_gbt"}
      ghost: {target: "grpc://TRITON/no_such_model"}
    aggregator: mean
    min_answers: MIN
  raw:
    services:
      wine_gbt: {target: "grpc://TRITON/wine_gbt"}
    aggregator: none
"""


def _wine_file(tmp_path: Path, triton: TritonServer, min_answers: int = 2) -> Path:
    path = tmp_path / "compositions.yaml"
    text = WINE_FILE.replace("TRITON_HTTP", triton.http_url).replace("TRITON", triton.grpc_url)
    path.write_text(text.replace("MIN", str(min_answers)))
    return path


def _onnxruntime(x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    out = {}
    for m in wine.MODELS:
        session = ort.InferenceSession(str(MODEL_REPOSITORY / m.name / "1" / "model.onnx"))
        out[m.name] = session.run(None, {m.input_name: x.astype(m.dtype)})[0]
    return out


@pytest.fixture(scope="module")
def wine_proxy(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = _wine_file(tmp_path_factory.mktemp("compositions"), triton)
    with running_proxy(settings(compositions_file=path), services_on(triton, "grpc")) as url:
        yield url


def test_the_wine_soft_vote_answers_as_onnxruntime_and_the_report_says(wine_proxy: str) -> None:
    _, x_test, _, y_test = wine.split()
    body = httpx.post(f"{wine_proxy}/compositions/wine_mean/label", json={"data": x_test.tolist()}).json()
    expected = mean(_onnxruntime(x_test), wine.WINE_CLASSES, {m.name: m.weight for m in wine.MODELS})
    assert [r["label"] for r in body["prediction"]] == expected.labels
    np.testing.assert_allclose([r["proba"] for r in body["prediction"]], expected.proba, atol=1e-5)
    assert list(body["prediction"][0]["scores"]) == list(wine.WINE_CLASSES)  # class names read from Triton
    accuracy = np.mean(
        [r["label"] == wine.WINE_CLASSES[y] for r, y in zip(body["prediction"], y_test, strict=True)]
    )
    assert (
        f"weighted mean of the probabilities (wine_logreg 2, wine_gbt 1, wine_knn 1): {accuracy:.4f}"
        in (MODEL_REPOSITORY / "TRAINING.md").read_text()
    )


def test_the_wine_vote_answers_as_the_report_says(wine_proxy: str) -> None:
    _, x_test, _, y_test = wine.split()
    body = httpx.post(f"{wine_proxy}/compositions/wine_vote/label", json={"data": x_test.tolist()}).json()
    assert [r["label"] for r in body["prediction"]] == vote(_onnxruntime(x_test), wine.WINE_CLASSES).labels
    accuracy = np.mean(
        [r["label"] == wine.WINE_CLASSES[y] for r, y in zip(body["prediction"], y_test, strict=True)]
    )
    assert (
        f"majority vote of the argmax (ties to the lowest class): {accuracy:.4f}"
        in (MODEL_REPOSITORY / "TRAINING.md").read_text()
    )


def test_each_services_output_as_the_model_gives_it(wine_proxy: str) -> None:
    x, _ = wine.load()
    body = httpx.post(f"{wine_proxy}/compositions/wine_mean/predict", json={"data": x[:20].tolist()}).json()
    for name, expected in _onnxruntime(x[:20]).items():
        np.testing.assert_allclose(body[name]["prediction"], expected, atol=1e-6)
    one = httpx.post(f"{wine_proxy}/compositions/raw/predict", json={"data": x[:1].tolist()}).json()
    assert len(one["wine_gbt"]["prediction"]) == 3  # one row: the row's vector, as the seed's /predict
    assert (
        httpx.post(f"{wine_proxy}/compositions/raw/label", json={"data": x[:1].tolist()}).status_code == 422
    )


def test_a_partial_answer_needs_min_answers(triton: TritonServer, tmp_path: Path) -> None:
    x, _ = wine.load()
    rows = {"data": x[:2].tolist()}
    for minimum, status in ((2, 200), (3, 503)):
        path = _wine_file(tmp_path, triton, min_answers=minimum)
        with running_proxy(settings(compositions_file=path), services_on(triton, "grpc")) as url:
            response = httpx.post(f"{url}/compositions/with_ghost/label", json=rows)
        assert response.status_code == status, response.text
        if status == 200:
            assert response.json()["partial"] is True and list(response.json()["missing"]) == ["ghost"]
        else:
            error = response.json()["error"]
            assert "2 of 3 services answered, 3 needed" in error["message"]
            assert error["services"]["ghost"]["reason"] == "unavailable"


def test_the_default_composition_is_the_seeds_fan_out(
    wine_proxy: str, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    seed = httpx.post(f"{wine_proxy}/predict/label", json={"data": x.tolist()}).json()["prediction"]
    default = httpx.post(f"{wine_proxy}/compositions/default/label", json={"data": x.tolist()}).json()[
        "prediction"
    ]
    assert [r["label"] for r in default] == [r["label"] for r in seed]
    np.testing.assert_allclose([r["proba"] for r in default], [r["proba"] for r in seed], atol=1e-7)
    listed = httpx.get(f"{wine_proxy}/compositions").json()["compositions"]
    assert set(listed) == {"default", "wine_mean", "wine_vote", "with_ghost", "raw"}
    assert listed["wine_mean"]["services"]["wine_logreg"]["weight"] == 2
    missing = httpx.post(f"{wine_proxy}/compositions/nope/label", json={"data": [[1.0]]})
    assert missing.status_code == 404 and "wine_mean" in missing.json()["error"]["message"]
    misfit = httpx.post(f"{wine_proxy}/compositions/wine_mean/label", json={"data": [[1.0, 2.0, 3.0, 4.0]]})
    assert misfit.status_code == 422
    assert (
        "expects input 'measurements' FP64 [N, 13], got rows of shape [1, 4]"
        in misfit.json()["error"]["message"]
    )


def test_an_invalid_compositions_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "compositions.yaml"
    path.write_text("compositions:\n  c:\n    services: {ghost: {}}\n    aggregator: mean\n")
    env = proxy_environment(settings(compositions_file=path), [], free_ports(1)[0])
    done = subprocess.run(
        [sys.executable, "-m", "client_proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "line 3" in done.stderr and "ghost" in done.stderr


def test_the_stream_gives_each_service_then_the_aggregated_answer(wine_proxy: str) -> None:
    x, _ = wine.load()
    with httpx.stream(
        "POST", f"{wine_proxy}/compositions/wine_mean/stream", json={"data": x[:3].tolist()}
    ) as response:
        assert response.status_code == 200
        lines = [httpx.Response(200, content=line).json() for line in response.iter_lines() if line]
    *services, final = lines
    assert sorted(line["service"] for line in services) == ["wine_gbt", "wine_knn", "wine_logreg"]
    expected = mean(_onnxruntime(x[:3]), wine.WINE_CLASSES, {m.name: m.weight for m in wine.MODELS})
    assert final["final"] is True and [r["label"] for r in final["prediction"]] == expected.labels
    with httpx.stream(
        "POST", f"{wine_proxy}/compositions/with_ghost/stream", json={"data": x[:1].tolist()}
    ) as response:
        last = httpx.Response(200, content=[line for line in response.iter_lines() if line][-1]).json()
    assert last["partial"] is True and list(last["missing"]) == ["ghost"] and "label" in last["prediction"]


# -- serial pipelines over the same contracts and aggregators ----------------------------------
WINE_CASCADE = """
pipelines:
  wine_cascade:
    description: logistic regression first; when it is not sure, the other two join it
    aggregator: mean
    steps:
      - name: logreg
        services: [wine_logreg]
        stop_if: "proba >= 0.95"
      - name: others
        services: [wine_gbt, wine_knn]
  by_class:
    aggregator: mean
    steps:
      - name: gbt
        services: [wine_gbt]
        stop_if: "class_1 >= 0.9"
      - name: knn
        services: [wine_knn]
"""


@pytest.fixture(scope="module")
def wine_pipelines_proxy(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("wine_pipelines")
    (folder / "pipelines.yaml").write_text(WINE_CASCADE)
    proxy_settings = settings(
        compositions_file=_wine_file(folder, triton), pipelines_file=folder / "pipelines.yaml"
    )
    # The pipelines name services the compositions file declares (no SERVICE_ line for them).
    with running_proxy(proxy_settings, services_on(triton, "grpc")) as url:
        yield url


def test_a_pipeline_aggregates_its_steps_like_a_composition(wine_pipelines_proxy: str) -> None:
    """Each row's answer is the mean over every service that answered for it: logreg's alone
    where it was sure (stop_if reads that answer), all three's where it was not."""
    x, _ = wine.load()
    out = _onnxruntime(x)
    sure = out["wine_logreg"].max(axis=1) >= 0.95
    assert 0 < sure.sum() < len(x)  # the condition splits the rows, or the test proves nothing
    everyone = mean(out, wine.WINE_CLASSES)
    expected_labels = [
        wine.WINE_CLASSES[int(out["wine_logreg"][i].argmax())] if sure[i] else everyone.labels[i]
        for i in range(len(x))
    ]
    expected_proba = np.where(sure, out["wine_logreg"].max(axis=1), everyone.proba)

    body = httpx.post(f"{wine_pipelines_proxy}/pipelines/wine_cascade", json={"data": x.tolist()}).json()
    assert [r["label"] for r in body["prediction"]] == expected_labels
    np.testing.assert_allclose([r["proba"] for r in body["prediction"]], expected_proba, atol=1e-5)
    assert [r["stopped_at"] == "logreg" for r in body["prediction"]] == sure.tolist()
    assert list(body["prediction"][0]["scores"]) == list(wine.WINE_CLASSES)  # the models' class names
    assert [(p["step"], p["rows"], p["stopped_rows"]) for p in body["path"]] == [
        ("logreg", len(x), int(sure.sum())),
        ("others", int((~sure).sum()), 0),
    ]


def test_stop_if_reads_a_class_of_the_aggregated_answer(wine_pipelines_proxy: str) -> None:
    x, _ = wine.load()
    gbt = _onnxruntime(x)["wine_gbt"]
    confident = gbt[:, 1] >= 0.9
    assert 0 < confident.sum() < len(x)
    body = httpx.post(f"{wine_pipelines_proxy}/pipelines/by_class", json={"data": x.tolist()}).json()
    assert [r["stopped_at"] == "gbt" for r in body["prediction"]] == confident.tolist()
    assert all(r["label"] == "class_1" for r, c in zip(body["prediction"], confident, strict=True) if c)


def test_a_pipeline_refuses_rows_that_do_not_fit_before_any_call(wine_pipelines_proxy: str) -> None:
    response = httpx.post(f"{wine_pipelines_proxy}/pipelines/wine_cascade", json={"data": [[1.0, 2.0]]})
    assert response.status_code == 422
    assert "wine_logreg" in response.json()["error"]["message"]


def test_class_names_come_from_a_label_file_when_the_config_has_no_parameter(
    explicit_triton: TritonServer, test_repository: Path, tmp_path: Path
) -> None:
    """``label_filename`` alone: the proxy asks Triton (its classification extension) once."""
    import tritonclient.grpc as grpcclient

    model = test_repository / "cultivars"
    shutil.copytree(MODEL_REPOSITORY / "wine_gbt", model)
    config = (model / "config.pbtxt").read_text().replace('name: "wine_gbt"', 'name: "cultivars"')
    config = config[: config.index('parameters {\n  key: "class_names"')]  # no class_names parameter
    (model / "config.pbtxt").write_text(config)
    (model / "labels.txt").write_text("barolo\ngrignolino\nbarbera\n")
    control = grpcclient.InferenceServerClient(explicit_triton.grpc_url)
    control.load_model("cultivars")
    path = tmp_path / "compositions.yaml"
    path.write_text(
        "compositions:\n  cultivars:\n    services:\n"
        f'      cultivars: {{target: "{explicit_triton.grpc_url}/cultivars"}}\n    aggregator: mean\n'
    )
    x, _ = wine.load()
    try:
        with running_proxy(settings(compositions_file=path), services_on(explicit_triton, "grpc")) as url:
            before = triton_stats(explicit_triton, ("cultivars",))["cultivars"]
            bodies = [
                httpx.post(f"{url}/compositions/cultivars/label", json={"data": x[:20].tolist()})
                for _ in range(3)
            ]
            calls = triton_stats(explicit_triton, ("cultivars",))["cultivars"] - before
    finally:
        control.unload_model("cultivars")
        control.close()
    names = ("barolo", "grignolino", "barbera")
    expected = [names[i] for i in _onnxruntime(x[:20])["wine_gbt"].argmax(axis=1)]
    for body in bodies:
        assert body.status_code == 200, body.text
        assert [r["label"] for r in body.json()["prediction"]] == expected
        assert list(body.json()["prediction"][0]["scores"]) == list(names)
    assert calls == 3 + 1  # one inference per request, and the labels read once
