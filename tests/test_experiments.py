"""Experiments against the real Triton and ``python -m client_proxy`` (``core/experiments.py``,
``core/shadows.py``): a 90/10 split over 2,000 requests holds within statistical bounds and is
sticky per caller, on both doors; a slow, failing or down shadow changes neither the answers nor
their p99; the agreement counted equals the agreement onnxruntime computes on the same rows, and
the disagreeing rows kept are exactly those; promote and roll back by reload, under load."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from bench.webhook_receiver import webhook_receiver
from client_proxy.core.experiments import key_point
from local_triton import TritonServer, free_ports

from .conftest import MODEL_REPOSITORY
from .helpers import metric, proxy_process, services_on, settings
from .servers import loaded_store

TOKEN = "experiments-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = {"setosa": "setosa", "versicolor": "versicolor", "virginica": "virginica"}


def _composition(name: str, url: str, models: dict[str, str], more: str = "") -> str:
    services = "".join(f"      {s}: {{target: 'grpc://{url}/{m}'}}\n" for s, m in models.items())
    return f"  {name}:\n    services:\n{services}    aggregator: one_vs_rest\n{more}"


def _file(url: str, experiments: str, **others: dict[str, str]) -> str:
    """``iris`` and ``plain`` (the three classifiers), ``iris_v2`` (versicolor_v2 in versicolor's
    place), and ``others``; then ``experiments``, the YAML of the section's body."""
    compositions = {"iris": MODELS, "plain": MODELS, "iris_v2": {**MODELS, "versicolor": "versicolor_v2"}}
    text = "compositions:\n" + "".join(_composition(n, url, m) for n, m in {**compositions, **others}.items())
    return text + (f"experiments:\n{experiments}" if experiments else "")


@contextmanager
def _proxy(triton: TritonServer, tmp_path: Path, text: str, **overrides: object) -> Iterator[str]:
    compositions = tmp_path / "compositions.yaml"
    compositions.write_text(text)
    empty = tmp_path / "pipelines.yaml"
    empty.write_text("pipelines: {}\n")
    chosen = settings(admin_token=TOKEN, compositions_file=compositions, pipelines_file=empty, **overrides)
    with proxy_process(chosen, services_on(triton, "grpc")) as (url, _):
        yield url


def _ort_labels(x: NDArray[np.float32], versicolor: str) -> list[str]:
    """The seed's rule over the committed ONNX files, as onnxruntime runs them."""
    columns = []
    for name in ("setosa", versicolor, "virginica"):
        path = MODEL_REPOSITORY / name / "1" / "model.onnx"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        columns.append(session.run(None, {"input": x})[0][:, 0])
    classes = ("setosa", "versicolor", "virginica")
    return [classes[i] for i in np.stack(columns, axis=1).argmax(axis=1)]


def _ort_p(x: NDArray[np.float32], name: str) -> NDArray[np.float32]:
    path = MODEL_REPOSITORY / name / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0][:, 0]  # type: ignore[no-any-return]


