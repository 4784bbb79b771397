"""The configuration reloaded while the proxy serves (``client_proxy/reloading.py``), against the
real proxy process and the real Triton: SIGHUP, ``POST /admin/reload`` and ``PROXY_WATCH_CONFIG``;
under load, no request fails and each is answered by one whole configuration; an invalid file
keeps the configuration in place and is counted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from bench.webhook_receiver import webhook_receiver
from local_triton import TritonServer, free_ports

from .helpers import metric, proxy_process, services_on, settings

TOKEN = "reload-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IRIS = ("setosa", "versicolor", "virginica")


def _compositions(triton: TritonServer, prefix: str, models: tuple[str, ...], replicas: int = 1) -> str:
    """A composition ``probe`` over ``models``, its services named ``<prefix>_<model>`` (and so
    its labels, one-vs-rest): each configuration's answers carry its own names."""

    def replicas_of(model: str) -> list[str]:  # the same Triton by each protocol: two replicas
        return [f"grpc://{triton.grpc_url}/{model}", f"http://{triton.http_url}/{model}"]

    services = "".join(
        f"      {prefix}_{m}: {{target: '{','.join(replicas_of(m)[:replicas])}'}}\n" for m in models
    )
    return f"compositions:\n  probe:\n    services:\n{services}    aggregator: one_vs_rest\n"


def _pipelines(prefix: str, first: str, others: tuple[str, ...], threshold: float) -> str:
    """A pipeline ``cascade`` naming the compositions file's services (``<prefix>_<model>``)."""
    rest = ", ".join(f"{prefix}_{m}" for m in others)
    return (
        "pipelines:\n  cascade:\n    steps:\n"
        f"      - {{name: first, services: [{prefix}_{first}], stop_if: '{prefix}_{first} >= {threshold}'}}\n"
        f"      - {{name: rest, services: [{rest}]}}\n"
    )


def _configurations(triton: TritonServer) -> dict[str, tuple[str, str]]:
    """Two valid configurations and one whose pipelines file names a service its compositions file
    does not declare (each file valid alone: refused whole, never half applied)."""
    return {
        "a": (_compositions(triton, "a", IRIS), _pipelines("a", "setosa", ("versicolor", "virginica"), 0.9)),
        "b": (
            _compositions(triton, "b", ("virginica", "setosa"), replicas=2),
            _pipelines("b", "virginica", ("setosa",), 0.5),
        ),
        "c": (_compositions(triton, "c", IRIS), _pipelines("c", "setosa", ("nowhere",), 0.9)),
    }


