"""HTTP/2 (RFC 9113) over cleartext TCP, as much of it as unary gRPC calls need, for both ends:
the proxy's gRPC door (``client_proxy.api.grpc_wire``, a server) and its inference calls to
Triton (``client_proxy.triton.grpc_lean``, a client).

Why the proxy speaks HTTP/2 itself: grpcio's asyncio server and client cost a few tenths of a
millisecond of CPU per call on the project's machine (a poller thread beside the event loop, a
completion queue, several Cython coroutines per call), as much as everything else the proxy
does per request. Frames parsed with ``struct`` in the event loop's protocol callbacks, and
header blocks sent as fixed bytes, cost a fraction of that. Header blocks are decoded by the
``hpack`` package (RFC 7541).

``Connection`` holds what both ends share: the frame loop, SETTINGS, PING, flow control both ways
(``send`` holds back what the peer's windows do not allow yet), CONTINUATION and padding, GOAWAY
on a connection error. A subclass handles a stream's HEADERS, DATA and RST_STREAM, and the
peer's GOAWAY.

A server's connection is also guarded against its peer (``Limits``), as the hardened HTTP/2
servers are (nghttp2, Go's x/net/http2, Envoy, grpc after CVE-2023-44487): budgets for frames
that carry no call and for resets, answered with GOAWAY ENHANCE_YOUR_CALM when spent; a bounded
number of frames handled per turn of the event loop; the connection's receive window given back
as requests are consumed rather than as they arrive, so that what it buffers is bounded; and
flow-control work in time independent of the number of streams (a stream's send window is kept
relative to the peer's initial window, and streams that wait for their own window are set apart
from those that wait for the connection's).
"""

from __future__ import annotations

from client_proxy.http2.connection import Connection
from client_proxy.http2.frames import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONNECTION_WINDOW,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME,
    FRAME_SIZE_ERROR,
    GOAWAY,
    GOAWAY_HEAD,
    HEADERS,
    INTERNAL_ERROR,
    LINGER_S,
    MAX_FRAME,
    MAX_HEADER_LIST,
    MAX_WINDOW,
    MESSAGE,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    STREAM_CLOSED,
    STREAM_WINDOW,
    U32,
    WINDOW_CREDIT_CAP,
    WINDOW_UPDATE,
    WINDOW_UPDATES_PER_DATA,
    ConnectionFailure,
    Limits,
    Stream,
    frame,
    integer,
    literal,
    literal_indexed_name,
    only_indexed,
    string,
    unpadded,
)

__all__ = [
    "ACK",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECTION_WINDOW",
    "CONTINUATION",
    "DATA",
    "DEFAULT_WINDOW",
    "END_HEADERS",
    "END_STREAM",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME",
    "FRAME_SIZE_ERROR",
    "GOAWAY",
    "GOAWAY_HEAD",
    "HEADERS",
    "INTERNAL_ERROR",
    "LINGER_S",
    "MAX_FRAME",
    "MAX_HEADER_LIST",
    "MAX_WINDOW",
    "MESSAGE",
    "NO_ERROR",
    "PADDED",
    "PING",
    "PREFACE",
    "PRIORITY",
    "PRIORITY_FLAG",
    "PROTOCOL_ERROR",
    "PUSH_PROMISE",
    "REFUSED_STREAM",
    "RST_STREAM",
    "SETTING",
    "SETTINGS",
    "SETTINGS_ENABLE_PUSH",
    "SETTINGS_HEADER_TABLE_SIZE",
    "SETTINGS_INITIAL_WINDOW_SIZE",
    "SETTINGS_MAX_CONCURRENT_STREAMS",
    "SETTINGS_MAX_FRAME_SIZE",
    "SETTINGS_MAX_HEADER_LIST_SIZE",
    "STREAM_CLOSED",
    "STREAM_WINDOW",
    "U32",
    "WINDOW_CREDIT_CAP",
    "WINDOW_UPDATE",
    "WINDOW_UPDATES_PER_DATA",
    "Connection",
    "ConnectionFailure",
    "Limits",
    "Stream",
    "frame",
    "integer",
    "literal",
    "literal_indexed_name",
    "only_indexed",
    "string",
    "unpadded",
]
