"""A unary gRPC call as the lean server (``grpc_wire``) gives it to its handler: the ``Method``,
the ``Context`` (deadline, trace metadata, ``abort``), and the rules for what a call carries: its
status trailers, its ``grpc-timeout``, and RFC 9113's header-field rules."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from client_proxy.http2 import literal

#: Longest grpc-message sent back (the rest is cut), so that a trailer block fits one frame.
_MAX_DETAILS = 4096

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def percent_encoded(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but ``%`` as is, every other byte as ``%XX``."""
    raw = text.encode()[:_MAX_DETAILS]
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def status_block(code: grpc.StatusCode, details: str) -> bytes:
    """The trailers of a call that ends with ``code``."""
    block = literal(b"grpc-status", str(code.value[0]).encode())
    return block + literal(b"grpc-message", percent_encoded(details)) if details else block


#: The W3C trace context headers, kept for the handler (``Context.invocation_metadata``).
TRACE_HEADERS = frozenset((b"traceparent", b"tracestate", b"baggage"))


#: Header fields that are HTTP/1.1's connection-specific ones, malformed in HTTP/2 (RFC 9113 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)


def field_problem(name: bytes, value: bytes) -> str:
    """Why a regular header field makes a request malformed (RFC 9113 8.2), or ``""``."""
    if not name or name[:1] == b":":
        return f"pseudo-header {name!r} unknown, repeated or out of place"
    if name != name.lower():
        return f"field name {name!r} not in lowercase"
    if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
        return f"connection-specific field {name!r}"
    return ""


def malformed_trailers(headers: list[tuple[bytes, bytes]]) -> str:
    """Why a request's trailers are malformed (no pseudo-header; RFC 9113 8.1), or ``""``."""
    for name, value in headers:
        problem = field_problem(name, value)
        if problem:
            return problem
    return ""


def grpc_timeout(value: bytes) -> float:
    """``grpc-timeout`` (up to 8 digits and a unit) in seconds."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        raise ValueError(value)
    return int(digits) * unit


class Abort(Exception):
    """A call ended with a status code other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    """What a handler may ask of its call, as grpcio's ``ServicerContext`` names it."""

    __slots__ = ("_deadline", "_metadata")

    def __init__(self, deadline: float | None, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._deadline = deadline
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata the server keeps (``LeanGrpcServer.kept``: the trace context, and what
        chooses an experiment's variant)."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline; None if it set none."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Abort(code, details)


Handler = Callable[[Any, Context], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    """A unary method: the protobuf class of its request, and the handler that answers it."""

    request_type: Any
    handler: Handler
