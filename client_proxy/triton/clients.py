"""The clients: one async tritonclient per Triton server (protocol, host:port), created on first
use inside the running event loop (the aio clients belong to one loop) and closed together.

Over gRPC, inference calls go through the proxy's own HTTP/2 client (``grpc_lean``) by default;
their errors reach ``errors.translate`` as tritonclient reports gRPC errors, by status code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from client_proxy import tracing
from client_proxy.config import Settings
from client_proxy.core.services import Service, Target
from client_proxy.triton.grpc_lean import CallError, LeanChannel

logger = logging.getLogger("client_proxy.triton.gateway")

# gRPC backs off reconnecting to a server that went away, by default up to 120 s; keep it
# short so the proxy answers again within a second or two of Triton coming back.
_GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

#: Datatypes whose raw bytes are the numpy array's own (BYTES is length-prefixed, BF16 converted:
#: those go through tritonclient's ``InferInput``).
_RAW_DATATYPES = frozenset(
    ("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64")
)

T = TypeVar("T")
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class Client:
    """One Triton server's aio client. The two protocols take the same calls and differ in a few
    arguments: binary tensors over HTTP, a client-side timeout and JSON rendering over gRPC."""

    def __init__(
        self, protocol: str, url: str, max_connections: int, cancel: bool = False, lean: bool = True
    ) -> None:
        self._grpc = protocol == "grpc"
        #: Abandon, not cancel, a gRPC inference call given up on (``Settings.grpc_cancel``).
        self._abandon = self._grpc and not cancel
        self._abandoned = 0
        #: Inference calls over the proxy's own HTTP/2 client (``Settings.grpc_client``).
        self._lean = LeanChannel(url, cancel) if self._grpc and lean else None
        self._module: Any = grpcclient if self._grpc else httpclient
        if self._grpc:
            self._client: Any = grpcaio.InferenceServerClient(url, channel_args=_GRPC_CHANNEL_ARGS)
        else:
            # conn_timeout is aiohttp's total timeout; the proxy's own deadline is shorter anyway.
            self._client = httpaio.InferenceServerClient(url, conn_limit=max_connections, conn_timeout=600.0)
        self._binary: dict[str, Any] = {} if self._grpc else {"binary_data": True}
        self._requested: dict[tuple[str, int], Any] = {}
        #: The channel's stub, for inference calls built here (``_grpc_infer``); None over HTTP,
        #: or should a tritonclient release name it otherwise (its ``infer`` is used then).
        self._stub: Any = getattr(self._client, "_client_stub", None) if self._grpc else None

    def _timeout(self, timeout: float) -> dict[str, Any]:
        return {"client_timeout": timeout} if self._grpc else {}

    async def infer(
        self,
        target: Target,
        tensors: list[tuple[str, NDArray[Any], str]],
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...],
        class_count: int = 0,
    ) -> dict[str, Any]:
        """``outputs`` of one inference on ``tensors`` (name, array, datatype); with
        ``class_count``, Triton's classification of them instead ("score:index:label")."""
        if self._stub is not None and all(datatype in _RAW_DATATYPES for _, _, datatype in tensors):
            return await self._grpc_infer(target, tensors, request_id, timeout, outputs, class_count)
        inputs = []
        for name, array, datatype in tensors:
            tensor = self._module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, **self._binary)
            inputs.append(tensor)
        requested = []
        for name in outputs:
            output = self._requested.get((name, class_count))
            if output is None:
                output = self._module.InferRequestedOutput(name, class_count=class_count, **self._binary)
                self._requested[(name, class_count)] = output
            requested.append(output)
        call = self._client.infer(
            target.model,
            inputs,
            model_version=target.version,
            outputs=requested,
            request_id=request_id,
            headers=tracing.outgoing_headers() if tracing.ENABLED else None,
            **self._timeout(timeout),
        )
        result = await (self._unless_cancelled(call) if self._abandon else call)
        return {name: result.as_numpy(name) for name in outputs}

    async def _grpc_infer(
        self,
        target: Target,
        tensors: list[tuple[str, NDArray[Any], str]],
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...],
        class_count: int,
    ) -> dict[str, Any]:
        """``infer`` over gRPC with the request message built here, in one pass: what
        tritonclient's ``infer`` sends (same message, same deadline, same errors), without an
        ``InferInput`` per tensor and the message copies of its request builder."""
        request = service_pb2.ModelInferRequest(model_name=target.model, model_version=target.version)
        if request_id:
            request.id = request_id
        add_input, contents = request.inputs.add, request.raw_input_contents
        for name, array, datatype in tensors:
            add_input(name=name, datatype=datatype, shape=array.shape)
            contents.append(array.tobytes())  # already in the model's datatype (``_tensors``)
        for name in outputs:
            output = request.outputs.add(name=name)
            if class_count:
                output.parameters["classification"].int64_param = class_count
        # Errors as tritonclient reports gRPC errors, for ``translate``.
        headers = tracing.outgoing_headers() if tracing.ENABLED else None
        if self._lean is not None:
            try:
                answer = await self._lean.unary(_MODEL_INFER, request.SerializeToString(), timeout, headers)
            except CallError as exc:
                raise InferenceServerException(msg=exc.details, status=str(exc.code)) from None
            response = service_pb2.ModelInferResponse.FromString(answer)
        else:
            metadata = tuple(headers.items()) if headers else None
            call = self._stub.ModelInfer(request, timeout=timeout, metadata=metadata)
            try:
                response = await (self._unless_cancelled(call) if self._abandon else call)
            except grpc.RpcError as exc:
                raise InferenceServerException(
                    msg=exc.details(), status=str(exc.code()), debug_details=exc.debug_error_string()
                ) from None
        result = grpcclient.InferResult(response)
        return {name: result.as_numpy(name) for name in outputs}

    @property
    def abandoned(self) -> int:
        """gRPC inference calls given up on and still running on Triton (left to finish)."""
        return self._abandoned + (self._lean.abandoned if self._lean is not None else 0)

    async def _unless_cancelled(self, call: Awaitable[T]) -> T:
        """``call``'s result; if the caller is cancelled meanwhile, the call goes on without it
        (bounded by its gRPC deadline) and its outcome is dropped. Cancelling it would send
        Triton an RST_STREAM, which Triton 24.10's gRPC frontend can answer with a segfault
        (``Settings.grpc_cancel``)."""
        task = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._abandoned += 1
                task.add_done_callback(self._dropped)
            raise

    def _dropped(self, task: asyncio.Future[Any]) -> None:
        self._abandoned -= 1
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned call's failure is no one's error

    async def is_model_ready(self, target: Target, timeout: float) -> bool:
        ready = self._client.is_model_ready(target.model, target.version, **self._timeout(timeout))
        return bool(await ready)

    async def model_metadata(self, target: Target, timeout: float) -> dict[str, Any]:
        json = {"as_json": True} if self._grpc else {}
        metadata = self._client.get_model_metadata(
            target.model, target.version, **json, **self._timeout(timeout)
        )
        return dict(await metadata)

    async def model_config(self, target: Target, timeout: float) -> dict[str, Any]:
        json = {"as_json": True} if self._grpc else {}
        config = dict(
            await self._client.get_model_config(
                target.model, target.version, **json, **self._timeout(timeout)
            )
        )
        return dict(config.get("config", config))  # gRPC wraps it in {"config": ...}

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        await self._client.close()


class Clients:
    """Every Triton server's client, by (protocol, host:port); shared by every request of one app."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str], Client] = {}

    def __call__(self, target: Target) -> Client:
        """The client for ``target``'s server, created on first use."""
        client = self._clients.get(target.server)
        if client is None:
            settings = self._settings
            client = Client(
                target.protocol,
                target.url,
                settings.max_connections,
                settings.grpc_cancel,
                lean=settings.grpc_client == "lean",
            )
            self._clients[target.server] = client
        return client

    def open(self, services: list[Service]) -> None:
        """Create the clients for ``services`` now (in the app's lifespan) rather than on first use."""
        for service in services:
            for target in service.targets:
                self(target)

    async def aclose(self) -> int:
        """Close every client; how many there were."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing must not stop the others from closing
                logger.exception("closing a Triton client failed")
        return len(clients)
