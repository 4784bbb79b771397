"""deploy/prometheus/prometheus.yml, the configuration docker-compose.yml gives Prometheus, checked
by promtool and run by a real Prometheus (Debian's package, the release docker-compose.yml pins)
that scrapes the real proxy and the real embedded Triton."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from client_proxy import Service
from local_triton import TritonServer, free_ports
from local_triton.server import terminate

from .helpers import running_proxy, services_on, settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"


def test_promtool_accepts_the_committed_configuration() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs Debian's prometheus package"
    checked = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_runs_the_prometheus_release_the_tests_run() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in service["volumes"]
    image_version = service["image"].rsplit(":v", 1)[1]
    version = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout
    assert f"version {image_version}" in version, (image_version, version)
    targets = {
        c["job_name"]: c["static_configs"][0]["targets"]
        for c in yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    }
    assert targets == {"proxy": ["proxy:9000"], "triton": ["triton:8002"]}  # compose's service names


def _query(url: str, expression: str) -> list[dict]:  # type: ignore[type-arg]
    response = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]  # type: ignore[no-any-return]


@contextmanager
def _prometheus(
    proxy_url: str, triton: TritonServer, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Debian's Prometheus on the committed configuration, its two targets pointed at this test's
    proxy and Triton: its URL and process, stopped afterwards."""
    text = CONFIG.read_text()
    text = text.replace("proxy:9000", urllib.parse.urlsplit(proxy_url).netloc)
    text = text.replace("triton:8002", urllib.parse.urlsplit(triton.metrics_url).netloc)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    (port,) = free_ports(1)
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            terminate(process)


def test_a_real_prometheus_scrapes_the_proxy_and_triton(triton: TritonServer, tmp_path: Path) -> None:
    """The committed file, with its two targets pointed at this test's proxy and Triton: both
    are up, and the proxy's request counter and Triton's inference counter arrive."""
    with running_proxy(settings(), services_on(triton, "grpc")) as proxy_url:
        for _ in range(5):
            assert (
                httpx.post(f"{proxy_url}/predict/label", json={"data": [[1.0, 2.0, 3.0, 4.0]]}).status_code
                == 200
            )
        with _prometheus(proxy_url, triton, tmp_path) as (url, process):
            deadline = time.monotonic() + 60
            up: dict[str, str] = {}
            while time.monotonic() < deadline:
                try:
                    up = {r["metric"]["job"]: r["value"][1] for r in _query(url, "up")}
                except httpx.HTTPError:
                    up = {}
                if up == {"proxy": "1", "triton": "1"}:
                    break
                assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                time.sleep(1)
            assert up == {"proxy": "1", "triton": "1"}, json.dumps(up)
            requests = _query(url, 'proxy_http_requests_total{endpoint="/predict/label",status="200"}')
            assert requests and float(requests[0]["value"][1]) >= 5
            inferences = _query(url, 'nv_inference_request_success{model="setosa"}')
            assert inferences and float(inferences[0]["value"][1]) >= 5


GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "proxy.json"


def _dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_compose_provisions_grafana_with_the_committed_dashboard_and_prometheus() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana = compose["services"]["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert compose["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    triton: TritonServer, tmp_path: Path
) -> None:
    """The committed dashboard's PromQL, each expression asked of Debian's Prometheus running the
    committed configuration against a real proxy and Triton under traffic: every one returns at
    least one series with a number (a misspelt metric or label returns nothing and fails here).
    A fourth service whose model Triton does not have makes the partial answers, the failed
    calls and a replica's ejection that some panels show."""
    services = [*services_on(triton, "grpc"), Service("ghost", "grpc", triton.grpc_url, "no_such_model")]
    # An experiment, for the experiments' panels: iris_v2 answers a tenth and shadows the rest,
    # on rows where it disagrees with iris now and then (python -m training: 4 of the 150).
    compositions = tmp_path / "compositions.yaml"
    members = {"setosa": "setosa", "versicolor": "versicolor", "virginica": "virginica"}
    compositions.write_text(
        "compositions:\n"
        + "".join(
            f"  {name}:\n    services:\n"
            + "".join(f"      {s}: {{target: '{triton.grpc_url}/{m}'}}\n" for s, m in models.items())
            + "    aggregator: one_vs_rest\n"
            for name, models in (("iris", members), ("iris_v2", {**members, "versicolor": "versicolor_v2"}))
        )
        + "experiments:\n  iris:\n    candidates:\n      iris_v2: {split: 10, shadow: 100}\n"
    )
    no_pipelines = tmp_path / "pipelines.yaml"
    no_pipelines.write_text("pipelines: {}\n")
    chosen = settings(compositions_file=compositions, pipelines_file=no_pipelines)
    rows = {"data": [[5.1, 3.5, 1.4, 0.2], [5.9, 3.2, 4.8, 1.8], [6.0, 2.2, 5.0, 1.5]]}  # 0, 70, 119
    with running_proxy(chosen, services) as proxy_url:
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=proxy_url, timeout=10) as client:
                while not stop.is_set():
                    client.post("/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]] * 3})
                    client.post("/compositions/iris/label", json=rows)
                    time.sleep(0.02)

        load = threading.Thread(target=traffic, daemon=True)
        load.start()
        try:
            with _prometheus(proxy_url, triton, tmp_path) as (url, process):
                expressions = _dashboard_expressions()
                assert len(expressions) >= 12
                empty: list[str] = []
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                    empty = []
                    for title, expression in expressions:
                        try:
                            result = _query(url, expression)
                        except httpx.HTTPError:
                            result = []
                        numbers = [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]
                        if not numbers:
                            empty.append(f"{title}: {expression}")
                    if not empty:
                        break
                    time.sleep(2)
                assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        finally:
            stop.set()
            load.join(15)
