"""A lean gRPC client for the proxy's inference calls to Triton: unary calls over one HTTP/2
connection per server (``client_proxy.http2``), run by the event loop's protocol callbacks.

Why: grpcio's asyncio client costs about 0.6 ms of CPU for the three calls of one fan-out at
concurrency 1 on the project's machine (each call a Cython coroutine, a completion queue and a
poller thread that wakes the event loop), and adds that to every request's latency; the same
three calls cost about 0.2 ms here, written in one go and answered in the same callback that
reads them. Only ``ModelInfer`` goes this way; the other calls (readiness, metadata, config) are
rare and stay on tritonclient's grpcio client.

A call given up on (a hedge that lost, a fan-out that stopped, a client gone, its deadline) is
abandoned, not cancelled: its answer is dropped when it comes. Cancelling sends Triton an
RST_STREAM, which Triton 24.10's gRPC frontend can answer with a segfault (server#7368, fixed
after that release); for the same reason no ``grpc-timeout`` goes with a call (the deadline
would make Triton cancel it). With ``cancel``, both are sent, for a Triton with the fix.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import grpc

from client_proxy.http2 import (
    CANCEL,
    END_HEADERS,
    HEADERS,
    MESSAGE,
    PING,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS_ENABLE_PUSH,
    U32,
    Connection,
    Stream,
    frame,
    literal,
    literal_indexed_name,
)

#: How long a connection is given to open before a call fails as unreachable (at most the call's own time).
CONNECT_TIMEOUT_S = 5.0
#: A connection that answers nothing, not even a PING, for this long after a call timed out is
#: closed (a server gone without a word); the next call opens a new one.
SILENCE_TIMEOUT_S = 5.0
_LAST_STREAM_ID = 2**31 - 1
#: HTTP statuses as gRPC status codes, when a response is not gRPC (the gRPC over HTTP/2 spec).
_HTTP_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CallError(Exception):
    """A call that did not end with OK: its gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Call(Stream):
    __slots__ = ("data", "future", "headers", "status")

    def __init__(self, stream_id: int, future: asyncio.Future[bytes]) -> None:
        super().__init__(stream_id)
        self.future = future
        self.data = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.status = b""


