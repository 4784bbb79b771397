"""``/admin/services``: services added and removed without a restart, against the real Triton."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx

from local_triton import TritonServer, free_ports

from .helpers import proxy_environment, running_proxy, services_on, settings

ROW = {"data": [[1.0, 2.0, 3.0, 4.0]]}
TOKEN = "correct-horse-battery-staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_without_a_token_the_admin_endpoints_do_not_exist(triton: TritonServer) -> None:
    with running_proxy(settings(), services_on(triton, "grpc")) as url:
        assert httpx.get(f"{url}/admin/services", headers=AUTH).status_code == 404
        assert (
            httpx.post(f"{url}/admin/services", headers=AUTH, json={"name": "a", "target": "x:1"}).status_code
            == 404
        )
        assert "/admin/services" not in httpx.get(f"{url}/openapi.json").json()["paths"]
        assert httpx.get(f"{url}/experiments", headers=AUTH).status_code == 404


def test_add_and_remove_take_effect_at_once_and_survive_a_restart(
    triton: TritonServer, tmp_path: Path
) -> None:
    store = tmp_path / "services.json"
    no_pipelines = tmp_path / "pipelines.yaml"
    no_pipelines.write_text("pipelines: {}\n")
    proxy_settings = settings(admin_token=TOKEN, services_file=store, pipelines_file=no_pipelines)
    services = services_on(triton, "grpc")
    log_path = tmp_path / "proxy.log"
    with open(log_path, "w") as log, running_proxy(proxy_settings, services, log=log) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = httpx.get(f"{url}/admin/services", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        target = f"grpc://{triton.grpc_url}/setosa"
        added = httpx.post(f"{url}/admin/services", headers=AUTH, json={"name": "setosa_b", "target": target})
        assert added.status_code == 201
        answers = httpx.post(f"{url}/predict", json=ROW).json()
        # Served at once, and really: the same model as setosa, so the same answer, and no error.
        assert answers["setosa_b"] == answers["setosa"] and answers["setosa_b"]["prediction"] is not None
        again = httpx.post(f"{url}/admin/services", headers=AUTH, json={"name": "setosa_b", "target": target})
        assert again.status_code == 409
        bad = httpx.post(
            f"{url}/admin/services", headers=AUTH, json={"name": "Bad Name", "target": "nowhere"}
        )
        assert bad.status_code == 422

        removed = httpx.delete(f"{url}/admin/services/versicolor", headers=AUTH)
        assert removed.status_code == 200
        assert set(httpx.post(f"{url}/predict", json=ROW).json()) == {"setosa", "setosa_b", "virginica"}
        assert httpx.delete(f"{url}/admin/services/versicolor", headers=AUTH).status_code == 404

        changes = httpx.get(f"{url}/metadata").json()["service_changes"]
        assert [(c["action"], c["service"]) for c in changes] == [
            ("add", "setosa_b"),
            ("remove", "versicolor"),
        ]
        assert all(c["by"].startswith("sha256:") and TOKEN not in json.dumps(c) for c in changes)
    # Each change is logged with the token's id, never the token.
    by = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    logged = [line for line in log_path.read_text().splitlines() if "admin by=" in line]
    assert [line.split(" admin ", 1)[1] for line in logged] == [
        f"by={by} add service setosa_b {target}",
        f"by={by} remove service versicolor ",
    ]
    assert TOKEN not in log_path.read_text()

    kept = json.loads(store.read_text())
    assert [e["name"] for e in kept["services"]] == ["setosa", "setosa_b", "virginica"]
    assert [(c["action"], c["service"]) for c in kept["changes"]] == [
        ("add", "setosa_b"),
        ("remove", "versicolor"),
    ]
    # Restarted with other SERVICE_* variables: the file takes priority over them.
    others = services_on(triton, "grpc", {"versicolor": "versicolor"})
    with running_proxy(proxy_settings, others) as url:
        answers = httpx.post(f"{url}/predict", json=ROW).json()
        assert set(answers) == {"setosa", "setosa_b", "virginica"}
        assert answers["setosa_b"] == answers["setosa"] and "error" not in answers["setosa_b"]
        # And the file keeps the changes' history too.
        changes = httpx.get(f"{url}/metadata").json()["service_changes"]
        assert [(c["action"], c["service"]) for c in changes] == [
            ("add", "setosa_b"),
            ("remove", "versicolor"),
        ]


def test_the_admin_token_with_several_workers_needs_a_services_file(triton: TritonServer) -> None:
    """The workers share the admin endpoints' changes through the file (``client_proxy.workers``)."""
    env = proxy_environment(
        settings(admin_token=TOKEN, workers=2), services_on(triton, "grpc"), free_ports(1)[0]
    )
    done = subprocess.run(
        [sys.executable, "-m", "client_proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "client_proxy: error: PROXY_ADMIN_TOKEN with PROXY_WORKERS=2 needs PROXY_SERVICES_FILE: "
        "the workers share the admin endpoints' changes through it"
    ]


def test_a_service_an_experiment_answers_with_cannot_be_removed(triton: TritonServer, tmp_path: Path) -> None:
    compositions = tmp_path / "compositions.yaml"
    compositions.write_text(
        "compositions: {}\nexperiments:\n  versicolor:\n    candidates:\n"
        f"      versicolor_b: {{target: '{triton.grpc_url}/versicolor_v2', shadow: 100}}\n"
    )
    no_pipelines = tmp_path / "pipelines.yaml"
    no_pipelines.write_text("pipelines: {}\n")
    chosen = settings(admin_token=TOKEN, compositions_file=compositions, pipelines_file=no_pipelines)
    with running_proxy(chosen, services_on(triton, "grpc")) as url:
        response = httpx.delete(f"{url}/admin/services/versicolor", headers=AUTH)
        assert response.status_code == 409, response.text
        message = response.json()["error"]["message"]
        assert "experiment 'versicolor'" in message and "compositions file" in message
        listed = httpx.get(f"{url}/experiments", headers=AUTH).json()["experiments"]
        assert listed["versicolor"]["variants"]["versicolor_b"]["kind"] == "service"
        assert httpx.delete(f"{url}/admin/services/setosa", headers=AUTH).status_code == 200


def test_a_service_used_by_a_pipeline_cannot_be_removed(triton: TritonServer) -> None:
    with running_proxy(settings(admin_token=TOKEN), services_on(triton, "grpc")) as url:
        response = httpx.delete(f"{url}/admin/services/setosa", headers=AUTH)
        assert response.status_code == 409 and "iris_cascade" in response.json()["error"]["message"]