def _write(path: Path, text: str) -> None:
    """As an operator's tool (or Kubernetes) should: the whole file at once."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# What each request kind asks: (method path, body of rows); what of the answer is compared.
def _strip(body: Any) -> Any:
    """The answer without what differs between two answers to the same rows (ids, latencies)."""
    if isinstance(body, dict):
        return {k: _strip(v) for k, v in body.items() if k not in ("request_id", "latency_ms", "id")}
    if isinstance(body, list):
        return [_strip(v) for v in body]
    return body


KINDS = (
    "/compositions/probe/label",
    "/compositions/probe/predict",
    "/pipelines/cascade",
    "/v2/models/probe/infer",
    "grpc ModelInfer probe",
)


class Sender:
    """The load's requests through every door: the ``i``-th is a composition's label, its services'
    predictions, the pipeline, the composition over the Open Inference Protocol by HTTP, and by
    gRPC, in turn, on three rows; each answer as (status, what is compared)."""

    def __init__(self, rows: NDArray[np.float32], url: str, grpc_url: str) -> None:
        self._rows = rows
        self._http = httpx.Client(base_url=url, timeout=10)
        self._grpc = grpcclient.InferenceServerClient(grpc_url)

    def send(self, i: int) -> tuple[int, Any]:
        kind = KINDS[i % len(KINDS)]
        picked = self._rows[[i % 50, 50 + i % 50, 100 + i % 50]]
        if kind.startswith("grpc"):
            tensor = grpcclient.InferInput("input", list(picked.shape), "FP32")
            tensor.set_data_from_numpy(picked.astype(np.float32))
            try:
                result = self._grpc.infer("probe", [tensor])
            except InferenceServerException as exc:
                return 500, str(exc)
            names = [[c.decode() for c in row] for row in result.as_numpy("class_name").tolist()]
            return 200, {"class_name": names, **{n: result.as_numpy(n).tolist() for n in ("proba", "scores")}}
        if kind.startswith("/v2"):
            data = picked.ravel().tolist()
            body: dict[str, Any] = {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 4], "data": data}]
            }
        else:
            body = {"data": picked.tolist()}
        response = self._http.post(kind, json=body)
        return response.status_code, _strip(response.json())

    def close(self) -> None:
        self._http.close()
        self._grpc.close()


@pytest.fixture
def clients() -> Iterator[Callable[[str], httpx.Client]]:
    """HTTP clients to the proxy, closed after the test."""
    made: list[httpx.Client] = []

    def client(url: str) -> httpx.Client:
        made.append(httpx.Client(base_url=url, timeout=10))
        return made[-1]

    yield client
    for client in made:
        client.close()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "compositions.yaml", tmp_path / "pipelines.yaml"


@pytest.fixture
def proxy(triton: TritonServer, files: tuple[Path, Path]) -> Iterator[tuple[str, Any, str]]:
    """The proxy serving configuration a: its URL, its process and its gRPC door's address."""
    compositions, pipelines = files
    a = _configurations(triton)["a"]
    _write(compositions, a[0])
    _write(pipelines, a[1])
    (door,) = free_ports(1)
    proxy_settings = settings(
        admin_token=TOKEN,
        compositions_file=compositions,
        pipelines_file=pipelines,
        coalesce=True,
        grpc_port=door,
    )
    with proxy_process(proxy_settings, services_on(triton, "grpc")) as (url, process):
        yield url, process, f"127.0.0.1:{door}"


def _reloads(client: httpx.Client, outcome: str) -> float:
    return metric(client.get("/metrics").text, "proxy_config_reloads_total", outcome=outcome)