def _scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _bounds(n: int, p: float) -> tuple[float, float]:
    """Five standard deviations either side of a binomial's mean: outside, once in 1.7 million."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - 5 * sd, mean + 5 * sd


def test_a_90_10_split_holds_over_2000_requests_and_is_sticky_per_caller(
    triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    experiments = (
        "  iris:\n    candidates:\n      iris_v2: {split: 10}\n    allow_pin: true\n"
        "  iris_locked:\n    primary: plain\n    candidates:\n      iris_v2: {split: 10}\n"
    )
    x, _ = iris
    row = {"data": x[:1].tolist()}
    (door,) = free_ports(1)
    tally: Counter[str] = Counter()  # every answer of the experiment iris, by variant
    with _proxy(triton, tmp_path, _file(triton.grpc_url, experiments), grpc_port=door) as url:
        answered: dict[str, str] = {}
        lock = threading.Lock()

        def callers(users: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                for user in users:
                    response = client.post("/compositions/iris/label", json=row, headers={"X-User-ID": user})
                    assert response.status_code == 200, response.text
                    with lock:
                        answered[user] = response.json()["variant"]

        users = [f"user-{i}" for i in range(2000)]
        threads = [threading.Thread(target=callers, args=(users[i::8],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counts = Counter(answered.values())
        tally.update(counts)
        low, high = _bounds(2000, 0.10)
        assert low <= counts["iris_v2"] <= high and counts["iris"] + counts["iris_v2"] == 2000, counts
        # The header is the key: each caller is where its key falls.
        assert all((v == "iris_v2") == (key_point("iris", u) >= 90) for u, v in answered.items())

        with httpx.Client(base_url=url, timeout=10) as client:
            # Sticky: a caller asks again, and gets the same variant every time.
            for user in users[:100]:
                for _ in range(3):
                    again = client.post("/compositions/iris/label", json=row, headers={"X-User-ID": user})
                    assert again.json()["variant"] == answered[user]
                    tally[answered[user]] += 1
            # Without a key, the split is drawn: still 90/10.
            drawn = Counter(
                client.post("/compositions/iris/label", json=row).json()["variant"] for _ in range(2000)
            )
            tally.update(drawn)
            assert low <= drawn["iris_v2"] <= high, drawn
            # The pin, where allowed; refused where not; an unknown variant is named.
            pinned = client.post("/compositions/iris/label", json=row, headers={"X-Variant": "iris_v2"})
            assert pinned.status_code == 200 and pinned.json()["variant"] == "iris_v2"
            tally["iris_v2"] += 1
            refused = client.post(
                "/compositions/iris_locked/label", json=row, headers={"X-Variant": "iris_v2"}
            )
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "variant_pin_refused"
            unknown = client.post("/compositions/iris/label", json=row, headers={"X-Variant": "v9"})
            assert unknown.status_code == 422 and "iris, iris_v2" in unknown.json()["error"]["message"]
            # The protocol's door: the same model, the variant in the response's parameters.
            body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x[0].tolist()}]}
            for user in users[:20]:
                oip = client.post("/v2/models/iris/infer", json=body, headers={"X-User-ID": user})
                assert oip.json()["parameters"]["variant"] == answered[user]
                tally[answered[user]] += 1
            assert client.get("/v2/models/iris").json()["platform"] == "proxy_composition"

        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(f"127.0.0.1:{door}") as grpc_client:
            tensor = grpcclient.InferInput("input", [1, 4], "FP32")
            tensor.set_data_from_numpy(x[:1])
            for user in users[:20]:
                result = grpc_client.infer("iris", [tensor], headers={"x-user-id": user})
                assert result.get_response().parameters["variant"].string_param == answered[user]
                tally[answered[user]] += 1
            pinned_grpc = grpc_client.infer("iris", [tensor], headers={"x-variant": "iris_v2"})
            assert pinned_grpc.get_response().parameters["variant"].string_param == "iris_v2"
            tally["iris_v2"] += 1

        text = _scrape(url)
        for variant in ("iris", "iris_v2"):  # each answer counted once, by the variant that gave it
            assert (
                metric(text, "proxy_variant_requests_total", experiment="iris", variant=variant)
                == tally[variant]
            )
        assert metric(text, "proxy_variant_requests_total", experiment="iris_locked") == 0


def test_the_agreement_counted_equals_onnxruntime_and_the_sample_holds_the_disagreeing_rows(
    triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    with ExitStack() as stack:
        _agreement(stack, triton, tmp_path, iris)


def _agreement(
    stack: ExitStack,
    triton: TritonServer,
    tmp_path: Path,
    iris: tuple[NDArray[np.float32], NDArray[np.int64]],
) -> None:
    x, _ = iris
    expected = _ort_labels(x, "versicolor")
    theirs = _ort_labels(x, "versicolor_v2")
    differing = {i for i in range(len(x)) if expected[i] != theirs[i]}
    assert 0 < len(differing) < 20  # the candidate disagrees somewhere, as TRAINING.md says
    receiver = stack.enter_context(webhook_receiver())
    shadowed = "  iris:\n    candidates:\n      iris_v2: {shadow: 100}\n    sample: 50\n"
    experiments = f"{shadowed}    webhook: {receiver.url}\n"
    with _proxy(triton, tmp_path, _file(triton.grpc_url, experiments)) as url:
        where: dict[tuple[str, int], int] = {}
        with httpx.Client(base_url=url, timeout=10) as client:
            start = 0
            for size in (1, 4, 15, 30, 50, 50):  # 150 rows, in requests of several sizes
                response = client.post(
                    "/compositions/iris/label", json={"data": x[start : start + size].tolist()}
                )
                assert response.status_code == 200
                labels = response.json()["prediction"]
                labels = [labels] if size == 1 else labels
                assert [p["label"] for p in labels] == expected[start : start + size]  # the primary's
                for i in range(size):
                    where[(response.headers["x-request-id"], i)] = start + i
                start += size
        deadline = time.monotonic() + 30
        while True:
            text = _scrape(url)
            compared = metric(text, "proxy_shadow_rows_total", experiment="iris")
            if compared >= 150:
                break
            assert time.monotonic() < deadline, f"{compared} rows compared of 150"
            time.sleep(0.05)
        labels = {"experiment": "iris", "variant": "iris", "shadow": "iris_v2"}
        assert metric(text, "proxy_shadow_rows_total", outcome="agree", **labels) == 150 - len(differing)
        assert metric(text, "proxy_shadow_rows_total", outcome="disagree", **labels) == len(differing)
        assert metric(text, "proxy_shadow_rows_total", outcome="failed", **labels) == 0
        # The score differences: versicolor's, as onnxruntime has them; the other classes' none.
        delta = np.abs(_ort_p(x, "versicolor_v2") - _ort_p(x, "versicolor")).astype(np.float64)
        versicolor = {**labels, "class": "versicolor"}
        assert metric(text, "proxy_shadow_score_delta_count", **versicolor) == 150
        assert metric(text, "proxy_shadow_score_delta_sum", **versicolor) == pytest.approx(
            delta.sum(), abs=1e-3
        )
        # the same model, batched otherwise: the same to float32's last bits
        assert metric(text, "proxy_shadow_score_delta_sum", **{**labels, "class": "setosa"}) < 1e-5

        report = httpx.get(f"{url}/experiments/iris", headers=AUTH, timeout=10).json()
        assert report["rows"] == {
            "agree": 150 - len(differing),
            "disagree": len(differing),
            "failed": 0,
            "dropped": 0,
        }
        rows = {where[(d["request_id"], d["row"])]: d for d in report["disagreements"]}
        assert set(rows) == differing and len(report["disagreements"]) == len(differing)
        for i, d in rows.items():
            assert d["answered"]["variant"] == "iris" and d["answered"]["label"] == expected[i]
            assert d["shadow"]["variant"] == "iris_v2" and d["shadow"]["label"] == theirs[i]
        # Posted to the experiment's webhook too: each request's disagreeing rows, once.
        posted = [p.payload for p in receiver.wait_for(len({r["request_id"] for r in rows.values()}))]
        assert all(p["type"] == "disagreement" and p["experiment"] == "iris" for p in posted)
        assert sorted(where[(p["request_id"], r["row"])] for p in posted for r in p["rows"]) == sorted(
            differing
        )
        assert httpx.get(f"{url}/experiments/iris", timeout=10).status_code == 401
        assert httpx.get(f"{url}/experiments/nope", headers=AUTH, timeout=10).status_code == 404


def test_with_two_workers_every_report_adds_up_both_workers_rows(
    triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    # Each worker compares the requests it answered; a report, whichever worker gives it, has all.
    x, _ = iris
    expected, theirs = _ort_labels(x, "versicolor"), _ort_labels(x, "versicolor_v2")
    differing = {i for i in range(len(x)) if expected[i] != theirs[i]}
    experiments = "  iris:\n    candidates:\n      iris_v2: {shadow: 100}\n    sample: 50\n"
    two = {"workers": 2, "services_file": tmp_path / "services.json"}
    with _proxy(triton, tmp_path, _file(triton.grpc_url, experiments), **two) as url:
        where: dict[str, int] = {}
        for i, row in enumerate(x.tolist()):  # a connection each: both workers answer some
            response = httpx.post(f"{url}/compositions/iris/label", json={"data": [row]}, timeout=10)
            assert response.status_code == 200
            where[response.headers["x-request-id"]] = i
        assert len({request_id[:16] for request_id in where}) == 2  # each worker's own id prefix
        deadline = time.monotonic() + 30
        while (compared := metric(_scrape(url), "proxy_shadow_rows_total", experiment="iris")) < 150:
            assert time.monotonic() < deadline, f"{compared} rows compared of 150"
            time.sleep(0.05)
        reporters = set()
        for _ in range(200):
            response = httpx.get(f"{url}/experiments/iris", headers=AUTH, timeout=10)
            assert response.status_code == 200
            reporters.add(response.headers["x-request-id"][:16])
            report = response.json()
            assert report["rows"] == {"agree": 150 - len(differing), "disagree": len(differing),
                                      "failed": 0, "dropped": 0}  # fmt: skip
            assert sorted(where[d["request_id"]] for d in report["disagreements"]) == sorted(differing)
            assert "worker" not in report
            listed = httpx.get(f"{url}/experiments", headers=AUTH, timeout=10).json()
            assert listed["experiments"]["iris"]["rows"] == report["rows"]
            if len(reporters) == 2:
                break
        assert len(reporters) == 2, "one worker gave every report"


def test_a_slow_failing_or_down_shadow_changes_neither_the_answers_nor_their_p99(
    explicit_triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    (closed,) = free_ports(1)  # nothing listens there
    url = explicit_triton.grpc_url
    others = {
        "slow_v": {**MODELS, "versicolor": "very_slow"},  # 3 s
        "failing_v": {**MODELS, "versicolor": "failing"},
    }
    text = _file(url, "")
    whole = "    timeout_policy: all_or_nothing\n"  # a shadow without its versicolor gives no answer
    text += "".join(_composition(n, url, m, whole) for n, m in others.items())
    text += _composition("down_v", f"127.0.0.1:{closed}", MODELS)
    text += (
        "experiments:\n  iris:\n    candidates:\n"
        "      slow_v: {shadow: 100}\n      failing_v: {shadow: 100}\n      down_v: {shadow: 100}\n"
    )
    x, _ = iris
    expected = _ort_labels(x, "versicolor")
    latencies: dict[str, list[float]] = {"iris": [], "plain": []}
    wrong: list[str] = []
    sent = [0]
    lock = threading.Lock()
    with _proxy(explicit_triton, tmp_path, text) as proxy:

        def load(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=proxy, timeout=10) as client:
                for n in range(60):
                    i = rng.randrange(len(x))
                    order = ("iris", "plain") if n % 2 else ("plain", "iris")
                    for name in order:  # the two interleaved: the same moments, the same load
                        began = time.perf_counter()
                        response = client.post(
                            f"/compositions/{name}/label", json={"data": x[i : i + 1].tolist()}
                        )
                        took = time.perf_counter() - began
                        with lock:
                            latencies[name].append(took)
                            if (
                                response.status_code != 200
                                or response.json()["prediction"]["label"] != expected[i]
                            ):
                                wrong.append(f"{name} row {i}: {response.status_code} {response.text[:200]}")
                            sent[0] += name == "iris"

        threads = [threading.Thread(target=load, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not wrong, wrong[:5]
        p99 = {name: float(np.percentile(values, 99)) for name, values in latencies.items()}
        # Shadows on the path would put the 3 s model in every request's time.
        assert p99["iris"] <= max(1.5 * p99["plain"], p99["plain"] + 0.25), p99

        # Every copy is accounted for, once the shadows still running are done: the down and the
        # failing ones failed, and the slow one was bounded (dropped when too many waited).
        deadline = time.monotonic() + 60
        while True:
            scraped = _scrape(proxy)
            copies = {
                s: {o: metric(scraped, "proxy_shadow_requests_total", shadow=s, outcome=o)
                    for o in ("answered", "failed", "dropped")}
                for s in ("slow_v", "failing_v", "down_v")
            }  # fmt: skip
            if all(sum(c.values()) == sent[0] for c in copies.values()):
                break
            assert time.monotonic() < deadline, copies
            time.sleep(0.1)
        assert all(c["answered"] == 0 and c["failed"] > 0 for c in copies.values()), copies
        assert copies["slow_v"]["dropped"] > 0, copies  # its queue is full: a copy is dropped
        assert metric(scraped, "proxy_shadow_rows_total", shadow="down_v", outcome="failed") > 0


def test_promote_and_roll_back_by_reload_under_load(
    triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    url = triton.grpc_url
    stages = [
        ("  iris:\n    candidates:\n      iris_v2: {shadow: 100}\n", {"iris"}),
        ("  iris:\n    candidates:\n      iris_v2: {split: 50}\n", {"iris", "iris_v2"}),
        (
            "  iris:\n    primary: iris_v2\n    candidates:\n      iris: {shadow: 100}\n",
            {"iris_v2"},
        ),  # promoted
        ("  iris:\n    candidates:\n      iris_v2: {split: 10}\n", {"iris", "iris_v2"}),  # rolled back
        ("", {None}),  # no experiment
    ]
    x, _ = iris
    failures: list[str] = []
    seen: list[tuple[int, str | None]] = []
    stage = [0]
    stop = threading.Event()
    with _proxy(triton, tmp_path, _file(url, stages[0][0])) as proxy:

        def load() -> None:
            with httpx.Client(base_url=proxy, timeout=10) as client:
                while not stop.is_set():
                    before = stage[0]
                    response = client.post("/compositions/iris/label", json={"data": x[50:52].tolist()})
                    if response.status_code != 200:
                        failures.append(response.text)
                        continue
                    variant = response.json().get("variant")
                    if before >= 0 and stage[0] == before:  # within one stage: by its variants
                        seen.append((before, variant))

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for number, (experiments, _) in enumerate(stages[1:], 1):
                time.sleep(0.5)
                stage[0] = -1  # changing: what is answered now may be either stage's
                (tmp_path / "compositions.yaml").write_text(_file(url, experiments))
                done = httpx.post(f"{proxy}/admin/reload", headers=AUTH, timeout=10)
                assert done.status_code == 200 and done.json()["outcome"] == "applied", done.text
                stage[0] = number
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert not failures, failures[:3]
    for number, (_, allowed) in enumerate(stages):
        answered = {v for s, v in seen if s == number}
        assert answered and answered <= allowed, (number, answered)


def test_a_request_by_key_keeps_its_variant_by_its_first_key(triton: TritonServer, tmp_path: Path) -> None:
    experiments = "  iris:\n    candidates:\n      iris_v2: {split: 30, shadow: 100}\n"
    file = _file(triton.grpc_url, experiments)
    with (
        loaded_store("sqlite", tmp_path) as store,
        _proxy(triton, tmp_path, file, feature_store=store) as url,
    ):
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(60):
                keys = [f"flower-{i}", f"flower-{149 - i}"]
                want = "iris_v2" if key_point("iris", keys[0]) >= 70 else "iris"
                for _ in range(2):
                    body = client.post("/compositions/iris/label", json={"keys": keys}).json()
                    assert body["variant"] == want and body["keys"] == keys, body
            # The header, when sent, is the caller's key rather than the rows'.
            header = client.post(
                "/compositions/iris/label", json={"keys": ["flower-0"]}, headers={"X-User-ID": "user-7"}
            ).json()
            assert header["variant"] == ("iris_v2" if key_point("iris", "user-7") >= 70 else "iris")
        # The shadow got the rows read once, not the keys to read again.
        deadline = time.monotonic() + 30
        while metric(_scrape(url), "proxy_shadow_rows_total", experiment="iris") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        report = httpx.get(f"{url}/experiments/iris", headers=AUTH, timeout=10).json()
        assert all(d["key"].startswith("flower-") for d in report["disagreements"])
        assert metric(_scrape(url), "proxy_feature_lookups_total") == 121  # one per request


CASCADE = """pipelines:
  iris_cascade:
    steps:
      - {name: setosa, services: [setosa], stop_if: "setosa >= 0.9", on_failure: skip}
      - {name: versicolor_or_virginica, services: [versicolor, virginica], on_failure: fail}
