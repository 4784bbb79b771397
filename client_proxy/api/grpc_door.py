"""The Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService`` (its
messages ship in ``tritonclient.grpc``), served in the proxy's own process and event loop on
``PROXY_GRPC_PORT`` (9001) by the lean server of ``grpc_wire`` (or grpcio's asyncio server, with
``PROXY_GRPC_SERVER=grpcio``), over the same core as the HTTP routes.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer
are served; the others answer UNIMPLEMENTED (grpcio's default). Errors are gRPC status codes:
INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown model, UNAVAILABLE when too few
services answered, DEADLINE_EXCEEDED past the deadline; the client's own gRPC deadline counts as
the request's (less a margin for the answer's way back, so a partial answer arrives in time).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn, Protocol

import grpc
import numpy as np
from google.protobuf import json_format
from numpy.typing import NDArray
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from client_proxy import tracing
from client_proxy.api import grpc_calls, grpc_wire
from client_proxy.api.oip import (
    SERVER,
    check_version,
    from_bytes,
    inference_request,
    outputs_of,
    raw_outputs,
)
from client_proxy.api.reading import CallOptions
from client_proxy.api.state import ProxyState
from client_proxy.core.contracts import NUMPY_DTYPES
from client_proxy.core.dataplane import InferenceRequest
from client_proxy.core.served import VERSION, Served, UnknownModel
from client_proxy.errors import InvalidInput, ProxyError
from client_proxy.http2 import Limits
from client_proxy.observability import request_id_from

logger = logging.getLogger("client_proxy.grpc")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


async def _abort(context: grpc.aio.ServicerContext, exc: ProxyError) -> NoReturn:
    await context.abort(_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message)
    raise AssertionError("context.abort returned")  # it raises, in grpcio and in the lean server


def _decode_contents(tensor: Any, shape: list[int]) -> NDArray[Any]:
    where = f"input '{tensor.name}'"
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"{where}: datatype {tensor.datatype} cannot be sent as typed contents")
    values = list(getattr(tensor.contents, field))
    count = int(np.prod(shape)) if shape else 1
    if len(values) != count:
        raise InvalidInput(f"{where}: {len(values)} values, the shape {shape} needs {count}")
    dtype = object if tensor.datatype == "BYTES" else NUMPY_DTYPES[tensor.datatype]
    try:
        array = np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise InvalidInput(f"{where}: a value does not fit {tensor.datatype}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where}: values must be finite")
    return array


def _inputs(request: Any, max_rows: int) -> dict[str, NDArray[Any]]:
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors: dict[str, NDArray[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        shape = [int(d) for d in tensor.shape]
        if tensor.datatype not in NUMPY_DTYPES:
            raise InvalidInput(f"input '{tensor.name}': unknown datatype {tensor.datatype!r}")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{tensor.name}': the shape {shape} has a negative dimension")
        if shape and shape[0] > max_rows:
            raise InvalidInput(f"input '{tensor.name}': {shape[0]} rows, more than the {max_rows} allowed")
        if tensor.name in tensors:
            raise InvalidInput(f"input '{tensor.name}' is given twice")
        if raw:
            tensors[tensor.name] = from_bytes(f"input '{tensor.name}'", raw[i], shape, tensor.datatype)
        else:
            tensors[tensor.name] = _decode_contents(tensor, shape)
    return tensors


def _parameter(value: Any) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    return service_pb2.InferParameter(string_param=str(value))


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's gRPC inference service, answered by the proxy's core."""

    def __init__(self, state: ProxyState) -> None:
        self._state = state
        self._variant_header = state.settings.variant_header

    @property
    def _timeout(self) -> float:
        return self._state.settings.service_timeout_ms / 1000

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        ready = not self._state.draining and await self._state.plane.models.ready(
            "iris_fanout", self._timeout
        )
        return service_pb2.ServerReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(**SERVER)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            check_version(request.name, request.version)
        except UnknownModel:
            return service_pb2.ModelReadyResponse(ready=False)  # as Triton answers
        try:
            ready = await self._state.plane.models.ready(request.name, self._timeout)
        except ProxyError as exc:
            await _abort(context, exc)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def _described(self, request: Any, context: Any) -> Served:
        try:
            check_version(request.name, request.version)
            return await self._state.plane.models.describe(request.name, self._timeout)
        except ProxyError as exc:
            await _abort(context, exc)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        served = await self._described(request, context)
        return json_format.ParseDict(served.metadata(), service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        served = await self._described(request, context)
        config = json_format.ParseDict(
            served.config(), model_config_pb2.ModelConfig(), ignore_unknown_fields=True
        )
        return service_pb2.ModelConfigResponse(config=config)

    def _inference(
        self, request: service_pb2.ModelInferRequest, outputs: list[str] | None, options: CallOptions
    ) -> InferenceRequest:
        """The dataplane's request: the protocol's inputs, outputs and parameters read."""
        for output in request.outputs:
            if "classification" in output.parameters:
                raise InvalidInput(f"output '{output.name}': the classification extension is not served here")
        parameters = request.parameters
        return inference_request(
            request.model_name,
            "grpc ModelInfer {name}",
            options,
            parameters["timeout"].int64_param if "timeout" in parameters else None,
            parameters["timeout_policy"].string_param if "timeout_policy" in parameters else None,
            _inputs(request, self._state.settings.max_rows),
            outputs,
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if not tracing.ENABLED:
            return await self._infer(request, context)
        request_id = request_id_from(request.id or None)
        carrier = {k: str(v) for k, v in context.invocation_metadata() or ()}
        path = "/inference.GRPCInferenceService/ModelInfer"
        span, token = tracing.start_request("POST", path, carrier, request_id, door="grpc")
        status = "OK"
        try:
            return await self._infer(request, context, request_id)
        except grpc_calls.Abort as exc:
            status = exc.code.name
            raise
        except BaseException as exc:  # grpcio's abort raises its own exception
            status = type(exc).__name__
            raise
        finally:
            tracing.end_grpc_request(span, token, request.model_name, status)

    async def _infer(self, request: Any, context: Any, request_id: str | None = None) -> Any:
        state = self._state
        settings = state.settings
        if request_id is None:
            request_id = request_id_from(request.id or None)
        started = time.monotonic()
        deadline = started + settings.deadline_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            # The client's gRPC deadline is the request's, less a margin in which the answer
            # (partial, or the error) travels back: a tenth of it, from 10 to 100 ms.
            margin = min(max(remaining / 10, 0.01), 0.1)
            deadline = min(deadline, started + max(remaining - margin, 0.001))
        admission = state.admission
        if not admission.enter("grpc"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, admission.reason())
        try:
            if request.model_version:
                check_version(request.model_name, request.model_version)
            outputs = [o.name for o in request.outputs] or None
            variant = variant_key = None
            for key, value in context.invocation_metadata() or ():
                if key == "x-variant":
                    variant = str(value)
                elif key == self._variant_header:
                    variant_key = str(value)
            try:
                inference = self._inference(
                    request,
                    outputs,
                    CallOptions(request_id, None, started, deadline, variant, variant_key),
                )
            except ProxyError:
                state.plane.models.find(request.model_name)  # unknown: NOT_FOUND whatever the inputs
                raise
            tensors, answer_parameters = outputs_of(await state.plane.infer(inference), outputs)
        except ProxyError as exc:
            await _abort(context, exc)
        finally:
            admission.leave()
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=VERSION, id=request.id
        )
        for key, value in answer_parameters.items():
            response.parameters[key].CopyFrom(_parameter(value))
        add_output, contents = response.outputs.add, response.raw_output_contents
        for name, datatype, shape, raw in raw_outputs(tensors):
            add_output(name=name, datatype=datatype, shape=shape)
            contents.append(raw)
        return response


#: The methods served, with their request types; grpcio answers the others UNIMPLEMENTED, as the
#: lean server does.
_METHODS = {
    "ServerLive": service_pb2.ServerLiveRequest,
    "ServerReady": service_pb2.ServerReadyRequest,
    "ServerMetadata": service_pb2.ServerMetadataRequest,
    "ModelReady": service_pb2.ModelReadyRequest,
    "ModelMetadata": service_pb2.ModelMetadataRequest,
    "ModelConfig": service_pb2.ModelConfigRequest,
    "ModelInfer": service_pb2.ModelInferRequest,
}


class Door(Protocol):
    async def stop(self, grace: float | None) -> None: ...


async def start(state: ProxyState, host: str, port: int) -> Door:
    """The gRPC service on ``host:port``, started in the running event loop, by the server
    ``PROXY_GRPC_SERVER`` names."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    service = InferenceService(state)
    settings = state.settings
    if settings.grpc_server == "grpcio":
        door: Door = await _start_grpcio(service, state, address)
    else:
        lean = grpc_wire.LeanGrpcServer(
            {
                f"/inference.GRPCInferenceService/{name}": grpc_calls.Method(
                    request_type, getattr(service, name)
                )
                for name, request_type in _METHODS.items()
            },
            max_message_bytes=settings.max_body_bytes,
            limits=Limits(
                control_frames=settings.grpc_max_control_frames,
                resets=settings.grpc_max_resets,
                handshake_timeout=settings.grpc_handshake_timeout_ms / 1000,
                idle_timeout=settings.grpc_idle_timeout_ms / 1000,
                connection_window=settings.grpc_connection_window,
            ),
            max_connections=settings.grpc_max_connections,
            kept=grpc_calls.TRACE_HEADERS | {b"x-variant", settings.variant_header.encode()},
        )
        try:
            # Every uvicorn worker starts its own door: with several, they share the port.
            await lean.start(host, port, reuse_port=state.settings.workers > 1)
        except OSError as exc:
            raise RuntimeError(f"PROXY_GRPC_PORT={port}: cannot listen on {address} ({exc})") from None
        door = lean
    logger.info("Open Inference Protocol over gRPC on %s (%s)", address, state.settings.grpc_server)
    return door


async def _start_grpcio(service: InferenceService, state: ProxyState, address: str) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", state.settings.max_body_bytes),
            ("grpc.max_send_message_length", 2**31 - 1),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(
            f"PROXY_GRPC_PORT={state.settings.grpc_port}: cannot listen on {address} ({exc})"
        ) from None
    await server.start()
    return server