def test_twenty_reloads_under_load_fail_no_request_and_mix_no_configuration(
    clients: Callable[[str], httpx.Client],
    triton: TritonServer,
    proxy: tuple[str, Any, str],
    files: tuple[Path, Path],
    iris: tuple[NDArray[np.float32], NDArray[np.int64]],
) -> None:
    url, process, door = proxy
    configurations = _configurations(triton)
    count = 250  # distinct requests: 5 kinds x 50 row triples
    client = clients(url)
    quiet = Sender(iris[0], url, door)

    def apply(name: str, by_signal: bool) -> None:
        before = _reloads(client, "applied") + _reloads(client, "refused")
        _write(files[0], configurations[name][0])
        _write(files[1], configurations[name][1])
        if by_signal:
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while _reloads(client, "applied") + _reloads(client, "refused") == before:
                assert time.monotonic() < deadline, "SIGHUP: no reload"
                time.sleep(0.02)
        else:
            response = client.post("/admin/reload", headers=AUTH)
            assert response.status_code == (422 if name == "c" else 200), response.text

    # Each valid configuration's answer to every request, asked with nothing else going on.
    expected: dict[str, list[Any]] = {}
    for name in ("a", "b"):
        apply(name, by_signal=False)
        expected[name] = []
        for i in range(count):
            status, answer = quiet.send(i)
            assert status == 200, answer
            expected[name].append(answer)
        assert expected[name][0]["prediction"][0]["label"].startswith(f"{name}_")
        assert expected[name][4]["class_name"][0][0].startswith(f"{name}_")  # the gRPC door's
    assert all(expected["a"][i] != expected["b"][i] for i in range(count))
    apply("a", by_signal=False)
    applied, refused = _reloads(client, "applied"), _reloads(client, "refused")

    answers: list[tuple[int, int, Any]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        own = Sender(iris[0], url, door)
        try:
            i = worker
            while not stop.is_set():
                status, answer = own.send(i % count)
                answers.append((i % count, status, answer))
                i += 16
        finally:
            own.close()

    threads = [threading.Thread(target=load, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    try:
        sequence = ["b", "c", "a"] * 7  # from "a": b, c (refused), a, ...
        for n, name in enumerate(sequence[:20]):
            time.sleep(0.15)
            apply(name, by_signal=n % 2 == 0)
        time.sleep(0.15)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    quiet.close()
    failed = [(i, status, body) for i, status, body in answers if status != 200]
    assert not failed, failed[:3]
    by: dict[str, int] = {"a": 0, "b": 0}
    for i, _, found in answers:
        whole = [name for name in ("a", "b") if found == expected[name][i]]
        assert whole, f"request {i} answered by no one configuration: {found}"
        by[whole[0]] += 1
    # Both configurations answered during the load: the check above saw reloads happen.
    assert by["a"] > 20 and by["b"] > 20, by
    print(f"{len(answers)} requests during 20 reloads: {by['a']} answered by a, {by['b']} by b")
    assert _reloads(client, "applied") - applied == 20 - sequence[:20].count("c")
    assert _reloads(client, "refused") - refused == sequence[:20].count("c") == 7
    assert process.poll() is None


def test_an_invalid_file_keeps_what_is_served_says_where_and_counts_it(
    clients: Callable[[str], httpx.Client],
    triton: TritonServer,
    proxy: tuple[str, Any, str],
    files: tuple[Path, Path],
) -> None:
    url, _, _ = proxy
    client = clients(url)
    row = {"data": [[5.1, 3.5, 1.4, 0.2]]}
    assert client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] == "a_setosa"
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401

    _write(files[0], "compositions:\n  probe:\n    services: {}\n    aggregator: sideways\n")
    refused = client.post("/admin/reload", headers=AUTH)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "config_refused"
    assert str(files[0]) in error["message"] and "line" in error["message"]
    assert error["kept"]["generation"] == 1
    assert client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] == "a_setosa"
    scrape = client.get("/metrics").text
    assert metric(scrape, "proxy_config_reloads_total", outcome="refused") == 1
    assert metric(scrape, "proxy_config_last_reload_successful") == 0
    assert "proxy_config_generation 1.0" in scrape

    _write(files[0], _compositions(triton, "d", IRIS))
    _write(files[1], "pipelines: {}\n")
    applied = client.post("/admin/reload", headers=AUTH)
    assert applied.status_code == 200
    assert applied.json()["outcome"] == "applied" and applied.json()["config"]["generation"] == 2
    assert client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] == "d_setosa"
    assert client.post("/pipelines/cascade", json=row).status_code == 404
    metadata = client.get("/metadata").json()["configuration"]
    assert metadata["generation"] == 2 and metadata["pipelines"] == []
    scrape = client.get("/metrics").text
    assert metric(scrape, "proxy_config_last_reload_successful") == 1
    assert "proxy_config_generation 2.0" in scrape


