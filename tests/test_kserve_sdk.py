"""The Open Inference Protocol's reference client, KServe's Python SDK (``kserve`` on PyPI),
calls every OIP route the README shows, over REST v2 and over gRPC, unmodified, and gets the
answers ``tritonclient`` gets from Triton's own ensemble."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from local_triton import TritonServer, free_ports

from .helpers import running_proxy, services_on, settings

T = TypeVar("T")
LABEL_OUTPUTS = ("scores", "label", "proba", "class_name")


@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[tuple[str, str]]:
    """The proxy's HTTP base URL and its gRPC address."""
    (grpc_port,) = free_ports(1)
    with running_proxy(settings(grpc_port=grpc_port), services_on(triton, "grpc")) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def _run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


def _request(model: str, x: np.ndarray, binary: bool) -> InferRequest:
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1")


def _outputs(response: Any) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in response.outputs}


def _ensemble(triton: TritonServer, x: np.ndarray) -> dict[str, np.ndarray]:
    with httpclient.InferenceServerClient(triton.http_url) as client:
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("iris_ensemble", [tensor])
        return {n: result.as_numpy(n) for n in LABEL_OUTPUTS}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in LABEL_OUTPUTS:
        assert got[name].shape == expected[name].shape, name
        if expected[name].dtype == object:
            decoded = [v.decode() if isinstance(v, bytes) else v for v in got[name].reshape(-1)]
            assert decoded == [v.decode() for v in expected[name].reshape(-1)], name
        else:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_rest_client_infers_as_tritonclient_does_on_the_ensemble(
    proxy: tuple[str, str], triton: TritonServer, iris: tuple[np.ndarray, np.ndarray], binary: bool
) -> None:
    """``InferenceRESTClient(protocol="v2")`` sends ``model_name`` and ``id`` in the body (Triton
    ignores the first); the proxy answers it, JSON or binary tensors, as the ensemble does."""
    url, _ = proxy
    x, _ = iris

    async def call() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            return await client.infer(url, _request("iris_fanout", x, binary), model_name="iris_fanout")
        finally:
            await client.close()

    response = _run(call)
    assert response.id == "kserve-1" and response.model_name == "iris_fanout"
    _assert_same(_outputs(response), _ensemble(triton, x))


def test_the_rest_clients_health_and_readiness_read_the_protocols_bodies(proxy: tuple[str, str]) -> None:
    url, _ = proxy

    async def calls() -> tuple[Any, Any, Any, Any]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            return (
                await client.is_server_live(url),
                await client.is_server_ready(url),
                await client.is_model_ready(url, "iris_fanout"),
                await client.is_model_ready(url, "setosa"),
            )
        finally:
            await client.close()

    assert _run(calls) == (True, True, True, True)
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2/models/setosa/ready").json() == {"name": "setosa", "ready": True}


def test_an_unknown_model_is_404_over_rest_whatever_the_body(proxy: tuple[str, str]) -> None:
    url, _ = proxy

    async def call() -> httpx.HTTPStatusError:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            with pytest.raises(httpx.HTTPStatusError) as error:
                await client.infer(url, {"inputs": []}, model_name="no_such_model")
            return error.value
        finally:
            await client.close()

    error = _run(call)
    assert error.response.status_code == 404
    assert "unknown model: 'no_such_model'" in error.response.json()["error"]


def test_the_grpc_client_infers_and_reads_health(
    proxy: tuple[str, str], triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    _, address = proxy
    x, _ = iris

    async def calls() -> tuple[Any, ...]:
        client = InferenceGRPCClient(address, timeout=30)
        try:
            return (
                await client.is_server_live(),
                await client.is_server_ready(),
                await client.is_model_ready("iris_fanout"),
                await client.infer(_request("iris_fanout", x, binary=False)),
            )
        finally:
            await client.close()

    live, ready, model_ready, response = _run(calls)
    assert (live, ready, model_ready) == (True, True, True)
    assert response.model_name == "iris_fanout"
    _assert_same(_outputs(response), _ensemble(triton, x))


def test_an_unknown_model_is_not_found_over_grpc_whatever_the_inputs(proxy: tuple[str, str]) -> None:
    _, address = proxy

    async def call() -> grpc.RpcError:
        client = InferenceGRPCClient(address, timeout=30)
        try:
            with pytest.raises(grpc.RpcError) as error:
                await client.infer(InferRequest(model_name="no_such_model", infer_inputs=[]))
            return error.value
        finally:
            await client.close()

    error = _run(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "no_such_model" in error.details()  # type: ignore[attr-defined]
