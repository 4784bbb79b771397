"""KServe's Python SDK calling a proxy, in a process of its own: ``python -m tests.kserve_calls
<http base URL> <gRPC address> <rows JSON>`` prints one JSON object with what each call gave.

Its own process because KServe's SDK and tritonclient each register the protocol's messages
(package ``inference``) in protobuf's one default pool: both cannot be imported in one process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(model: str, x: np.ndarray, binary: bool) -> InferRequest:
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1")


def _answer(response: Any) -> dict[str, Any]:
    outputs = {}
    for output in response.outputs:
        array = output.as_numpy()
        values = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        outputs[output.name] = {"shape": list(array.shape), "data": values}
    return {"id": response.id, "model_name": response.model_name, "outputs": outputs}


async def _rest(url: str, x: np.ndarray) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, "iris_fanout"),
            "service_ready": await client.is_model_ready(url, "setosa"),
        }
        for binary in (False, True):
            response = await client.infer(url, _request("iris_fanout", x, binary), model_name="iris_fanout")
            found["binary" if binary else "json"] = _answer(response)
        try:
            await client.infer(url, {"inputs": []}, model_name="no_such_model")
        except httpx.HTTPStatusError as exc:
            found["unknown"] = {"status": exc.response.status_code, "error": exc.response.json()["error"]}
        return found
    finally:
        await client.close()


async def _grpc(address: str, x: np.ndarray) -> dict[str, Any]:
    client = InferenceGRPCClient(address, timeout=30)
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready("iris_fanout"),
            "answer": _answer(await client.infer(_request("iris_fanout", x, binary=False))),
        }
        try:
            await client.infer(InferRequest(model_name="no_such_model", infer_inputs=[]))
        except grpc.RpcError as exc:
            found["unknown"] = {"code": exc.code().name, "details": exc.details()}  # type: ignore[attr-defined]
        return found
    finally:
        await client.close()


async def main(url: str, address: str, rows: list[list[float]]) -> dict[str, Any]:
    x = np.asarray(rows, dtype=np.float32)
    return {"rest": await _rest(url, x), "grpc": await _grpc(address, x)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
