"""The one place that talks to Triton, through the async tritonclient.

One shared client per distinct Triton server (protocol, host:port), created on first use
inside the running event loop (the aio clients belong to one loop) and closed by ``aclose``.
What a model takes and gives (tensor names, datatypes, widths) is read from Triton the first
time a service is called (its ``Contract``) and read again after the model was unavailable,
since it may come back reloaded as another version; no tensor name is written here.
Every tritonclient, aiohttp and grpc exception is translated here into an
``UpstreamError`` subclass; nothing above this module sees a foreign exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from client_proxy.config import Service, Settings
from client_proxy.contracts import NUMPY_DTYPES, Contract
from client_proxy.errors import ProxyError, UpstreamError, UpstreamTimeout, UpstreamUnavailable

logger = logging.getLogger(__name__)

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

_UNAVAILABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED"}
_UNAVAILABLE_TEXT = (
    "unknown model",
    "is not ready",
    "unavailable",
    "failed to connect",
    "connection refused",
)


@dataclass(frozen=True)
class _Plan:
    """How to call one service's model, worked out once from its contract."""

    input_name: str
    datatype: str
    dtype: Any
    output_name: str


#: The pre-call check asks again for a contract it could not read (model unknown, Triton down)
#: after this long; the service's own call still tries every time.
CONTRACT_RETRY_S = 1.0


class _Client(Protocol):
    async def infer(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float, plan: _Plan
    ) -> Any: ...

    async def infer_outputs(
        self,
        service: Service,
        x: NDArray[np.float32],
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...],
    ) -> dict[str, Any]: ...

    async def is_model_ready(self, service: Service, timeout: float) -> bool: ...

    async def model_metadata(self, service: Service, timeout: float) -> dict[str, Any]: ...

    async def model_config(self, service: Service, timeout: float) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class _GrpcClient:
    def __init__(self, url: str) -> None:
        self._client = grpcaio.InferenceServerClient(url, channel_args=_GRPC_CHANNEL_ARGS)
        self._outputs: dict[str, Any] = {}

    async def _infer(
        self,
        service: Service,
        x: NDArray[Any],
        request_id: str,
        timeout: float,
        outputs: list[Any],
        tensor_name: str = "input",
        datatype: str = "FP32",
    ) -> Any:
        tensor = grpcclient.InferInput(tensor_name, x.shape, datatype)
        tensor.set_data_from_numpy(x)
        return await self._client.infer(
            service.model,
            [tensor],
            model_version=service.version,
            outputs=outputs,
            request_id=request_id,
            client_timeout=timeout,
        )

    async def infer(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float, plan: _Plan
    ) -> Any:
        requested = self._outputs.get(plan.output_name)
        if requested is None:
            requested = self._outputs[plan.output_name] = grpcclient.InferRequestedOutput(plan.output_name)
        result = await self._infer(
            service, x, request_id, timeout, [requested], plan.input_name, plan.datatype
        )
        return result.as_numpy(plan.output_name)

    async def infer_outputs(
        self,
        service: Service,
        x: NDArray[np.float32],
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...],
    ) -> dict[str, Any]:
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        result = await self._infer(service, x, request_id, timeout, requested)
        return {name: result.as_numpy(name) for name in outputs}

    async def is_model_ready(self, service: Service, timeout: float) -> bool:
        return bool(await self._client.is_model_ready(service.model, service.version, client_timeout=timeout))

    async def model_metadata(self, service: Service, timeout: float) -> dict[str, Any]:
        result = await self._client.get_model_metadata(
            service.model, service.version, as_json=True, client_timeout=timeout
        )
        return dict(result)

    async def model_config(self, service: Service, timeout: float) -> dict[str, Any]:
        result = await self._client.get_model_config(
            service.model, service.version, as_json=True, client_timeout=timeout
        )
        return dict(result.get("config", result))

    async def close(self) -> None:
        await self._client.close()


