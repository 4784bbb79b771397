"""The one place that talks to Triton, through the async tritonclient.

One shared client per distinct Triton server (protocol, host:port), created on first use
inside the running event loop (the aio clients belong to one loop) and closed by ``aclose``.
What a model takes and gives (tensor names, datatypes, widths) is read from Triton the first
time a service is called (its ``Contract``) and read again after the model was unavailable or
refused a call, since it may come back, or have been reloaded in place, as another version with
other tensors; no tensor name is written here.
Every tritonclient, aiohttp and grpc exception is translated here into an
``UpstreamError`` subclass; nothing above this module sees a foreign exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from client_proxy import tracing
from client_proxy.config import Settings
from client_proxy.core.contracts import NUMPY_DTYPES, Contract, ContractMismatch
from client_proxy.core.services import Service, Target
from client_proxy.core.tensors import Inputs, row_count, signature, take_rows
from client_proxy.errors import (
    CallCancelled,
    ProxyError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from client_proxy.triton.grpc_lean import CallError, LeanChannel
from client_proxy.triton.replicas import Listener, Replica, ReplicaSet

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

#: Datatypes whose raw bytes are the numpy array's own (BYTES is length-prefixed, BF16 converted:
#: those go through tritonclient's ``InferInput``).
_RAW_DATATYPES = frozenset(
    ("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64")
)

#: The model refused the input (Triton's INVALID_ARG): over gRPC, and over HTTP.
_REJECTED = {"StatusCode.INVALID_ARGUMENT", "400"}
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

    inputs: tuple[tuple[str, str, Any], ...]
    """Per model input: its name, datatype and numpy dtype (None: sent as given)."""
    output_name: str
    """The output the service contributes; empty when the model does not say (see ``problem``)."""
    problem: str = ""


T = TypeVar("T")
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: A call that failed fast is sent to another replica only if this much time is left.
MIN_RETRY_S = 0.005

#: The pre-call check asks again for a contract it could not read (model unknown, Triton down)
#: after this long; the service's own call still tries every time.
CONTRACT_RETRY_S = 1.0


class _Client:
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
        if status in _REJECTED:
            return UpstreamRejected(
                f"{service.name}: the model refused the input: {message}", service=service.name
            )
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

    def __init__(self, settings: Settings, listener: Listener | None = None) -> None:
        self._settings = settings
        self._clients: dict[tuple[str, str], _Client] = {}
        self._contracts: dict[Service, Contract] = {}
        self._plans: dict[Service, _Plan] = {}
        #: When each contract was read.
        self._read_at: dict[Service, float] = {}
        #: Contracts being read: the requests of a cold start's burst share one read per service
        #: instead of each asking Triton (a 1,024-connection burst timed out hundreds of them).
        self._reading: dict[Service, asyncio.Future[Contract]] = {}
        #: Class names read from label files (``class_names``).
        self._labels: dict[Service, tuple[str, ...]] = {}
        #: When the pre-call check last failed to read a service's contract.
        self._unreadable: dict[Service, float] = {}
        self._replica_sets: dict[tuple[Target, ...], ReplicaSet] = {}
        self._listener = listener
        self._hedge = settings.default_hedge
        #: (service, input signature) that fitted its model -> the model's max_batch_size (0: any).
        self._fits: dict[tuple[Service, Hashable], int] = {}

    def _client(self, target: Target) -> _Client:
        client = self._clients.get(target.server)
        if client is None:
            settings = self._settings
            client = _Client(
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
                self._client(target)

    def replicas(self, service: Service) -> ReplicaSet:
        """The service's replicas and their health (shared by services with the same targets)."""
        key = service.targets
        found = self._replica_sets.get(key)
        if found is None:
            settings = self._settings
            found = self._replica_sets[key] = ReplicaSet(
                service.name,
                key,
                self._listener,
                failures_to_eject=settings.ejection_failures,
                base_ejection_s=settings.ejection_base_ms / 1000,
                max_ejection_s=settings.ejection_max_ms / 1000,
                balancer=settings.balancer,
                hedge_budget=settings.hedge_budget,
            )
        return found

    def hedging(self, service: Service) -> dict[str, object]:
        """The service's hedging: its policy, current delay, calls and hedges so far."""
        return self.replicas(service).hedging(service.hedge or self._hedge)

    async def _on_a_replica(
        self,
        service: Service,
        timeout: float,
        call: Callable[[_Client, Target, float], Awaitable[T]],
        operation: str = "infer",
    ) -> T:
        """``call`` on one replica, chosen by ``ReplicaSet.pick``. A fast failure (unreachable,
        model not ready) is sent once more, to another replica, if there is one and time is left;
        a late or failed call is not (inference is read-only, so sending it again is safe; a slow
        replica is what hedging is for: see ``_hedged``)."""
        replicas = self.replicas(service)
        replicas.calls += 1
        replicas.budget.deposit()
        delay = replicas.hedge_delay(service.hedge or self._hedge)
        if delay is not None and delay < timeout:
            return await self._hedged(service, replicas, timeout, delay, call, operation)
        started = time.monotonic()
        tried: list[Replica] = []
        while True:
            replica = replicas.pick(tried)
            tried.append(replica)
            replica.outstanding += 1
            sent = time.monotonic()
            budget = timeout - (sent - started)
            try:
                if tracing.ENABLED:
                    result = await self._traced(service, replica, operation, len(tried), False, call, budget)
                else:
                    result = await call(self._client(replica.target), replica.target, budget)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = translate(exc, service)
                left = timeout - (time.monotonic() - started)
                if not self._retry(service, replicas, replica, error, tried, left):
                    raise error from exc
            else:
                replicas.latencies.add(time.monotonic() - sent)
                replicas.succeeded(replica)
                return result
            finally:
                replica.outstanding -= 1

    def _traced(
        self,
        service: Service,
        replica: Replica,
        operation: str,
        attempt: int,
        hedge: bool,
        call: Callable[[_Client, Target, float], Awaitable[T]],
        budget: float,
    ) -> Awaitable[T]:
        """``call`` on ``replica`` in a span of its own (tracing on)."""
        target = replica.target
        return tracing.triton_call(
            lambda: call(self._client(target), target, budget),
            operation,
            service.name,
            target.model,
            target.url,
            target.protocol,
            attempt,
            hedge,
        )

    def _retry(
        self, service: Service, replicas: ReplicaSet, replica: Replica, error: UpstreamError,
        tried: list[Replica], left: float,
    ) -> bool:  # fmt: skip
        """Record a failed call; True when it is to be sent once more, to another replica."""
        if isinstance(error, UpstreamRejected):  # the replica answered: the input was at fault
            replicas.succeeded(replica, error.reason)
            return False
        fatal = isinstance(error, UpstreamUnavailable)
        replicas.failed(replica, error.reason, fatal, error.message)
        if fatal and len(tried) < min(len(replicas), 2) and left > MIN_RETRY_S:
            if self._listener is not None:
                self._listener.retry(service.name)
            logger.info("%s: %s; sent again to another replica", service.name, error.message)
            return True
        return False

    async def _hedged(
        self,
        service: Service,
        replicas: ReplicaSet,
        timeout: float,
        delay: float,
        call: Callable[[_Client, Target, float], Awaitable[T]],
        operation: str = "infer",
    ) -> T:
        """``call`` on one replica and, if it has not answered after ``delay``, on another one
        too: the first answer wins and the other call is cancelled. No hedge when the budget is
        spent, when no other replica may take calls, or when the deadline leaves less than the
        service's median latency (a hedge that cannot finish in time is only load). A fast
        failure is sent again as in ``_on_a_replica``."""
        started = time.monotonic()
        deadline = started + timeout
        pending: dict[asyncio.Task[T], tuple[Replica, float, bool]] = {}
        tried: list[Replica] = []

        def send(replica: Replica, hedge: bool) -> None:
            tried.append(replica)
            replica.outstanding += 1
            now = time.monotonic()
            if tracing.ENABLED:
                started_call = self._traced(
                    service, replica, operation, len(tried), hedge, call, deadline - now
                )
            else:
                started_call = call(self._client(replica.target), replica.target, deadline - now)
            task = asyncio.ensure_future(started_call)
            pending[task] = (replica, now, hedge)

        send(replicas.pick(), False)
        hedge_at: float | None = started + delay
        error: UpstreamError | None = None
        cause: BaseException | None = None
        try:
            while pending:
                wait = None if hedge_at is None else max(hedge_at - time.monotonic(), 0.0)
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedge_at = None
                    self._hedge_one(service, replicas, tried, deadline, send)
                    continue
                for task in done:
                    replica, sent, hedge = pending.pop(task)
                    replica.outstanding -= 1
                    exc = task.exception()
                    if exc is None:
                        replicas.latencies.add(time.monotonic() - sent)
                        replicas.succeeded(replica)
                        if hedge:
                            replicas.hedges_won += 1
                            if self._listener is not None:
                                self._listener.hedge(service.name, "won")
                        return task.result()
                    error, cause = translate(exc, service), exc
                    left = deadline - time.monotonic()
                    if self._retry(service, replicas, replica, error, tried, left) and not pending:
                        other = replicas.pick(tried)
                        send(other, False)
            assert error is not None
            raise error from cause
        finally:
            for task, (replica, _, _) in pending.items():
                replica.outstanding -= 1
                if task.done():
                    if not task.cancelled():
                        task.exception()  # retrieved: a loser's failure is no one's error
                else:
                    task.cancel()
                    replicas.cancelled(replica)

    def _hedge_one(
        self,
        service: Service,
        replicas: ReplicaSet,
        tried: list[Replica],
        deadline: float,
        send: Callable[[Replica, bool], None],
    ) -> None:
        """The hedge delay passed with no answer: send the call to another replica, if allowed."""
        other = replicas.other(tried)
        median = replicas.latencies.percentile(50) or 0.0
        if other is None:
            outcome = "no_replica"
        elif deadline - time.monotonic() < max(median, MIN_RETRY_S):
            outcome = "deadline"
        elif not replicas.budget.take():
            outcome = "budget"
        else:
            outcome = "sent"
            replicas.hedges += 1
            send(other, True)
        if self._listener is not None:
            self._listener.hedge(service.name, outcome)

    async def contract(self, service: Service, timeout: float) -> Contract:
        """What ``service``'s model takes and gives, read from Triton once and then kept."""
        contract = self._contracts.get(service)
        if contract is not None:
            return contract
        reading = self._reading.get(service)
        if reading is None:
            reading = self._reading[service] = asyncio.ensure_future(self._read_contract(service, timeout))
            reading.add_done_callback(lambda done: self._read(service, done))
        return await asyncio.shield(reading)  # a caller that gives up leaves the read to the others

    async def _read_contract(self, service: Service, timeout: float) -> Contract:
        described = await self.model_description(service, timeout)
        contract = Contract.from_triton(described["metadata"], described["config"])
        self._contracts[service] = contract
        self._read_at[service] = time.monotonic()
        return contract

    def _read(self, service: Service, done: asyncio.Future[Contract]) -> None:
        self._reading.pop(service, None)
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have given up already

    def known_contract(self, service: Service) -> Contract | None:
        """The contract already read, if any (no call to Triton)."""
        return self._contracts.get(service)

    async def class_names(self, service: Service, x: Inputs, timeout: float) -> tuple[str, ...]:
        """The classes the service's output scores, in column order: its config's ``class_names``
        parameter, else its output's label file, read once with Triton's classification
        extension on one row of ``x`` (an input that fits the model); empty when it has neither."""
        contract = self._contracts.get(service) or await self.contract(service, timeout)
        if contract.class_names:
            return contract.class_names
        known = self._labels.get(service)
        if known is not None:
            return known
        output = contract.output(service.name, service.output)
        if not output.label_filename:
            return ()
        count = int(np.prod(output.shape)) if output.shape and min(output.shape) > 0 else 0
        if count == 0:
            return ()
        try:
            plan = self._plans.get(service) or await self._plan(service, timeout)
            tensors = self._tensors(service, plan, take_rows(x, np.arange(1)))
        except Exception as exc:
            raise translate(exc, service) from exc

        async def classify(client: _Client, target: Target, budget: float) -> dict[str, Any]:
            return await client.infer(target, tensors, "", budget, (plan.output_name,), class_count=count)

        result = await self._on_a_replica(service, timeout, classify, "classify")
        labels = {}
        for entry in np.asarray(result[plan.output_name]).reshape(-1):
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            parts = text.split(":", 2)  # "score:index:label"
            if len(parts) == 3 and parts[1].isdigit() and parts[2]:
                labels[int(parts[1])] = parts[2]
        names = tuple(labels.get(i, "") for i in range(count))
        if not all(names):
            return ()  # a label file shorter than the output: no names rather than wrong ones
        self._labels[service] = names
        return names

    def _forget(self, service: Service) -> None:
        """The contract may be stale: read it again before the next call."""
        self._contracts.pop(service, None)
        self._read_at.pop(service, None)
        self._labels.pop(service, None)
        self._plans.pop(service, None)
        self._fits = {fit: limit for fit, limit in self._fits.items() if fit[0] != service}

    def _after_failure(self, service: Service, error: UpstreamError) -> None:
        """Unloaded, or Triton gone: the model may come back as another version, so its contract
        is read again. Refused for another reason: it may have been reloaded in place with other
        tensors (Triton swaps versions without a gap), so the contract is read again too, at most
        once per ``CONTRACT_RETRY_S`` (a model that keeps failing costs no extra call per request).
        A timeout says nothing about the contract."""
        stale = time.monotonic() - self._read_at.get(service, -1e9) >= CONTRACT_RETRY_S
        if isinstance(error, UpstreamUnavailable) or (
            stale and not isinstance(error, UpstreamTimeout | CallCancelled)
        ):
            self._forget(service)

    async def ensure_fit(self, services: list[Service], x: Inputs, timeout: float) -> None:
        """Refuse (``ContractMismatch``, 422) an input that does not fit a service's model, before
        any inference call. Contracts not read yet are read now, concurrently and within
        ``timeout``; a service whose contract cannot be read now is left to fail (or not) on its
        own call."""
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
        kind = signature(x)
        for service in services:
            contract = self._contracts.get(service)
            if contract is None:
                continue
            # Each raises ContractMismatch naming the service.
            if isinstance(x, np.ndarray):
                contract.input_rows(service.name, x)
            else:
                contract.input_tensors(service.name, x)
            self._fits[(service, kind)] = contract.max_batch_size if contract.batched else 0

    def fits(self, services: list[Service], x: Inputs) -> bool:
        """True when inputs like this one already fitted every service's model: the hot path,
        with no need for ``ensure_fit``."""
        kind, n = signature(x), row_count(x)
        for service in services:
            limit = self._fits.get((service, kind))
            if limit is None or (limit and n > limit):
                return False
        return True

    async def _plan(self, service: Service, timeout: float) -> _Plan:
        contract = self._contracts.get(service) or await self.contract(service, timeout)
        try:
            output, problem = contract.output(service.name, service.output).name, ""
        except ContractMismatch as exc:  # several outputs, none named: only a pass-through call works
            output, problem = "", exc.message
        inputs = tuple((t.name, t.datatype, NUMPY_DTYPES.get(t.datatype)) for t in contract.inputs)
        plan = self._plans[service] = _Plan(inputs, output, problem)
        return plan

    def _tensors(self, service: Service, plan: _Plan, x: Inputs) -> list[tuple[str, NDArray[Any], str]]:
        """The input tensors of one call, each in the model's datatype."""
        if isinstance(x, np.ndarray):
            if len(plan.inputs) != 1:
                names = ", ".join(name for name, _, _ in plan.inputs)
                raise ContractMismatch(
                    f"{service.name}: model '{service.model}' takes inputs {names}: send named tensors"
                )
            ((name, datatype, dtype),) = plan.inputs
            return [(name, x if dtype is None or x.dtype == dtype else x.astype(dtype), datatype)]
        tensors = []
        for name, datatype, dtype in plan.inputs:
            if name not in x:
                raise ContractMismatch(
                    f"{service.name}: model '{service.model}' needs input '{name}', not sent"
                )
            array = x[name]
            tensors.append(
                (name, array if dtype is None or array.dtype == dtype else array.astype(dtype), datatype)
            )
        return tensors

    async def infer(self, service: Service, x: Inputs, request_id: str, timeout: float) -> NDArray[Any]:
        """``service``'s output for the input ``x``, one Triton call, in the model's own tensors."""
        try:
            plan = self._plans.get(service) or await self._plan(service, timeout)
            if plan.problem:
                raise ContractMismatch(plan.problem)
            tensors = self._tensors(service, plan, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = translate(exc, service)
            self._after_failure(service, error)
            raise error from exc

        async def call(client: _Client, target: Target, budget: float) -> Any:
            return (await client.infer(target, tensors, request_id, budget, (plan.output_name,)))[
                plan.output_name
            ]

        try:
            output = await self._on_a_replica(service, timeout, call)
        except UpstreamError as error:
            self._after_failure(service, error)
            raise
        rows = row_count(x)
        if output is None or output.shape[0] != rows:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned no output of {rows} rows",
                service=service.name,
            )
        output = np.asarray(output, dtype=np.float32)
        if not np.isfinite(output).all():
            # Never pass NaN on (it would reach the client as null): the service failed these rows.
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return output

    async def call(
        self, service: Service, x: Inputs, request_id: str, timeout: float, outputs: tuple[str, ...]
    ) -> dict[str, NDArray[Any]]:
        """The model's ``outputs`` for ``x``, as Triton gives them (a pass-through call)."""
        try:
            plan = self._plans.get(service) or await self._plan(service, timeout)
            tensors = self._tensors(service, plan, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = translate(exc, service)
            self._after_failure(service, error)
            raise error from exc

        async def call(client: _Client, target: Target, budget: float) -> dict[str, Any]:
            return await client.infer(target, tensors, request_id, budget, outputs)

        try:
            result = await self._on_a_replica(service, timeout, call)
        except UpstreamError as error:
            self._after_failure(service, error)
            raise
        missing = [name for name, value in result.items() if value is None]
        if missing:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' gave no {', '.join(missing)}", service=service.name
            )
        return result

    async def ensemble_rows(
        self, service: Service, x: Inputs, request_id: str, timeout: float
    ) -> NDArray[Any]:
        """``infer_ensemble``'s answer as one array, a row ``[label, probability]`` per input row
        (object dtype): the shape a ``Coalescer`` splits among the requests of a batched call."""
        assert isinstance(x, np.ndarray)  # the seed's rows: the ensemble takes one input
        names, proba = await self.infer_ensemble(service, x, request_id, timeout)
        rows = np.empty((len(names), 2), dtype=object)
        rows[:, 0] = names
        rows[:, 1] = proba
        return rows

    async def infer_ensemble(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float
    ) -> tuple[list[str], NDArray[np.float32]]:
        """A server-side ensemble's label and its probability per row, in one call. Read from
        its contract: the label is its one BYTES output, the probability its one floating-point
        output of one value per row (``class_name`` and ``proba`` for ``iris_ensemble``)."""
        try:
            contract = await self.contract(service, timeout)
            label, proba = _label_outputs(service, contract)
            plan = self._plans.get(service) or await self._plan(replace(service, output=label), timeout)
            self._plans[service] = plan
            tensors = self._tensors(service, plan, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = translate(exc, service)
            self._after_failure(service, error)
            raise error from exc

        async def call(client: _Client, target: Target, budget: float) -> dict[str, Any]:
            return await client.infer(target, tensors, request_id, budget, (label, proba))

        try:
            out = await self._on_a_replica(service, timeout, call)
        except UpstreamError as error:
            self._after_failure(service, error)
            raise
        names, scores = out.get(label), out.get(proba)
        if names is None or scores is None or names.shape[0] != x.shape[0]:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' gave no {label}/{proba}", service=service.name
            )
        labels = [n.decode() if isinstance(n, bytes) else str(n) for n in names.reshape(-1)]
        values = np.asarray(scores, dtype=np.float32).reshape(-1)
        if not np.isfinite(values).all():
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return labels, values

    async def model_ready(self, service: Service, timeout: float) -> bool:
        """Triton's per-model readiness, on any replica; raises ``UpstreamError`` when no replica's
        Triton can be asked."""
        answers = await asyncio.gather(
            *(self.replica_ready(service, t, timeout) for t in service.targets), return_exceptions=True
        )
        if any(a is True for a in answers):
            return True
        errors = [a for a in answers if isinstance(a, UpstreamError)]
        if len(errors) == len(answers):
            raise errors[0]
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
                raise answer
        return False

    async def replica_ready(self, service: Service, target: Target, timeout: float) -> bool:
        """One replica's readiness in its Triton."""
        try:
            return await self._client(target).is_model_ready(target, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, service) from exc

    async def model_description(self, service: Service, timeout: float) -> dict[str, Any]:
        """Triton's metadata and config for the service's model (from one replica)."""

        async def describe(client: _Client, target: Target, budget: float) -> dict[str, Any]:
            return {
                "metadata": await client.model_metadata(target, budget),
                "config": await client.model_config(target, budget),
            }

        return await self._on_a_replica(service, timeout, describe, "metadata")

    async def aclose(self) -> int:
        """Close every client; how many there were."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing must not stop the others from closing
                logger.exception("closing a Triton client failed")
        return len(clients)


def _as(array: NDArray[Any], dtype: Any) -> NDArray[Any]:
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def _label_outputs(service: Service, contract: Contract) -> tuple[str, str]:
    """An ensemble's label output (its one BYTES output) and probability output (its one
    floating-point output of one value per row)."""
    labels = [t.name for t in contract.outputs if t.datatype == "BYTES"]
    probas = [
        t.name for t in contract.outputs if t.datatype.startswith("FP") and int(np.prod(t.shape or (1,))) == 1
    ]
    if len(labels) != 1 or len(probas) != 1:
        raise UpstreamError(
            f"{service.name}: model '{service.model}' needs one BYTES output (the label) and one "
            f"floating-point output of one value per row (its probability); it has "
            f"{', '.join(t.describe(contract.batched) for t in contract.outputs)}",
            service=service.name,
        )
    return labels[0], probas[0]
