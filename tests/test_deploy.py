"""docker-compose.yml, the Dockerfile and deploy/k8s, checked as far as a machine without Docker can.

Schemas and linters come from PyPI (check-jsonschema's vendored Compose Specification schema,
kubectl's kustomize, kubernetes-validate, hadolint); the entry point and the probes are
exercised against the real embedded Triton and the real proxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from client_proxy.config import Settings, parse_service
from local_triton import TRITON_RELEASE, TritonServer, free_ports

from .conftest import MODEL_REPOSITORY, ROOT
from .helpers import wait_healthy

BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PROXY_PORT = 9000
KUBERNETES_VERSION = "1.37.0"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/k8s``: what ``kubectl apply -k`` would send."""
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- docker-compose.yml -----------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = _compose_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a typo in a key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("depends_on:", "depends-on:"))
    assert _compose_check(broken).returncode != 0


def test_triton_runs_the_embedded_release_on_the_committed_repository(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    assert triton["image"] == TRITON_IMAGE
    assert "./model_repository:/models:ro" in triton["volumes"]
    assert "--model-repository=/models" in triton["command"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert triton["shm_size"] and triton["ulimits"]["memlock"] == -1
    ports = {int(p.split(":")[1].split("/")[0]) for p in triton["ports"]}
    assert ports == set(TRITON_PORTS.values())


def test_proxy_service_is_built_here_and_waits_for_triton(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["build"] == "."
    assert proxy["depends_on"]["triton"]["condition"] == "service_healthy"
    assert proxy["ports"] == [f"{PROXY_PORT}:{PROXY_PORT}"]
    assert "/health" in " ".join(proxy["healthcheck"]["test"])


def _environment(entries: list[str] | dict[str, str]) -> dict[str, str]:
    if isinstance(entries, dict):
        return {k: str(v) for k, v in entries.items()}
    return dict(entry.split("=", 1) for entry in entries)


def _assert_services_exist(env: dict[str, str], where: str) -> None:
    protocol = env.get("PROXY_PROTOCOL", Settings.model_fields["protocol"].default)
    services = [
        parse_service(k[8:].lower(), v, protocol, k) for k, v in env.items() if k.startswith("SERVICE_")
    ]
    assert services, where
    for service in services:
        assert (MODEL_REPOSITORY / service.model / "config.pbtxt").is_file(), f"{where}: {service.model}"
        host, port = service.url.rsplit(":", 1)
        assert host == "triton", where
        assert int(port) == TRITON_PORTS[service.protocol], f"{where}: {service.name} port"


def test_every_model_the_proxy_calls_exists(compose: dict[str, Any], rendered: list[dict[str, Any]]) -> None:
    _assert_services_exist(_environment(compose["services"]["proxy"]["environment"]), "docker-compose.yml")
    _assert_services_exist(_kind(rendered, "ConfigMap", "proxy-config")["data"], "deploy/k8s ConfigMap")


def test_ports_agree_everywhere(compose: dict[str, Any], rendered: list[dict[str, Any]]) -> None:
    assert Settings.model_fields["port"].default == PROXY_PORT
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^EXPOSE {PROXY_PORT}$", dockerfile, re.M)
    assert f"PROXY_PORT={PROXY_PORT}" in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert f"localhost:{PROXY_PORT}/predict" in readme
    for port in TRITON_PORTS.values():
        assert f"localhost:{port}" in readme or f"127.0.0.1:{port}" in readme
    server = TritonServer()
    assert (server.http_port, server.grpc_port, server.metrics_port) == tuple(TRITON_PORTS.values())
    triton = _kind(rendered, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == TRITON_PORTS
    service = _kind(rendered, "Service", "triton")["spec"]["ports"]
    assert {p["name"]: p["port"] for p in service} == TRITON_PORTS
    proxy = _kind(rendered, "Deployment", "proxy")["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in proxy["ports"]] == [PROXY_PORT]
    assert compose["services"]["triton"]["image"] == triton["image"]


# -- Dockerfile -------------------------------------------------------------------------------
def _final_stage(dockerfile: str) -> list[str]:
    lines = re.sub(r"\\\n\s*", " ", dockerfile).splitlines()
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return [line for line in lines[stages[-1] :] if line and not line.startswith("#")]


def test_dockerfile_final_stage_is_slim_non_root_and_serves_the_proxy() -> None:
    stage = _final_stage(DOCKERFILE.read_text())
    assert re.fullmatch(r"FROM python:3\.1[1-3]-slim", stage[0])
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    cmd = [line for line in stage if line.startswith("CMD ")][-1]
    assert json.loads(cmd[4:]) == ["python", "-m", "client_proxy"]
    # Installed from the project's own pyproject.toml, as wheels built in the first stage.
    assert any("pip install" in line and "--no-index" in line for line in stage)
    assert not any(re.search(r"\b(gcc|build-essential|apt-get install)\b", line) for line in stage)


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv/", ".git/", "**/__pycache__/", ".pytest_cache/", "tests/"):
        assert entry in ignored


@pytest.fixture(scope="module")
def dockerfile_proxy(triton: TritonServer, compose: dict[str, Any]) -> Iterator[str]:
    """The proxy started with the Dockerfile's CMD and ENV and compose's environment, the
    Triton host rewritten to the embedded server (and the port to a free one)."""
    stage = _final_stage(DOCKERFILE.read_text())
    command = json.loads([line for line in stage if line.startswith("CMD ")][-1][4:])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))}
    for line in stage:
        if line.startswith("ENV "):
            env.update(dict(item.split("=", 1) for item in shlex.split(line[4:])))
    for key, value in _environment(compose["services"]["proxy"]["environment"]).items():
        env[key] = value.replace("triton:8001", triton.grpc_url).replace("triton:8000", triton.http_url)
    (port,) = free_ports(1)
    env["PROXY_PORT"] = str(port)
    assert command[0] == "python"
    process = subprocess.Popen(
        [sys.executable, *command[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)  # type: ignore[arg-type]
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_container_entry_point_answers_the_seed_requests(dockerfile_proxy: str) -> None:
    seed = {"data": [[1.0, 2.0, 3.0, 4.0]]}
    body = httpx.post(f"{dockerfile_proxy}/predict", json=seed).json()
    assert sorted(body) == ["setosa", "versicolor", "virginica"]
    assert all(len(body[n]["prediction"]) == 2 for n in body)
    label = httpx.post(f"{dockerfile_proxy}/predict/label", json=seed).json()
    assert set(label["prediction"]) == {"proba", "label"}
    # The compose healthcheck's own command, pointed at this port.
    check = _compose_healthcheck_command(port=int(dockerfile_proxy.rsplit(":", 1)[1]))
    assert subprocess.run(check, timeout=30, check=False).returncode == 0


def _compose_healthcheck_command(port: int) -> list[str]:
    test = yaml.safe_load(COMPOSE.read_text())["services"]["proxy"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    return [sys.executable, *(arg.replace(f":{PROXY_PORT}/", f":{port}/") for arg in test[2:])]


# -- Kubernetes -------------------------------------------------------------------------------
def test_every_rendered_manifest_validates(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        ["Namespace", "PersistentVolumeClaim", "ConfigMap"]
        + ["Deployment", "Service", "HorizontalPodAutoscaler"] * 2
    )
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "iris-triton-msa"


def test_validation_can_fail(rendered: list[dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(_kind(rendered, "Deployment", "proxy")))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "nine thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_autoscalers_target_the_deployments(rendered: list[dict[str, Any]]) -> None:
    for name in ("triton", "proxy"):
        target = _kind(rendered, "HorizontalPodAutoscaler", name)["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        resources = _kind(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]
        assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_both_tiers_are_annotated_for_prometheus(rendered: list[dict[str, Any]]) -> None:
    for name, port in (("triton", TRITON_PORTS["metrics"]), ("proxy", PROXY_PORT)):
        annotations = _kind(rendered, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)


def _probe_paths(deployment: dict[str, Any]) -> set[tuple[str, str]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = set()
    for key in ("readinessProbe", "livenessProbe", "startupProbe"):
        if key in container:
            get = container[key]["httpGet"]
            paths.add((get["path"], str(names.get(get["port"], get["port"]))))
    return paths


def test_probes_point_at_endpoints_that_really_answer(
    rendered: list[dict[str, Any]], triton: TritonServer, dockerfile_proxy: str
) -> None:
    triton_paths = _probe_paths(_kind(rendered, "Deployment", "triton"))
    assert {p for p, _ in triton_paths} == {"/v2/health/ready", "/v2/health/live"}
    for path, port in triton_paths:
        assert port == str(TRITON_PORTS["http"])
        with urllib.request.urlopen(f"http://{triton.http_url}{path}", timeout=5) as response:
            assert response.status == 200, path
    proxy_paths = _probe_paths(_kind(rendered, "Deployment", "proxy"))
    assert proxy_paths == {("/health", str(PROXY_PORT))}
    assert httpx.get(f"{dockerfile_proxy}/health").status_code == 200


def test_k8s_proxy_image_is_the_compose_image(
    compose: dict[str, Any], rendered: list[dict[str, Any]]
) -> None:
    image = _kind(rendered, "Deployment", "proxy")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == compose["services"]["proxy"]["image"]


def test_deployment_files_use_only_known_settings() -> None:
    # An unknown PROXY_ variable would be silently ignored by the proxy: refuse typos here.
    known = {f"PROXY_{name.upper()}" for name in Settings.model_fields}
    compose_env = _environment(yaml.safe_load(COMPOSE.read_text())["services"]["proxy"]["environment"])
    k8s_env = yaml.safe_load((K8S / "proxy.yaml").read_text().split("---")[0])["data"]
    for env in (compose_env, k8s_env):
        for key in env:
            assert key.startswith("SERVICE_") or key in known, key