class _ClientConnection(Connection):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        super().__init__()
        self.streams: dict[int, _Call] = {}
        self.next_id = 1
        self.lost = lost
        self.last_heard = time.monotonic()
        self.silence: asyncio.TimerHandle | None = None
        self._flushing = False

    def usable(self) -> bool:
        return not (self.closed or self.going_away) and self.next_id < _LAST_STREAM_ID

    def settings(self) -> list[tuple[int, int]]:
        return [(SETTINGS_ENABLE_PUSH, 0), *super().settings()]

    def start(self, block: bytes, message: bytes, future: asyncio.Future[bytes]) -> _Call:
        stream = _Call(self.next_id, future)
        self.next_id += 2
        self.last_stream = stream.id
        self.streams[stream.id] = stream
        self.out.append(frame(HEADERS, END_HEADERS, stream.id, block))
        self.send(stream, MESSAGE.pack(0, len(message)) + message, None)
        if not self._flushing:
            # The calls one fan-out starts in this turn of the event loop leave in one write.
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush_soon)
        return stream

    def _flush_soon(self) -> None:
        self._flushing = False
        self.flush()

    @property
    def abandoned(self) -> int:
        return sum(stream.future.done() for stream in self.streams.values())

    def forget(self, stream: _Call, cancel: bool) -> None:
        """The caller no longer waits: with ``cancel`` the server is told (RST_STREAM), else its
        answer is read when it comes, and dropped."""
        if not stream.future.done():
            stream.future.cancel()
        if cancel and self.streams.pop(stream.id, None) is not None and not self.closed:
            self.unblock(stream.id)
            self.out.append(frame(RST_STREAM, 0, stream.id, U32.pack(CANCEL)))
            self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        if self.silence is not None:
            self.silence.cancel()
            self.silence = None
        super().data_received(data)

    def suspect(self) -> None:
        """A call timed out: if the server has said nothing since, ask it (PING), and close the
        connection if nothing comes back."""
        if self.closed or self.silence is not None:
            return
        self.out.append(frame(PING, 0, 0, b"\0" * 8))
        self.flush()
        self.silence = asyncio.get_running_loop().call_later(SILENCE_TIMEOUT_S, self._silent)

    def _silent(self) -> None:
        self.silence = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def on_headers(self, stream_id: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a call forgotten (cancelled): its answer is not needed
        stream.headers.update(headers)
        if not stream.status:
            stream.status = stream.headers.get(b":status", b"")
        if end_stream:
            self._end(stream)

    def on_data(self, stream: _Call, data: bytes, end_stream: bool) -> None:
        stream.data += data
        if end_stream:
            self._end(stream)

    def _end(self, stream: _Call) -> None:
        self.streams.pop(stream.id, None)
        self.unblock(stream.id)
        self.close_if_done()
        future = stream.future
        if future.done():
            return  # abandoned: the answer is dropped
        headers = stream.headers
        if stream.status != b"200":
            http = int(stream.status) if stream.status.isdigit() else 0
            code = _HTTP_CODES.get(http, grpc.StatusCode.UNKNOWN)
            future.set_exception(CallError(code, f"HTTP status {stream.status.decode(errors='replace')}"))
            return
        status = headers.get(b"grpc-status")
        if status is None:
            future.set_exception(CallError(grpc.StatusCode.INTERNAL, "the answer has no grpc-status"))
            return
        if status != b"0":
            code = _CODES.get(int(status) if status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
            details = urllib.parse.unquote(headers.get(b"grpc-message", b"").decode(errors="replace"))
            future.set_exception(CallError(code, details))
            return
        data = stream.data
        if len(data) < MESSAGE.size:
            future.set_exception(CallError(grpc.StatusCode.INTERNAL, "an answer without its message"))
            return
        compressed, size = MESSAGE.unpack_from(data)
        if compressed or MESSAGE.size + size != len(data):
            future.set_exception(CallError(grpc.StatusCode.INTERNAL, "not one uncompressed answer message"))
            return
        future.set_result(bytes(data[MESSAGE.size :]))

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            # REFUSED_STREAM: the server did not start it (safe to send again); others: it gave up.
            status = grpc.StatusCode.UNAVAILABLE if code == REFUSED_STREAM else grpc.StatusCode.INTERNAL
            stream.future.set_exception(CallError(status, f"the server reset the call (HTTP/2 error {code})"))
        self.close_if_done()

    def on_goaway(self, last_stream: int, code: int, debug: bytes) -> None:
        # Calls above last_stream were not started by the server: they fail as unavailable (to be
        # sent again elsewhere); those below are still answered. New calls take a new connection.
        self.going_away = True
        for stream_id in [s for s in self.streams if s > last_stream]:
            self.on_reset(stream_id, REFUSED_STREAM)
        self.close_if_done()

    def on_lost(self, exc: Exception | None) -> None:
        if self.silence is not None:
            self.silence.cancel()
            self.silence = None
        streams, self.streams = self.streams, {}
        reason = f"the connection to the server was lost ({exc or 'closed'})"
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(CallError(grpc.StatusCode.UNAVAILABLE, reason))
        if not self.lost.done():
            self.lost.set_result(None)


class LeanChannel:
    """Unary calls to one gRPC server (``host:port``) over one HTTP/2 connection, opened on the
    first call and again after it is lost or the server sends GOAWAY."""

    def __init__(self, address: str, cancel: bool = False) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]") or "localhost", int(port)
        self._authority = address.encode()
        self._cancel = cancel
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Future[_ClientConnection] | None = None
        self._blocks: dict[str, bytes] = {}
        self._closing: list[asyncio.Future[None]] = []

    @property
    def abandoned(self) -> int:
        """Calls given up on whose answers have not come yet."""
        connection = self._connection
        return connection.abandoned if connection is not None else 0

    def _block(self, path: str, timeout: float) -> bytes:
        block = self._blocks.get(path)
        if block is None:
            block = self._blocks[path] = (
                b"\x83\x86"  # :method POST, :scheme http (static table entries 3 and 6)
                + literal_indexed_name(4, path.encode())  # :path
                + literal_indexed_name(1, self._authority)  # :authority
                + literal_indexed_name(31, b"application/grpc")  # content-type
                + literal(b"te", b"trailers")
            )
        if self._cancel:  # the deadline too, in milliseconds (grpc-timeout's ``m`` unit)
            return block + literal(b"grpc-timeout", b"%dm" % max(int(timeout * 1000), 1))
        return block

    async def _open(self, timeout: float) -> _ClientConnection:
        connection = self._connection
        if connection is not None and connection.usable():
            return connection
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            # Forgotten however it ends (cancelled before its first step too), and a failure no
            # caller waited for retrieved.
            self._connecting.add_done_callback(self._connected)
        connecting = self._connecting
        try:
            return await asyncio.wait_for(asyncio.shield(connecting), min(timeout, CONNECT_TIMEOUT_S))
        except TimeoutError:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "failed to connect to the server in time") from None

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            lost = loop.create_future()
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(lost), self._host, self._port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"failed to connect to the server: {exc}") from None
        old, self._connection = self._connection, connection
        if old is not None and not old.closed and not old.streams:
            old.close()
        self._closing = [f for f in self._closing if not f.done()] + [lost]
        return connection

    def _connected(self, connecting: asyncio.Future[_ClientConnection]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        _retrieved(connecting)

    async def unary(
        self, path: str, message: bytes, timeout: float, metadata: dict[str, str] | None = None
    ) -> bytes:
        """The answer's message to ``message`` sent to ``path``, with ``metadata`` (such as
        ``traceparent``) as literal headers; ``CallError`` otherwise (DEADLINE_EXCEEDED after
        ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = await self._open(timeout)
        future: asyncio.Future[bytes] = loop.create_future()
        block = self._block(path, timeout)
        if metadata:
            block += b"".join(literal(k.lower().encode(), v.encode()) for k, v in metadata.items())
        sent = time.monotonic()
        stream = connection.start(block, message, future)
        timer = loop.call_at(deadline, _expire, future)
        try:
            return await future
        except asyncio.CancelledError:
            connection.forget(stream, self._cancel)
            raise
        except CallError as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                connection.forget(stream, self._cancel)
                if connection.last_heard <= sent:  # not a word from the server since the call left
                    connection.suspect()
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        for lost in self._closing:
            if not lost.done():
                await asyncio.wait([lost], timeout=1.0)
        self._closing = []


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
