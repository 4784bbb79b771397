"""Serial pipelines, the ensemble route and the admin endpoints, against the real embedded Triton."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from client_proxy.core.services import Service
from local_triton import TritonServer
from training import CLASS_NAMES

from .conftest import ROOT
from .helpers import running_proxy, services_on, settings, triton_stats

IRIS = {n: Service(n, "grpc", "x:1", n) for n in CLASS_NAMES}


def test_start_up_stops_on_an_invalid_pipeline_file(tmp_path: Path) -> None:
    path = _pipelines_file(
        tmp_path, "pipelines:\n  p:\n    steps:\n      - name: a\n        services: [ghost]\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PROXY_PIPELINES_FILE": str(path)}
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "line 5" in result.stderr and "ghost" in result.stderr


# -- the cascade against the real Triton ---------------------------------------------------------
@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[httpx.Client]:
    with (
        running_proxy(settings(), services_on(triton, "grpc")) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        yield c


def test_pipelines_are_listed(proxy: httpx.Client) -> None:
    body = proxy.get("/pipelines").json()
    steps = body["pipelines"]["iris_cascade"]["steps"]
    assert [s["name"] for s in steps] == ["setosa", "versicolor_or_virginica"]
    assert steps[0]["stop_if"] == "setosa >= 0.9" and steps[0]["on_failure"] == "skip"


def test_cascade_gives_the_fan_outs_labels_with_fewer_triton_calls(
    proxy: httpx.Client, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    before = triton_stats(triton)
    fanout = [
        proxy.post("/predict/label", json={"data": [row]}).json()["prediction"]["label"] for row in x.tolist()
    ]
    middle = triton_stats(triton)
    cascade = [proxy.post("/pipelines/iris_cascade", json={"data": [row]}).json() for row in x.tolist()]
    after = triton_stats(triton)

    assert [c["prediction"]["label"] for c in cascade] == fanout
    fanout_calls = sum(middle[n] - before[n] for n in CLASS_NAMES)
    cascade_calls = sum(after[n] - middle[n] for n in CLASS_NAMES)
    assert fanout_calls == 3 * 150
    stopped_early = sum(c["prediction"]["stopped_at"] == "setosa" for c in cascade)
    assert stopped_early == 50  # the setosa rows
    assert cascade_calls == 150 + 2 * (150 - stopped_early) == sum(c["triton_calls"] for c in cascade)
    assert after["setosa"] - middle["setosa"] == 150


def test_cascade_batched_routes_rows_one_by_one(
    proxy: httpx.Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    fanout = [
        r["label"] for r in proxy.post("/predict/label", json={"data": x.tolist()}).json()["prediction"]
    ]
    body = proxy.post("/pipelines/iris_cascade", json={"data": x.tolist()}).json()
    assert [r["label"] for r in body["prediction"]] == fanout
    assert [(p["step"], p["rows"], p["stopped_rows"]) for p in body["path"]] == [
        ("setosa", 150, 50),
        ("versicolor_or_virginica", 100, 0),
    ]
    assert body["triton_calls"] == 3 and all(p["latency_ms"] > 0 for p in body["path"])


def test_unknown_pipeline_is_404(proxy: httpx.Client) -> None:
    response = proxy.post("/pipelines/nope", json={"data": [[1, 2, 3, 4]]})
    assert response.status_code == 404 and "iris_cascade" in response.json()["error"]["message"]


def test_ensemble_route_answers_as_the_fan_out(
    proxy: httpx.Client, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    fanout = proxy.post("/predict/label", json={"data": x.tolist()}).json()["prediction"]
    ensemble = proxy.post("/predict/label", params={"route": "ensemble"}, json={"data": x.tolist()}).json()
    assert [r["label"] for r in ensemble["prediction"]] == [r["label"] for r in fanout]
    np.testing.assert_allclose(
        [r["proba"] for r in ensemble["prediction"]], [r["proba"] for r in fanout], atol=1e-6
    )
    one = proxy.post(
        "/predict/label", headers={"X-Route": "ensemble"}, json={"data": [[1.0, 2.0, 3.0, 4.0]]}
    ).json()
    assert set(one) == {"prediction"} and set(one["prediction"]) == {"proba", "label"}
    assert (
        proxy.post("/predict/label", params={"route": "sideways"}, json={"data": [[1, 2, 3, 4]]}).status_code
        == 422
    )


def test_ensemble_route_by_setting(triton: TritonServer) -> None:
    with running_proxy(settings(label_route="ensemble"), services_on(triton, "http")) as url:
        body = httpx.post(f"{url}/predict/label", json={"data": [[1.0, 2.0, 3.0, 4.0]]}).json()
        assert body["prediction"]["label"] == "virginica"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'proxy_service_calls_total{outcome="ok",service="ensemble"} 1.0' in metrics


def test_the_ensemble_route_batches_concurrent_requests_into_fewer_triton_calls(
    triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    with running_proxy(settings(coalesce=True, in_flight_per_service=1), services_on(triton, "grpc")) as url:
        fanout = httpx.post(f"{url}/predict/label", json={"data": x.tolist()}).json()["prediction"]

        async def one_row_each() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(
                    *(
                        client.post("/predict/label", params={"route": "ensemble"}, json={"data": [row]})
                        for row in x.tolist()
                    )
                )

        model = ("iris_ensemble",)
        before, rows_before = triton_stats(triton, model), triton_stats(triton, model, what="rows")
        responses = asyncio.run(one_row_each())
        after, rows_after = triton_stats(triton, model), triton_stats(triton, model, what="rows")
    assert [r.status_code for r in responses] == [200] * len(x)
    # Each request still gets its own row's answer, the one the fan-out gives.
    assert [r.json()["prediction"]["label"] for r in responses] == [p["label"] for p in fanout]
    np.testing.assert_allclose(
        [r.json()["prediction"]["proba"] for r in responses], [p["proba"] for p in fanout], atol=1e-6
    )
    # Counted by Triton: every row reached the ensemble once, in fewer calls than requests.
    assert rows_after["iris_ensemble"] - rows_before["iris_ensemble"] == len(x)
    assert after["iris_ensemble"] - before["iris_ensemble"] < len(x)


# -- skip and fail, with the test-only failing model -------------------------------------------------
def _failing_pipelines(tmp_path: Path, on_failure: str) -> Path:
    return _pipelines_file(
        tmp_path,
        "pipelines:\n  guarded:\n    steps:\n"
        "      - name: flaky\n        services: [failing]\n        stop_if: failing >= 0.5\n"
        f"        on_failure: {on_failure}\n"
        "      - name: all\n        services: [setosa, versicolor, virginica]\n",
    )


def test_a_failing_step_with_skip_is_skipped(explicit_triton: TritonServer, tmp_path: Path) -> None:
    models = {"failing": "failing", **{n: n for n in CLASS_NAMES}}
    proxy_settings = settings(pipelines_file=_failing_pipelines(tmp_path, "skip"))
    with running_proxy(proxy_settings, services_on(explicit_triton, "grpc", models)) as url:
        body = httpx.post(f"{url}/pipelines/guarded", json={"data": [[1.0, 2.0, 3.0, 4.0]]}).json()
    assert body["prediction"]["label"] == "virginica" and body["prediction"]["stopped_at"] == "all"
    flaky, rest = body["path"]
    assert flaky["status"] == "skipped" and flaky["missing"]["failing"]["reason"] == "error"
    assert rest["status"] == "ran"


def test_a_failing_step_with_fail_fails_naming_the_step(
    explicit_triton: TritonServer, tmp_path: Path
) -> None:
    models = {"failing": "failing", **{n: n for n in CLASS_NAMES}}
    proxy_settings = settings(pipelines_file=_failing_pipelines(tmp_path, "fail"))
    with running_proxy(proxy_settings, services_on(explicit_triton, "grpc", models)) as url:
        response = httpx.post(f"{url}/pipelines/guarded", json={"data": [[1.0, 2.0, 3.0, 4.0]]})
    assert response.status_code == 503
    assert "step 'flaky'" in response.json()["error"]["message"]


def _pipelines_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


def _p_class(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each Iris model's P(class) per row, from onnxruntime on the ONNX files."""
    import onnxruntime as ort

    return {
        n: ort.InferenceSession(str(ROOT / "model_repository" / n / "1" / "model.onnx")).run(
            None, {"input": x}
        )[0][:, 0]
        for n in CLASS_NAMES
    }