class _HttpClient:
    def __init__(self, url: str, max_connections: int) -> None:
        # conn_timeout is aiohttp's total timeout; the proxy's own deadline is shorter anyway.
        self._client = httpaio.InferenceServerClient(url, conn_limit=max_connections, conn_timeout=600.0)
        self._outputs: dict[str, Any] = {}

    async def _infer(
        self,
        service: Service,
        x: NDArray[Any],
        request_id: str,
        outputs: list[Any],
        tensor_name: str = "input",
        datatype: str = "FP32",
    ) -> Any:
        tensor = httpclient.InferInput(tensor_name, list(x.shape), datatype)
        tensor.set_data_from_numpy(x, binary_data=True)
        return await self._client.infer(
            service.model, [tensor], model_version=service.version, outputs=outputs, request_id=request_id
        )

    async def infer(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float, plan: _Plan
    ) -> Any:
        requested = self._outputs.get(plan.output_name)
        if requested is None:
            requested = self._outputs[plan.output_name] = httpclient.InferRequestedOutput(
                plan.output_name, binary_data=True
            )
        result = await self._infer(service, x, request_id, [requested], plan.input_name, plan.datatype)
        return result.as_numpy(plan.output_name)

    async def infer_outputs(
        self,
        service: Service,
        x: NDArray[np.float32],
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...],
    ) -> dict[str, Any]:
        requested = [httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs]
        result = await self._infer(service, x, request_id, requested)
        return {name: result.as_numpy(name) for name in outputs}

    async def is_model_ready(self, service: Service, timeout: float) -> bool:
        return bool(await self._client.is_model_ready(service.model, service.version))

    async def model_metadata(self, service: Service, timeout: float) -> dict[str, Any]:
        return dict(await self._client.get_model_metadata(service.model, service.version))

    async def model_config(self, service: Service, timeout: float) -> dict[str, Any]:
        return dict(await self._client.get_model_config(service.model, service.version))

    async def close(self) -> None:
        await self._client.close()


def translate(exc: BaseException, service: Service) -> UpstreamError:
    """The project's error for a foreign exception raised while calling ``service``."""
    # Error bodies go to clients: they name the service, never the server's address (which
    # /health/all and /metadata show to operators, and the debug log records with the error).
    where = "its Triton server"
    logger.debug("%s (%s): %s: %s", service.name, service.describe(), type(exc).__name__, exc)
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ProxyError):  # the model does not fit its use (e.g. several outputs, none named)
        return UpstreamError(exc.message, service=service.name)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"{service.name}: no answer from {where} in time", service=service.name)
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
        lowered = message.lower()
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return UpstreamTimeout(f"{service.name}: no answer from {where} in time", service=service.name)
        if status in _UNAVAILABLE_GRPC or any(text in lowered for text in _UNAVAILABLE_TEXT):
            if "unknown model" in lowered or "is not ready" in lowered:
                detail = f"model '{service.model}' is not available on {where}"
            else:
                detail = f"{where} is unreachable"
            return UpstreamUnavailable(f"{service.name}: {detail}", service=service.name)
        return UpstreamError(f"{service.name}: {where} failed the request: {message}", service=service.name)
    if isinstance(exc, grpc.RpcError | aiohttp.ClientError | OSError):
        return UpstreamUnavailable(
            f"{service.name}: {where} is unreachable ({type(exc).__name__})", service=service.name
        )
    return UpstreamError(
        f"{service.name}: unexpected error calling {where}: {type(exc).__name__}", service=service.name
    )