"""


def test_a_pipeline_experiment_is_shadowed_by_a_composition_row_by_row(
    triton: TritonServer, tmp_path: Path, iris: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    x, _ = iris
    p = {name: _ort_p(x, name) for name in ("setosa", "versicolor", "virginica")}
    cascade = [
        "setosa"
        if p["setosa"][i] >= 0.9
        else ("versicolor" if p["versicolor"][i] >= p["virginica"][i] else "virginica")
        for i in range(len(x))
    ]
    composition = _ort_labels(x, "versicolor")
    differing = sum(a != b for a, b in zip(cascade, composition, strict=True))
    experiments = "  iris_cascade:\n    candidates:\n      iris: {shadow: 100}\n    allow_pin: true\n"
    compositions = tmp_path / "compositions.yaml"
    compositions.write_text(_file(triton.grpc_url, experiments))
    pipelines = tmp_path / "cascade.yaml"
    pipelines.write_text(CASCADE)
    chosen = settings(admin_token=TOKEN, compositions_file=compositions, pipelines_file=pipelines)
    with proxy_process(chosen, services_on(triton, "grpc")) as (url, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            answer = client.post("/pipelines/iris_cascade", json={"data": x.tolist()})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["variant"] == "iris_cascade" and body["pipeline"] == "iris_cascade"
            assert [p["label"] for p in body["prediction"]] == cascade
            # The composition only shadows: a pin to it is refused, naming why.
            pinned = client.post(
                "/pipelines/iris_cascade", json={"data": x[:1].tolist()}, headers={"X-Variant": "iris"}
            )
            assert pinned.status_code == 422 and "only shadows" in pinned.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while (compared := metric(_scrape(url), "proxy_shadow_rows_total", experiment="iris_cascade")) < 150:
            assert time.monotonic() < deadline, compared
            time.sleep(0.05)
        text = _scrape(url)
        labels = {"experiment": "iris_cascade", "variant": "iris_cascade", "shadow": "iris"}
        assert metric(text, "proxy_shadow_rows_total", outcome="disagree", **labels) == differing
        assert metric(text, "proxy_shadow_rows_total", outcome="agree", **labels) == 150 - differing