def test_a_step_reads_an_earlier_steps_output(
    explicit_triton: TritonServer, tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    """``input: first.setosa``: the second step's model gets setosa's [P, 1-P] pairs as its input."""
    pipelines = _pipelines_file(tmp_path, """
pipelines:
  chained:
    steps:
      - name: first
        services: [setosa]
        input: request
      - name: second
        services: [swap]
        input: first.setosa
""")  # fmt: skip
    models = {"setosa": "setosa", "swap": "swap"}
    x, _ = iris
    with running_proxy(
        settings(pipelines_file=pipelines), services_on(explicit_triton, "grpc", models)
    ) as url:
        body = httpx.post(f"{url}/pipelines/chained", json={"data": x.tolist()}).json()
    p_setosa = _p_class(x)["setosa"]
    # swap's P(class) is setosa's P(other): the label is setosa exactly where P(setosa) > 1/2.
    assert [r["label"] for r in body["prediction"]] == ["setosa" if p > 0.5 else "swap" for p in p_setosa]
    assert [(p["step"], p["status"], p["rows"]) for p in body["path"]] == [
        ("first", "ran", 150),
        ("second", "ran", 150),
    ]
    np.testing.assert_allclose(
        [r["proba"] for r in body["prediction"]], np.maximum(p_setosa, 1 - p_setosa), atol=1e-6, rtol=0
    )


def test_stop_if_max_stops_the_rows_whose_best_score_meets_it(
    explicit_triton: TritonServer, tmp_path: Path, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    pipelines = _pipelines_file(tmp_path, """
pipelines:
  others_first:
    steps:
      - name: others
        services: [versicolor, virginica]
        stop_if: "max >= 0.9"
      - name: setosa
        services: [setosa]
""")  # fmt: skip
    x, _ = iris
    p = _p_class(x)
    confident = np.maximum(p["versicolor"], p["virginica"]) >= 0.9
    assert 0 < confident.sum() < 150  # the rule splits the rows, or the test proves nothing
    with running_proxy(settings(pipelines_file=pipelines), services_on(explicit_triton, "grpc")) as url:
        body = httpx.post(f"{url}/pipelines/others_first", json={"data": x.tolist()}).json()
    assert [(s["step"], s["rows"], s["stopped_rows"]) for s in body["path"]] == [
        ("others", 150, int(confident.sum())),
        ("setosa", int((~confident).sum()), 0),
    ]
    stopped = [r["stopped_at"] for r in body["prediction"]]
    assert [s == "others" for s in stopped] == confident.tolist()


def test_on_failure_fail_with_a_timeout_is_504_naming_the_step(
    explicit_triton: TritonServer, tmp_path: Path
) -> None:
    pipelines = _pipelines_file(tmp_path, """
pipelines:
  waits:
    steps:
      - name: first
        services: [setosa]
      - name: late
        services: [very_slow]
        on_failure: fail
""")  # fmt: skip
    models = {"setosa": "setosa", "very_slow": "very_slow"}
    proxy_settings = settings(pipelines_file=pipelines, deadline_ms=300)
    with running_proxy(proxy_settings, services_on(explicit_triton, "grpc", models)) as url:
        response = httpx.post(f"{url}/pipelines/waits", json={"data": [[1.0, 2.0, 3.0, 4.0]]})
    assert response.status_code == 504, response.text
    message = response.json()["error"]["message"]
    assert "step 'late'" in message and "timeout" in message


def test_the_ensemble_setting_names_where_the_ensemble_is(
    explicit_triton: TritonServer, triton: TritonServer
) -> None:
    # The services' Triton has no ensemble; PROXY_ENSEMBLE points at one that has.
    services = services_on(explicit_triton, "grpc")
    row = {"data": [[5.1, 3.5, 1.4, 0.2]]}
    with running_proxy(settings(), services) as url:
        assert httpx.post(f"{url}/predict/label?route=ensemble", json=row).status_code == 503
    with running_proxy(settings(ensemble=f"grpc://{triton.grpc_url}/iris_ensemble"), services) as url:
        fanout = httpx.post(f"{url}/predict/label", json=row).json()
        ensemble = httpx.post(f"{url}/predict/label?route=ensemble", json=row)
        assert ensemble.status_code == 200
        assert ensemble.json()["prediction"]["label"] == fanout["prediction"]["label"] == "setosa"
