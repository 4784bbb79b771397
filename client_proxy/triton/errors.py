"""Foreign exceptions raised while calling Triton, translated into the project's ``UpstreamError``
subclasses: nothing above the Triton side sees a tritonclient, aiohttp or grpc exception.

What failed is read from the status code Triton (or the transport) gave, never from the
message's text: a gRPC status over gRPC, an HTTP status over HTTP, as tritonclient reports them
in ``InferenceServerException.status()`` (``"StatusCode.NOT_FOUND"``, ``"404"``). Triton 24.10
answers an unknown or unloaded model with NOT_FOUND / 404, an input that does not fit with
INVALID_ARGUMENT / 400; a server that cannot be reached is UNAVAILABLE over gRPC and an
``aiohttp`` or ``OSError`` over HTTP.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
from tritonclient.utils import InferenceServerException

from client_proxy.core.services import Service
from client_proxy.errors import (
    ProxyError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

logger = logging.getLogger("client_proxy.triton.gateway")

#: What each status means, over gRPC and over HTTP.
REJECTED = frozenset(("StatusCode.INVALID_ARGUMENT", "400"))
"""The model refused the input: the replica answered, the request was at fault."""
LATE = frozenset(("StatusCode.DEADLINE_EXCEEDED", "504", "408"))
NO_MODEL = frozenset(("StatusCode.NOT_FOUND", "404"))
"""The model is unknown to this Triton, or unloaded: another replica may have it."""
UNREACHABLE = frozenset(("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "503", "502"))
"""The server cannot take the call (down, shutting down, overloaded, model not ready)."""


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
        if status in LATE:
            return UpstreamTimeout(f"{service.name}: no answer from {where} in time", service=service.name)
        if status in REJECTED:
            message = str(exc.message() or exc)
            return UpstreamRejected(
                f"{service.name}: the model refused the input: {message}", service=service.name
            )
        if status in NO_MODEL:
            return UpstreamUnavailable(
                f"{service.name}: model '{service.model}' is not available on {where}", service=service.name
            )
        if status in UNREACHABLE:
            # The transport's message may name the server's address: not repeated here.
            return UpstreamUnavailable(
                f"{service.name}: {where} is unreachable or not ready", service=service.name
            )
        return UpstreamError(
            f"{service.name}: {where} failed the request ({status or 'no status'}): {exc.message() or exc}",
            service=service.name,
        )
    if isinstance(exc, grpc.RpcError | aiohttp.ClientError | OSError):
        return UpstreamUnavailable(
            f"{service.name}: {where} is unreachable ({type(exc).__name__})", service=service.name
        )
    return UpstreamError(
        f"{service.name}: unexpected error calling {where}: {type(exc).__name__}", service=service.name
    )
