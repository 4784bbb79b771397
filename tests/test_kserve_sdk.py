"""The Open Inference Protocol's reference client, KServe's Python SDK (``kserve`` on PyPI),
calls every OIP route the README shows, over REST v2 and over gRPC, unmodified, and gets the
answers ``tritonclient`` gets from Triton's own ensemble.

The SDK runs in a process of its own (``tests/kserve_calls.py``): it registers the protocol's
messages under the same names as tritonclient, and protobuf keeps one pool per process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from local_triton import TritonServer, free_ports

from .conftest import ROOT
from .helpers import running_proxy, services_on, settings

OUTPUTS = ("scores", "label", "proba", "class_name")


@pytest.fixture(scope="module")
def calls(triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]) -> Iterator[tuple[dict[str, Any], str]]:
    """What each of the SDK's calls gave against a proxy, and the proxy's URL."""
    x, _ = iris
    (grpc_port,) = free_ports(1)
    with running_proxy(settings(grpc_port=grpc_port), services_on(triton, "grpc")) as url:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.kserve_calls",
                url,
                f"127.0.0.1:{grpc_port}",
                json.dumps(x.tolist()),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        yield json.loads(run.stdout), url


@pytest.fixture(scope="module")
def ensemble(triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """tritonclient's answer from Triton's own ``iris_ensemble`` on the same rows."""
    x, _ = iris
    with httpclient.InferenceServerClient(triton.http_url) as client:
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("iris_ensemble", [tensor])
        return {n: result.as_numpy(n) for n in OUTPUTS}


def _assert_same(answer: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    assert answer["id"] == "kserve-1" and answer["model_name"] == "iris_fanout"
    for name in OUTPUTS:
        got = answer["outputs"][name]
        assert got["shape"] == list(expected[name].shape), name
        if expected[name].dtype == object:
            assert got["data"] == [v.decode() for v in expected[name].reshape(-1)], name
        else:
            np.testing.assert_allclose(got["data"], expected[name].reshape(-1), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_the_rest_client_infers_as_tritonclient_does_on_the_ensemble(
    calls: tuple[dict[str, Any], str], ensemble: dict[str, np.ndarray], encoding: str
) -> None:
    """``InferenceRESTClient(protocol="v2")`` sends ``model_name`` and ``id`` in the body (Triton
    ignores the first); the proxy answers it, JSON or binary tensors, as the ensemble does."""
    _assert_same(calls[0]["rest"][encoding], ensemble)


def test_the_rest_clients_health_and_readiness_read_the_protocols_bodies(
    calls: tuple[dict[str, Any], str],
) -> None:
    found, url = calls
    rest = found["rest"]
    assert (rest["live"], rest["ready"], rest["model_ready"], rest["service_ready"]) == (
        True,
        True,
        True,
        True,
    )
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2/models/setosa/ready").json() == {"name": "setosa", "ready": True}


def test_an_unknown_model_is_404_over_rest_whatever_the_body(calls: tuple[dict[str, Any], str]) -> None:
    unknown = calls[0]["rest"]["unknown"]
    assert unknown["status"] == 404 and "unknown model: 'no_such_model'" in unknown["error"]


def test_the_grpc_client_infers_and_reads_health(
    calls: tuple[dict[str, Any], str], ensemble: dict[str, np.ndarray]
) -> None:
    found = calls[0]["grpc"]
    assert (found["live"], found["ready"], found["model_ready"]) == (True, True, True)
    _assert_same(found["answer"], ensemble)


def test_an_unknown_model_is_not_found_over_grpc_whatever_the_inputs(
    calls: tuple[dict[str, Any], str],
) -> None:
    unknown = calls[0]["grpc"]["unknown"]
    assert unknown["code"] == "NOT_FOUND" and "no_such_model" in unknown["details"]
