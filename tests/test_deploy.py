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
import shutil
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

from client_proxy.config import Settings
from client_proxy.core.services import parse_service
from local_triton import TRITON_RELEASE, TritonServer, free_ports

from .conftest import MODEL_REPOSITORY, ROOT
from .helpers import wait_healthy

BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
MODELS_DOCKERFILE = ROOT / "deploy" / "models" / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "deploy" / "triton" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PROXY_PORT = 9000
PROXY_GRPC_PORT = 9001
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


def _proxy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The generated ConfigMap: ``proxy-config-<hash of deploy/k8s/proxy.env>``."""
    (found,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("proxy-config-")
    ]
    return found


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}


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
    # NVIDIA's image at the embedded server's release, built on with the by_key models.
    assert triton["build"] == {"context": ".", "dockerfile": "deploy/triton/Dockerfile"}
    assert re.findall(r"^FROM (\S+)", TRITON_DOCKERFILE.read_text(), re.M) == [TRITON_IMAGE]
    assert triton["image"].startswith("iris-triton-msa/triton:")
    assert "./model_repository:/models:ro" in triton["volumes"]
    assert "--model-repository=/models" in triton["command"]
    assert "--model-repository=/opt/by_key/models" in triton["command"]
    assert "COPY model_repository_by_key /opt/by_key/models" in TRITON_DOCKERFILE.read_text()
    # The by_key models read the store the proxy reads.
    proxy = _environment(compose["services"]["proxy"]["environment"])
    assert _environment(triton["environment"])["FEATURE_STORE"] == proxy["PROXY_FEATURE_STORE"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert triton["shm_size"] and triton["ulimits"]["memlock"] == -1
    published = [p.split(":") for p in triton["ports"]]
    # Published on the host's loopback only: Triton has no authentication.
    assert all(len(p) == 3 and p[0] == "127.0.0.1" for p in published), triton["ports"]
    assert {int(p[2]) for p in published} == {int(p[1]) for p in published} == set(TRITON_PORTS.values())


def test_proxy_service_is_built_here_and_waits_for_triton(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["build"] == "."
    assert proxy["depends_on"]["triton"]["condition"] == "service_healthy"
    assert proxy["ports"] == [f"{PROXY_PORT}:{PROXY_PORT}", f"{PROXY_GRPC_PORT}:{PROXY_GRPC_PORT}"]
    assert "/health/ready" in " ".join(proxy["healthcheck"]["test"])


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
    _assert_services_exist(_proxy_config(rendered)["data"], "deploy/k8s ConfigMap")


def test_ports_agree_everywhere(compose: dict[str, Any], rendered: list[dict[str, Any]]) -> None:
    assert Settings.model_fields["port"].default == PROXY_PORT
    dockerfile = DOCKERFILE.read_text()
    assert Settings.model_fields["grpc_port"].default == PROXY_GRPC_PORT
    assert re.search(rf"^EXPOSE {PROXY_PORT} {PROXY_GRPC_PORT}$", dockerfile, re.M)
    assert f"PROXY_PORT={PROXY_PORT}" in dockerfile and f"PROXY_GRPC_PORT={PROXY_GRPC_PORT}" in dockerfile
    assert {f"{PROXY_PORT}:{PROXY_PORT}", f"{PROXY_GRPC_PORT}:{PROXY_GRPC_PORT}"} <= set(
        compose["services"]["proxy"]["ports"]
    )
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
    assert [p["containerPort"] for p in proxy["ports"]] == [PROXY_PORT, PROXY_GRPC_PORT]
    proxy_service = _kind(rendered, "Service", "proxy")["spec"]["ports"]
    assert [p["port"] for p in proxy_service] == [PROXY_PORT, PROXY_GRPC_PORT]
    assert compose["services"]["triton"]["image"] == triton["image"]


# -- Dockerfile -------------------------------------------------------------------------------
def _final_stage(dockerfile: str) -> list[str]:
    lines = re.sub(r"\\\n\s*", " ", dockerfile).splitlines()
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return [line for line in lines[stages[-1] :] if line and not line.startswith("#")]


def test_dockerfile_final_stage_is_slim_non_root_and_serves_the_proxy() -> None:
    stage = _final_stage(DOCKERFILE.read_text())
    assert re.fullmatch(r"FROM python:3\.1[12]-slim-bookworm", stage[0])
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    cmd = [line for line in stage if line.startswith("CMD ")][-1]
    assert json.loads(cmd[4:]) == ["python", "-m", "client_proxy"]
    # Installed in the first stage from the lock file, every package checked against its hashes.
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"COPY requirements/proxy\.txt ", dockerfile)
    assert re.search(r"pip install [^\n]*--require-hashes[^\n]*-r /tmp/requirements\.txt", dockerfile)
    assert any(line.startswith("COPY --from=build /opt/venv") for line in stage)
    assert not any(re.search(r"\b(gcc|build-essential|apt-get install)\b", line) for line in stage)


@pytest.mark.parametrize(
    "dockerfile", [DOCKERFILE, MODELS_DOCKERFILE, TRITON_DOCKERFILE], ids=["proxy", "models", "triton"]
)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_proxy_lock_alone_serves(tmp_path: Path, triton: TritonServer) -> None:
    """What the image holds, without Docker: a fresh venv with requirements/proxy.txt only (hash
    checked) and a copy of client_proxy/, started as the Dockerfile's CMD starts it."""
    wheels = Path(sys.prefix) / "proxy-wheels"  # fetched by `make test` (its proxy-wheels step)
    assert (wheels / ".done").exists(), f"{wheels} is missing: run the tests with make test"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--require-hashes",
         "--only-binary=:all:", "--no-index", "--find-links", str(wheels),
         "-r", str(ROOT / "requirements" / "proxy.txt")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    app = tmp_path / "app"
    shutil.copytree(ROOT / "client_proxy", app / "client_proxy", ignore=shutil.ignore_patterns("__pycache__"))
    port, grpc_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_", "PYTHON"))}
    env.update(PROXY_PORT=str(port), PROXY_GRPC_PORT=str(grpc_port), SERVICE_SETOSA=triton.grpc_url)
    env.update(PROXY_LOG_LEVEL="WARNING")
    process = subprocess.Popen(
        [str(venv / "bin" / "python"), "-m", "client_proxy"], cwd=app, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)  # type: ignore[arg-type]
        answer = httpx.post(f"{url}/predict", json={"data": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200 and answer.json()["setosa"]["prediction"][0] > 0.5
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv*/", ".git/", "**/__pycache__/", ".pytest_cache/", "tests/", "model_repository/"):
        assert entry in ignored
    # The models image has its own ignore file (BuildKit reads <Dockerfile>.dockerignore first).
    models_ignored = (MODELS_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert models_ignored[models_ignored.index("*") + 1] == "!model_repository/"
    # And the Triton image: what its Dockerfile copies, nothing else.
    triton_ignored = (TRITON_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    copied = {
        source.rstrip("/")
        for line in re.findall(r"^COPY (.+)$", TRITON_DOCKERFILE.read_text(), re.M)
        for source in line.split()[:-1]
    }
    assert {entry[1:].rstrip("/") for entry in triton_ignored if entry.startswith("!")} == copied


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
        value = value.replace("triton:8001", triton.grpc_url).replace("triton:8000", triton.http_url)
        env[key] = value.replace("/app/", f"{ROOT}/")  # the image's WORKDIR is this checkout
    port, grpc_port = free_ports(2)
    env["PROXY_PORT"], env["PROXY_GRPC_PORT"] = str(port), str(grpc_port)
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


def test_container_serves_the_example_compositions_and_pipelines(
    dockerfile_proxy: str, compose: dict[str, Any]
) -> None:
    """compose mounts examples/ where the image has it, and points the proxy at both files."""
    assert "./examples:/app/examples:ro" in compose["services"]["proxy"]["volumes"]
    assert "COPY examples ./examples" in _final_stage(DOCKERFILE.read_text())
    row = {"data": [[13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]]}
    wine = httpx.post(f"{dockerfile_proxy}/compositions/wine/label", json=row)
    assert wine.status_code == 200 and wine.json()["prediction"]["label"] == "class_0"
    cascade = httpx.post(f"{dockerfile_proxy}/pipelines/wine_cascade", json=row)
    assert cascade.status_code == 200 and cascade.json()["prediction"]["label"] == "class_0"


def _compose_healthcheck_command(port: int) -> list[str]:
    test = yaml.safe_load(COMPOSE.read_text())["services"]["proxy"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    return [sys.executable, *(arg.replace(f":{PROXY_PORT}/", f":{port}/") for arg in test[2:])]


# -- Kubernetes -------------------------------------------------------------------------------
def test_every_rendered_manifest_validates(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "ConfigMap"]  # the proxy's settings, and its files
        + ["Deployment", "Service", "Job"]  # Redis and its loader
        + ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"] * 2
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
    assert proxy_paths == {("/health/ready", str(PROXY_PORT)), ("/health/live", str(PROXY_PORT))}
    for path, _ in proxy_paths:
        assert httpx.get(f"{dockerfile_proxy}{path}").status_code == 200, path
    # The Dockerfile's own HEALTHCHECK asks for liveness.
    assert f"127.0.0.1:{PROXY_PORT}/health/live" in DOCKERFILE.read_text()


def test_k8s_proxy_image_is_the_compose_image(
    compose: dict[str, Any], rendered: list[dict[str, Any]]
) -> None:
    for name in ("proxy", "triton"):
        image = _kind(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == compose["services"][name]["image"], name
    triton = _kind(rendered, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert "--model-repository=/opt/by_key/models" in triton["args"]
    stores = {e["name"]: e["value"] for e in triton["env"]}
    assert stores["FEATURE_STORE"] == _proxy_config(rendered)["data"]["PROXY_FEATURE_STORE"]


def test_deployment_files_use_only_known_settings() -> None:
    # An unknown PROXY_ variable would be silently ignored by the proxy: refuse typos here.
    known = {f"PROXY_{name.upper()}" for name in Settings.model_fields}
    # The OpenTelemetry SDK's variables (tracing), as the SDK names them.
    from opentelemetry import environment_variables as api_variables
    from opentelemetry.sdk import environment_variables

    known |= {
        v for m in (environment_variables, api_variables) for k, v in vars(m).items() if k.startswith("OTEL_")
    }
    compose_env = _environment(yaml.safe_load(COMPOSE.read_text())["services"]["proxy"]["environment"])
    k8s_env = dict(
        line.split("=", 1)
        for line in (K8S / "proxy.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    for env in (compose_env, k8s_env):
        for key in env:
            # TRITON_GRPC_URL: read by the example compositions file (${TRITON_GRPC_URL:-...}).
            assert key.startswith("SERVICE_") or key in known or key == "TRITON_GRPC_URL", key


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: list[dict[str, Any]]) -> None:
    namespace = _kind(rendered, "Namespace", "iris-triton-msa")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in _pod_specs(rendered).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, name
    # The README: "the proxy's root filesystem is read-only".
    (proxy,) = _pod_specs(rendered)["proxy"]["containers"]
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True


def test_disruption_budgets_keep_one_pod_and_leave_room_to_drain(rendered: list[dict[str, Any]]) -> None:
    for name in ("triton", "proxy"):
        budget = _kind(rendered, "PodDisruptionBudget", name)["spec"]
        deployment = _kind(rendered, "Deployment", name)
        assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        # minAvailable below the replicas (and the autoscaler's minimum): a node can still be drained.
        minimum = _kind(rendered, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"]
        assert 1 <= budget["minAvailable"] < min(deployment["spec"]["replicas"], minimum), name


def test_both_tiers_pause_before_shutdown(rendered: list[dict[str, Any]]) -> None:
    for name, pod in _pod_specs(rendered).items():
        pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 1 <= pause < pod.get("terminationGracePeriodSeconds", 30), name
    proxy = _pod_specs(rendered)["proxy"]
    pause = proxy["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    deadline_s = Settings.model_fields["deadline_ms"].default / 1000
    assert pause + deadline_s < proxy["terminationGracePeriodSeconds"]


def test_a_settings_change_rolls_the_proxy(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    def config_reference(docs: list[dict[str, Any]]) -> str:
        (source,) = _pod_specs(docs)["proxy"]["containers"][0]["envFrom"]
        return str(source["configMapRef"]["name"])

    assert config_reference(rendered) == _proxy_config(rendered)["metadata"]["name"]
    changed = tmp_path / "k8s"
    shutil.copytree(K8S, changed)
    (changed / "proxy.env").write_text((K8S / "proxy.env").read_text().replace("=2000", "=1500"))
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(changed)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    # A new ConfigMap name in the pod template: Kubernetes starts new pods with the new settings.
    assert config_reference(docs) == _proxy_config(docs)["metadata"]["name"] != config_reference(rendered)
    assert _proxy_config(docs)["data"]["PROXY_DEADLINE_MS"] == "1500"


def test_the_compositions_reach_running_pods_in_place_and_are_reloaded(
    rendered: list[dict[str, Any]],
) -> None:
    settings = _proxy_config(rendered)["data"]
    files = _kind(rendered, "ConfigMap", "proxy-files")  # no hash in its name: updated in place
    assert files["data"] == {p.name: p.read_text() for p in sorted((K8S / "config").iterdir())}
    assert settings["PROXY_WATCH_CONFIG"] == "true"
    pod = _pod_specs(rendered)["proxy"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "proxy-files"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount  # a subPath mount is never updated
    for key, name in (
        ("PROXY_COMPOSITIONS_FILE", "compositions.yaml"),
        ("PROXY_PIPELINES_FILE", "pipelines.yaml"),
    ):
        assert settings[key] == f"{mount['mountPath']}/{name}"


def test_the_clusters_compositions_and_pipelines_are_valid(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """``python -m client_proxy --check`` with the cluster's settings and files, as a pod reads them."""
    settings = dict(_proxy_config(rendered)["data"])
    for name, text in _kind(rendered, "ConfigMap", "proxy-files")["data"].items():
        (tmp_path / name).write_text(text)
    settings["PROXY_COMPOSITIONS_FILE"] = str(tmp_path / "compositions.yaml")
    settings["PROXY_PIPELINES_FILE"] = str(tmp_path / "pipelines.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "SERVICE_"))} | settings
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy", "--check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # And it can fail: a pipeline naming a service no file declares.
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n  p:\n    steps:\n      - {name: a, services: [nowhere]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "client_proxy", "--check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown service 'nowhere'" in result.stderr


def test_every_image_is_pinned(rendered: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    images = [
        c["image"]
        for pod in _pod_specs(rendered).values()
        for c in pod.get("initContainers", []) + pod["containers"]
    ]
    images += [service["image"] for service in compose["services"].values()]
    dockerfiles = (DOCKERFILE, MODELS_DOCKERFILE, TRITON_DOCKERFILE)
    images += re.findall(r"^FROM (\S+)", "".join(d.read_text() for d in dockerfiles), re.M)
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert "@sha256:" in image or (name and tag and tag != "latest"), image


def test_the_init_container_fills_a_repository_that_triton_serves(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Without Docker: the models image's filesystem laid out as its Dockerfile says, the init
    container's own command run against it, and the real Triton started on the result."""
    copy = re.search(r"^COPY (\S+) (\S+)$", MODELS_DOCKERFILE.read_text(), re.M)
    assert copy is not None
    image_root = tmp_path / "image"
    shutil.copytree(
        ROOT / copy[1], image_root / copy[2].strip("/"), ignore=shutil.ignore_patterns("TRAINING.md")
    )
    pod = _pod_specs(rendered)["triton"]
    (init,) = pod["initContainers"]
    assert init["image"].startswith("iris-triton-msa/models:")
    (mount,) = init["volumeMounts"]
    served = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == mount["name"]]
    assert served and served[0]["readOnly"] is True
    assert f"--model-repository={served[0]['mountPath']}" in pod["containers"][0]["args"]
    volume = tmp_path / "volume"
    volume.mkdir()
    command = init["command"][-1].replace("/models/", f"{image_root}/{copy[2].strip('/')}/")
    command = command.replace(mount["mountPath"] + "/", f"{volume}/")
    subprocess.run(["sh", "-c", command], check=True, timeout=60)
    with TritonServer(model_repository=volume, http_port=0, grpc_port=0, metrics_port=0) as server:
        url = f"http://{server.http_url}/v2/models/iris_ensemble/ready"
        assert httpx.get(url, timeout=5).status_code == 200


def test_k8s_loads_the_feature_store_the_proxy_reads(
    rendered: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    """Redis (compose's release) behind a Service, loaded by a Job that runs the image's own
    loader on the CSVs the Dockerfile copies, at the URL the proxy's ConfigMap names."""
    store = _proxy_config(rendered)["data"]["PROXY_FEATURE_STORE"]
    redis = _pod_specs(rendered)["redis"]["containers"][0]
    assert redis["image"] == compose["services"]["redis"]["image"]
    service = _kind(rendered, "Service", "redis")["spec"]
    host, port = store.removeprefix("redis://").split("/")[0].split(":")
    assert (host, int(port)) == ("redis", service["ports"][0]["port"])
    assert service["selector"] == _kind(rendered, "Deployment", "redis")["spec"]["selector"]["matchLabels"]
    job = _kind(rendered, "Job", "features")["spec"]["template"]["spec"]
    (loader,) = job["containers"]
    assert loader["image"] == _pod_specs(rendered)["proxy"]["containers"][0]["image"]
    command = loader["command"]
    assert command[:3] == ["python", "-m", "client_proxy.feature_loader"]
    assert command[command.index("--store") + 1] == store
    assert "COPY features ./features" in _final_stage(DOCKERFILE.read_text())
    for csv in command[command.index("--store") + 2 :]:
        assert (ROOT / csv.removeprefix("/app/")).is_file(), csv  # the image's WORKDIR is /app
    # The Job's pod meets the namespace's restricted standard as the Deployments' do.
    assert job["securityContext"]["runAsNonRoot"] is True and job["securityContext"]["runAsUser"] != 0
    assert job["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert loader["securityContext"]["allowPrivilegeEscalation"] is False
    assert loader["securityContext"]["capabilities"]["drop"] == ["ALL"]