def test_watching_follows_a_configmap_style_swap_and_ignores_a_rewrite_of_the_same_content(
    clients: Callable[[str], httpx.Client], triton: TritonServer, tmp_path: Path
) -> None:
    # A ConfigMap volume: the file is a link into ..data, a link to a dated directory that the
    # kubelet replaces by swapping ..data.
    mount = tmp_path / "config"
    mount.mkdir()
    (mount / "v1").mkdir()
    (mount / "v1" / "compositions.yaml").write_text(_compositions(triton, "a", IRIS))
    (mount / "..data").symlink_to("v1")
    (mount / "compositions.yaml").symlink_to("..data/compositions.yaml")
    empty = tmp_path / "pipelines.yaml"
    empty.write_text("pipelines: {}\n")
    proxy_settings = settings(
        compositions_file=mount / "compositions.yaml",
        pipelines_file=empty,
        watch_config=True,
        watch_interval_ms=100,
    )
    row = {"data": [[5.1, 3.5, 1.4, 0.2]]}
    with (
        open(tmp_path / "proxy.log", "w") as log,
        proxy_process(proxy_settings, services_on(triton, "grpc"), log) as (url, _),
    ):
        client = clients(url)

        def label_becomes(expected: str) -> None:
            deadline = time.monotonic() + 20
            while (
                client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] != expected
            ):
                assert time.monotonic() < deadline, f"not reloaded to {expected}"
                time.sleep(0.05)

        assert client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] == "a_setosa"
        (mount / "v2").mkdir()
        (mount / "v2" / "compositions.yaml").write_text(_compositions(triton, "b", IRIS))
        (mount / "..data_tmp").symlink_to("v2")
        os.replace(mount / "..data_tmp", mount / "..data")
        label_becomes("b_setosa")

        # The same content written again (a new time stamp): nothing to reload.
        (mount / "v2" / "compositions.yaml").write_text(_compositions(triton, "b", IRIS))
        time.sleep(0.5)  # five looks
        scrape = client.get("/metrics").text
        assert metric(scrape, "proxy_config_reloads_total", outcome="applied") == 1

        # Broken: refused once (not at every look), and what was served stays.
        (mount / "v2" / "compositions.yaml").write_text("compositions: [\n")
        deadline = time.monotonic() + 20
        while metric(client.get("/metrics").text, "proxy_config_reloads_total", outcome="refused") == 0:
            assert time.monotonic() < deadline, "the broken file was not looked at"
            time.sleep(0.05)
        time.sleep(0.5)
        scrape = client.get("/metrics").text
        assert metric(scrape, "proxy_config_reloads_total", outcome="refused") == 1
        assert client.post("/compositions/probe/label", json=row).json()["prediction"]["label"] == "b_setosa"
        (mount / "v2" / "compositions.yaml").write_text(_compositions(triton, "c", IRIS))
        label_becomes("c_setosa")
    log_text = (tmp_path / "proxy.log").read_text()
    assert "reload (files changed) refused, configuration 2 kept" in log_text


def test_a_services_file_changed_by_hand_and_a_new_webhook_apply_on_sighup(
    clients: Callable[[str], httpx.Client], triton: TritonServer, tmp_path: Path
) -> None:
    store = tmp_path / "services.json"
    targets = {m: f"grpc://{triton.grpc_url}/{m}" for m in IRIS}
    store.write_text(json.dumps([{"name": m, "target": t} for m, t in targets.items()]))
    compositions = tmp_path / "compositions.yaml"
    compositions.write_text(_compositions(triton, "a", IRIS))
    empty = tmp_path / "pipelines.yaml"
    empty.write_text("pipelines: {}\n")
    proxy_settings = settings(services_file=store, compositions_file=compositions, pipelines_file=empty)
    row = {"data": [[5.1, 3.5, 1.4, 0.2]]}
    with (
        webhook_receiver() as receiver,
        proxy_process(proxy_settings, []) as (url, process),
    ):
        client = clients(url)
        assert set(client.post("/predict", json=row).json()) == set(IRIS)
        assert client.post("/compositions/probe/label", json=row).json().get("alerts") is None

        store.write_text(
            json.dumps([{"name": n, "target": targets["setosa"]} for n in ("setosa", "setosa_again")])
        )
        compositions.write_text(
            _compositions(triton, "a", IRIS)
            + f"    rules:\n      - {{name: every_row, when: 'max >= 0', webhook: '{receiver.url}'}}\n"
        )
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while set(client.post("/predict", json=row).json()) != {"setosa", "setosa_again"}:
            assert time.monotonic() < deadline, "SIGHUP: the services file was not read again"
            time.sleep(0.05)
        answer = client.post("/compositions/probe/label", json=row).json()
        assert [a["rule"] for a in answer["alerts"]] == ["every_row"]
        deadline = time.monotonic() + 20
        while not receiver.received:
            assert time.monotonic() < deadline, "the reloaded rule's webhook got nothing"
            time.sleep(0.05)
        assert receiver.received[0].payload["rule"] == "every_row"
        assert process.poll() is None