class TritonGateway:
    """Calls the models behind the services. Shared by every request of one app."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str], _Client] = {}
        self._contracts: dict[Service, Contract] = {}
        self._plans: dict[Service, _Plan] = {}
        #: When the pre-call check last failed to read a service's contract.
        self._unreadable: dict[Service, float] = {}
        #: (service, row shape, dtype) that fitted its model -> the model's max_batch_size (0: any).
        self._fits: dict[tuple[Service, tuple[int, ...], str], int] = {}

    def _client(self, service: Service) -> _Client:
        client = self._clients.get(service.server)
        if client is None:
            if service.protocol == "grpc":
                client = _GrpcClient(service.url)
            else:
                client = _HttpClient(service.url, self._settings.max_connections)
            self._clients[service.server] = client
        return client

    def open(self, services: list[Service]) -> None:
        """Create the clients for ``services`` now (in the app's lifespan) rather than on first use."""
        for service in services:
            self._client(service)

    async def contract(self, service: Service, timeout: float) -> Contract:
        """What ``service``'s model takes and gives, read from Triton once and then kept."""
        contract = self._contracts.get(service)
        if contract is None:
            described = await self.model_description(service, timeout)
            contract = Contract.from_triton(described["metadata"], described["config"])
            self._contracts[service] = contract
        return contract

    async def ensure_fit(self, services: list[Service], x: NDArray[Any], timeout: float) -> None:
        """Refuse (``ContractMismatch``, 422) rows that do not fit a service's model, before any
        inference call. Contracts not read yet are read now, concurrently and within ``timeout``;
        a service whose contract cannot be read now is left to fail (or not) on its own call."""
        # A contract that could not be read is not asked for again here for a second: the
        # service's own call reports it, and a missing model costs no extra calls per request.
        now = time.monotonic()
        unknown = [
            s
            for s in services
            if s not in self._contracts and now - self._unreadable.get(s, -1e9) >= CONTRACT_RETRY_S
        ]
        if unknown:
            try:
                async with asyncio.timeout(timeout):
                    results = await asyncio.gather(
                        *(self.contract(s, timeout) for s in unknown), return_exceptions=True
                    )
            except TimeoutError:
                results = []
            for service, result in zip(unknown, results, strict=False):
                if isinstance(result, BaseException):
                    self._unreadable[service] = now
        row_shape, dtype = x.shape[1:], x.dtype.str
        for service in services:
            contract = self._contracts.get(service)
            if contract is None or len(contract.inputs) != 1:
                continue
            contract.input_rows(service.name, x)  # raises ContractMismatch naming the service
            self._fits[(service, row_shape, dtype)] = contract.max_batch_size if contract.batched else 0

    def fits(self, services: list[Service], x: NDArray[Any]) -> bool:
        """True when rows of this shape and type already fitted every service's model: the hot
        path, with no need for ``ensure_fit``."""
        row_shape, dtype, n = x.shape[1:], x.dtype.str, len(x)
        for service in services:
            limit = self._fits.get((service, row_shape, dtype))
            if limit is None or (limit and n > limit):
                return False
        return True

    async def _plan(self, service: Service, timeout: float) -> _Plan:
        contract = self._contracts.get(service) or await self.contract(service, timeout)
        if len(contract.inputs) != 1:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' takes {len(contract.inputs)} inputs "
                f"({contract.describe_inputs()}), not rows",
                service=service.name,
            )
        source, output = contract.inputs[0], contract.output(service.name, service.output)
        plan = _Plan(source.name, source.datatype, NUMPY_DTYPES.get(source.datatype), output.name)
        self._plans[service] = plan
        return plan

    def known_contract(self, service: Service) -> Contract | None:
        """The contract already read, if any (no call to Triton)."""
        return self._contracts.get(service)

    async def infer(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float
    ) -> NDArray[np.float32]:
        """``service``'s output for the rows ``x``, one Triton call, in the model's own tensors."""
        client = self._client(service)
        try:
            plan = self._plans.get(service) or await self._plan(service, timeout)
            if plan.dtype is not None and x.dtype != plan.dtype:
                x = x.astype(plan.dtype)
            output = await client.infer(service, x, request_id, timeout, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = translate(exc, service)
            if isinstance(error, UpstreamUnavailable):
                # Unloaded, or Triton gone: the model may come back as another version.
                self._contracts.pop(service, None)
                self._plans.pop(service, None)
                self._fits = {fit: limit for fit, limit in self._fits.items() if fit[0] != service}
            raise error from exc
        if output is None or output.shape[0] != x.shape[0]:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned no output of {x.shape[0]} rows",
                service=service.name,
            )
        output = np.asarray(output, dtype=np.float32)
        if not np.isfinite(output).all():
            # Never pass NaN on (it would reach the client as null): the service failed these rows.
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return output

    async def infer_ensemble(
        self, service: Service, x: NDArray[np.float32], request_id: str, timeout: float
    ) -> tuple[list[str], NDArray[np.float32]]:
        """Triton's own fan-out: the ensemble's ``class_name`` and ``proba`` per row, one call."""
        try:
            out = await self._client(service).infer_outputs(
                service, x, request_id, timeout, ("class_name", "proba")
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, service) from exc
        names, proba = out.get("class_name"), out.get("proba")
        if names is None or proba is None or names.shape[0] != x.shape[0]:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' gave no class_name/proba", service=service.name
            )
        labels = [n.decode() if isinstance(n, bytes) else str(n) for n in names.reshape(-1)]
        scores = np.asarray(proba, dtype=np.float32).reshape(-1)
        if not np.isfinite(scores).all():
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return labels, scores

    async def model_ready(self, service: Service, timeout: float) -> bool:
        """Triton's per-model readiness; raises ``UpstreamError`` when Triton cannot be asked."""
        try:
            return await self._client(service).is_model_ready(service, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, service) from exc

    async def model_description(self, service: Service, timeout: float) -> dict[str, Any]:
        """Triton's metadata and config for the service's model."""
        client = self._client(service)
        try:
            metadata = await client.model_metadata(service, timeout)
            config = await client.model_config(service, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, service) from exc
        return {"metadata": metadata, "config": config}

    async def aclose(self) -> int:
        """Close every client; how many there were."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing must not stop the others from closing
                logger.exception("closing a Triton client failed")
        return len(clients)
