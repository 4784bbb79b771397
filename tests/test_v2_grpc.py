"""The Open Inference Protocol over gRPC: unmodified ``tritonclient.grpc`` (sync and aio) calls
Triton's ``iris_ensemble`` and the proxy's ``iris_fanout`` with the same code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from local_triton import TritonServer, free_ports

from .helpers import running_proxy, services_on, settings

OUTPUTS = ("scores", "label", "proba", "class_name")


@pytest.fixture(scope="module", params=["lean", "grpcio"])
def proxy(triton: TritonServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The door served by the proxy's own HTTP/2 server (the default), and by grpcio's."""
    (port,) = free_ports(1)
    with running_proxy(settings(grpc_port=port, grpc_server=request.param), services_on(triton, "grpc")):
        yield f"127.0.0.1:{port}"


def _infer(
    client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kwargs: Any
) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(
        model, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS], **kwargs
    )
    return {n: result.as_numpy(n) for n in OUTPUTS}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        if got[name].dtype == object:
            assert got[name].tolist() == expected[name].tolist(), name
        else:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)


def test_the_ensembles_code_calls_the_fan_out_batched_and_row_by_row(
    proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    direct, through = (
        grpcclient.InferenceServerClient(triton.grpc_url),
        grpcclient.InferenceServerClient(proxy),
    )
    try:
        _assert_same(_infer(through, "iris_fanout", x), _infer(direct, "iris_ensemble", x))
        for row in x:
            one = row[None, :]
            _assert_same(_infer(through, "iris_fanout", one), _infer(direct, "iris_ensemble", one))
    finally:
        direct.close()
        through.close()


def test_the_aio_client_too(proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = iris

    async def call(url: str, model: str) -> list[dict[str, np.ndarray]]:
        answers = []
        async with grpcaio.InferenceServerClient(url) as client:
            for rows in [x, *(row[None, :] for row in x)]:  # batched, then row by row
                tensor = grpcaio.InferInput("input", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows)
                result = await client.infer(model, [tensor], request_id="aio-1")  # every output
                assert result.get_response().id == "aio-1"
                answers.append({n: result.as_numpy(n) for n in OUTPUTS})
        return answers

    ours, theirs = (
        asyncio.run(call(proxy, "iris_fanout")),
        asyncio.run(call(triton.grpc_url, "iris_ensemble")),
    )
    assert len(ours) == len(theirs) == 151
    for got, expected in zip(ours, theirs, strict=True):
        _assert_same(got, expected)


def test_metadata_config_and_health_as_triton_gives_them(proxy: str, triton: TritonServer) -> None:
    direct, through = (
        grpcclient.InferenceServerClient(triton.grpc_url),
        grpcclient.InferenceServerClient(proxy),
    )
    try:
        ours = through.get_model_metadata("iris_fanout", as_json=True)
        theirs = direct.get_model_metadata("iris_ensemble", as_json=True)
        assert ours["inputs"] == theirs["inputs"] and ours["outputs"] == theirs["outputs"]
        config = through.get_model_config("iris_fanout", as_json=True)["config"]
        ensemble = direct.get_model_config("iris_ensemble", as_json=True)["config"]
        assert config["max_batch_size"] == ensemble["max_batch_size"]
        for key in ("input", "output"):
            assert [(t["name"], t["data_type"], t["dims"]) for t in config[key]] == [
                (t["name"], t["data_type"], t["dims"]) for t in ensemble[key]
            ]
        assert through.is_server_live() and through.is_server_ready()
        assert through.is_model_ready("iris_fanout")
        assert through.get_server_metadata(as_json=True)["name"] == "client_proxy"
        with pytest.raises(InferenceServerException) as unimplemented:
            through.get_inference_statistics()
        assert unimplemented.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        direct.close()
        through.close()


def test_a_version_other_than_1_is_an_unknown_model_as_in_triton(proxy: str, triton: TritonServer) -> None:
    """As over HTTP: version 1 is the model, any other NOT_FOUND in Triton's words (metadata,
    config, infer) and not ready (without an error, as Triton answers); Triton's classifier alike."""
    direct, through = (
        grpcclient.InferenceServerClient(triton.grpc_url),
        grpcclient.InferenceServerClient(proxy),
    )
    try:
        for client, model in ((direct, "virginica"), (through, "iris_fanout"), (through, "virginica")):
            calls = {
                "metadata": partial(client.get_model_metadata, model, "2"),
                "config": partial(client.get_model_config, model, "2"),
                "infer": partial(client.infer, model, [_row()], model_version="2"),
            }
            for what, call in calls.items():
                with pytest.raises(InferenceServerException) as error:
                    call()
                assert error.value.status() == "StatusCode.NOT_FOUND", (model, what)
                assert f"Request for unknown model: '{model}' version 2 is not found" in str(error.value)
            assert not client.is_model_ready(model, "2") and client.is_model_ready(model, "1")
            assert client.get_model_metadata(model, "1", as_json=True)["name"] == model
            assert client.get_model_config(model, "1", as_json=True)["config"]["name"] == model
            assert client.infer(model, [_row()], model_version="1").get_response().outputs
    finally:
        direct.close()
        through.close()


def test_a_service_passes_through(
    proxy: str, triton: TritonServer, iris: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = iris
    direct, through = (
        grpcclient.InferenceServerClient(triton.grpc_url),
        grpcclient.InferenceServerClient(proxy),
    )
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = through.infer("versicolor", [tensor]).as_numpy("probabilities")
        np.testing.assert_array_equal(got, direct.infer("versicolor", [tensor]).as_numpy("probabilities"))
    finally:
        direct.close()
        through.close()


@pytest.mark.parametrize(
    ("model", "tensor", "code", "message"),
    [
        ("nope", ("input", [1, 4], "FP32"), "StatusCode.NOT_FOUND", "unknown model: 'nope'"),
        ("iris_fanout", ("inputs", [1, 4], "FP32"), "StatusCode.INVALID_ARGUMENT", "missing 'input'"),
        ("iris_fanout", ("input", [1, 3], "FP32"), "StatusCode.INVALID_ARGUMENT", "got rows of shape [1, 3]"),
    ],
)
def test_bad_requests_get_grpc_status_codes(
    proxy: str, model: str, tensor: tuple[str, list[int], str], code: str, message: str
) -> None:
    name, shape, datatype = tensor
    client = grpcclient.InferenceServerClient(proxy)
    try:
        inferred = grpcclient.InferInput(name, shape, datatype)
        inferred.set_data_from_numpy(np.ones(shape, dtype=np.float32))
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [inferred])
        assert error.value.status() == code and message in str(error.value)
        assert client.infer("iris_fanout", [_row()]).as_numpy("class_name").tolist() == [[b"setosa"]]
    finally:
        client.close()


def _row() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.asarray([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    return tensor


def test_the_clients_deadline_is_the_requests_and_partial_answers_say_so(
    explicit_triton: TritonServer,
) -> None:
    (port,) = free_ports(1)
    models = {"setosa": "setosa", "versicolor": "versicolor", "very_slow": "very_slow"}
    # The service timeout (20 s) is not what cuts very_slow (3 s) here: the client's deadline is,
    # and Triton's ``timeout`` parameter. The proxy's deadline (15 s) leaves the last request room
    # for the calls the earlier ones left running on very_slow (3 s each, queued on Triton).
    with running_proxy(
        settings(grpc_port=port, deadline_ms=15_000, service_timeout_ms=20_000),
        services_on(explicit_triton, "grpc", models),
    ):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            started = time.monotonic()
            result = client.infer("iris_fanout", [_row()], client_timeout=0.8)  # seconds: the gRPC deadline
            assert time.monotonic() - started < 2.0  # the client's deadline, not the proxy's 15 s
            parameters = result.get_response().parameters
            assert parameters["partial"].bool_param is True
            assert parameters["missing"].string_param == "very_slow"
            assert parameters["missing.very_slow"].string_param.startswith("timeout: ")
            with pytest.raises(InferenceServerException) as late:
                client.infer(
                    "iris_fanout",
                    [_row()],
                    client_timeout=0.8,
                    parameters={"timeout_policy": "all_or_nothing"},
                )
            assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            # Triton's timeout parameter (µs): without it very_slow would answer, 3 s on (within 15 s).
            quick = client.infer("iris_fanout", [_row()], timeout=300_000)
            assert quick.get_response().parameters["missing"].string_param == "very_slow"
            whole = client.infer("iris_fanout", [_row()])
            assert "missing" not in whole.get_response().parameters  # the same request, no parameter
        finally:
            client.close()


def test_a_raw_grpc_call_with_typed_contents(proxy: str) -> None:
    """Not every client sends raw bytes: typed contents (fp32_contents) work too."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(proxy) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="iris_fanout")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([5.1, 3.5, 1.4, 0.2])
        response = stub.ModelInfer(request, timeout=10)
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("class_name")]
    assert raw[4:] == b"setosa"


def test_the_wine_composition_and_a_pipeline_over_grpc(triton: TritonServer, tmp_path: Any) -> None:
    """The other shapes: a composition of three models with other tensor names (one shared input
    of 13 features), and the Iris cascade, over gRPC, as the proxy's own JSON routes answer."""
    import httpx

    from training import wine

    path = tmp_path / "compositions.yaml"
    path.write_text(
        "compositions:\n  wine:\n    services:\n"
        + "".join(
            f'      {m}: {{target: "{triton.grpc_url}/{m}"}}\n'
            for m in ("wine_logreg", "wine_gbt", "wine_knn")
        )
        + "    aggregator: mean\n"
    )
    (port,) = free_ports(1)
    x, _ = wine.load()
    iris_rows = np.asarray([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32)
    with running_proxy(settings(grpc_port=port, compositions_file=path), services_on(triton, "grpc")) as url:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            (only,) = client.get_model_metadata("wine", as_json=True)["inputs"]
            assert only["datatype"] == "FP64" and only["shape"] == ["-1", "13"]
            tensor = grpcclient.InferInput(only["name"], list(x.shape), "FP64")
            tensor.set_data_from_numpy(x)
            result = client.infer("wine", [tensor])
            cascade = grpcclient.InferInput("input", list(iris_rows.shape), "FP32")
            cascade.set_data_from_numpy(iris_rows)
            piped = client.infer("iris_cascade", [cascade])
        finally:
            client.close()
        rows = httpx.post(f"{url}/compositions/wine/label", json={"data": x.tolist()}).json()["prediction"]
        steps = httpx.post(f"{url}/pipelines/iris_cascade", json={"data": iris_rows.tolist()}).json()
    assert [n.decode() for n in result.as_numpy("class_name").reshape(-1)] == [r["label"] for r in rows]
    np.testing.assert_allclose(result.as_numpy("proba").reshape(-1), [r["proba"] for r in rows], atol=1e-6)
    got = [
        (c.decode(), s.decode())
        for c, s in zip(
            piped.as_numpy("class_name").reshape(-1), piped.as_numpy("stopped_at").reshape(-1), strict=True
        )
    ]
    assert (
        got
        == [(r["label"], r["stopped_at"]) for r in steps["prediction"]]
        == [("setosa", "setosa"), ("virginica", "versicolor_or_virginica")]
    )


def test_grpc_refuses_a_wrong_datatype_and_an_oversized_message(proxy: str) -> None:
    client = grpcclient.InferenceServerClient(proxy)
    try:
        text = grpcclient.InferInput("input", [1, 4], "BYTES")
        text.set_data_from_numpy(np.full((1, 4), b"x", dtype=object))
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("iris_fanout", [text])
        assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in str(wrong.value)
        huge = grpcclient.InferInput("input", [1024, 400], "FP32")  # 1.6 MB, over PROXY_MAX_BODY_BYTES
        huge.set_data_from_numpy(np.ones((1024, 400), dtype=np.float32))
        with pytest.raises(InferenceServerException) as big:
            client.infer("iris_fanout", [huge])
        assert big.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.infer("iris_fanout", [_row()]).as_numpy("class_name").tolist() == [[b"setosa"]]
    finally:
        client.close()


def test_raw_contents_of_the_wrong_size_are_invalid_argument(proxy: str) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(proxy) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="iris_fanout")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones(3, dtype=np.float32).tobytes())  # 12 bytes, not 16
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes of binary data, the shape [1, 4] of FP32 needs 16" in (error.value.details() or "")


@pytest.mark.parametrize(
    ("model", "code"), [("nope", "StatusCode.NOT_FOUND"), ("iris_fanout", "StatusCode.INVALID_ARGUMENT")]
)
def test_a_request_that_cannot_be_read_is_not_found_for_an_unknown_model(
    proxy: str, model: str, code: str
) -> None:
    """No inputs cannot be read: for a model that does not exist that is NOT_FOUND, as in Triton
    (the door looks the model up before saying what was wrong), else INVALID_ARGUMENT."""
    client = grpcclient.InferenceServerClient(proxy)
    try:
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [])
        assert error.value.status() == code, str(error.value)
    finally:
        client.close()
