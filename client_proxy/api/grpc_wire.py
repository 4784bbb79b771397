"""A lean gRPC server for unary calls: HTTP/2 (RFC 9113) over cleartext TCP with prior knowledge,
as gRPC clients speak it, run by the event loop's own protocol callbacks; header blocks are
decoded by the ``hpack`` package (RFC 7541).

Why not grpcio's server: it costs about 0.28 ms of CPU per call on this project's 2-core machine
before the handler does anything (perf_analyzer at 16 concurrent calls on an empty ``ModelInfer``;
a poller thread beside the event loop, a completion queue, several Cython coroutines per call),
as much as the whole fan-out behind it. The same empty handler costs 0.12-0.17 ms over the ``h2``
package's state machine, and about 0.04 ms here: a request's frames are parsed with ``struct``
and its answer (three frames, headers from fixed HPACK bytes) leaves in one write.

Served: unary-unary methods, each a protobuf request type and an async handler
``(request, context) -> response``; the client's ``grpc-timeout``; requests compressed with
``gzip`` or ``deflate``; flow control both ways; PING; RST_STREAM (cancels the handler); GOAWAY
both ways, with a graceful stop. Not served: streaming calls, TLS, HTTP/1.1, answers compressed.
``PROXY_GRPC_SERVER=grpcio`` serves the same methods with grpcio's server instead.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
import hpack
from google.protobuf.message import DecodeError

logger = logging.getLogger("client_proxy.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A frame header: the 24-bit length as its high byte and low 16 bits, type, flags, stream id.
_FRAME = struct.Struct(">BHBBI")
#: A gRPC message's prefix: compressed flag, length.
_MESSAGE = struct.Struct(">BI")
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

#: Streams one connection may have open at once (more are refused, and the client retries them).
MAX_STREAMS = 1024
#: How much a client may send on one stream, and on the connection, before the server's
#: WINDOW_UPDATE (sent when half is used): wide, so that a request needs none.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
#: The largest header list a request may carry (decoded), as grpcio's hard limit.
MAX_HEADER_LIST = 16 * 1024
#: The largest frame the server accepts (HTTP/2's default, not raised).
MAX_FRAME = 16_384
_MAX_WINDOW = 2**31 - 1
#: Longest grpc-message sent back (the rest is cut), so that a trailer block fits one frame.
_MAX_DETAILS = 4096

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def _integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a ``prefix_bits`` prefix, the first byte's upper bits
    being ``flags``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    encoded = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _string(value: bytes) -> bytes:
    return _integer(len(value), 7) + value


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal never added to the dynamic table, so every block the server sends is
    fixed bytes and no table has to be kept in step with the client's decoder."""
    return b"\x00" + _string(name) + _string(value)


#: ``:status: 200`` (static table entry 8) and ``content-type: application/grpc`` (a literal with
#: the static table's name 31).
RESPONSE_HEADERS = b"\x88" + _integer(31, 4) + _string(b"application/grpc")
OK_TRAILERS = _literal(b"grpc-status", b"0")


def _percent_encoded(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but ``%`` as is, every other byte as ``%XX``."""
    raw = text.encode()[:_MAX_DETAILS]
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def status_block(code: grpc.StatusCode, details: str) -> bytes:
    """The trailers of a call that ends with ``code``."""
    block = _literal(b"grpc-status", str(code.value[0]).encode())
    return block + _literal(b"grpc-message", _percent_encoded(details)) if details else block


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _FRAME.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def _grpc_timeout(value: bytes) -> float:
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

    __slots__ = ("_deadline",)

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

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


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = (
        "body",
        "deadline",
        "encoding",
        "ended",
        "id",
        "method",
        "pending",
        "send_window",
        "task",
        "trailers",
        "unacknowledged",
    )  # fmt: skip

    def __init__(self, stream_id: int, method: Method | None, send_window: int) -> None:
        self.id = stream_id
        self.method = method
        self.deadline: float | None = None
        self.encoding = b"identity"
        self.body = bytearray()
        self.unacknowledged = 0  # bytes received since the stream's last WINDOW_UPDATE
        self.ended = False  # the client's END_STREAM arrived
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.pending = b""  # answer bytes flow control holds back
        self.trailers = b""


class LeanGrpcServer:
    """Serves ``methods`` (keyed by path, ``/package.Service/Method``) on ``host:port``."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int) -> None:
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=1024)

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; tell every client to start no new call (GOAWAY); let calls in flight
        finish for up to ``grace`` seconds, then close what is left."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for connection in list(self.connections):
            connection.go_away()
        end = time.monotonic() + (grace or 0)
        while any(c.busy for c in self.connections) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        await asyncio.sleep(0)  # connection_lost callbacks
        await server.wait_closed()


class _Connection(asyncio.Protocol):
    def __init__(self, server: LeanGrpcServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._preface = False
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        # A client repeats its calls' headers, which after the first call are references to the
        # HPACK table alone; such a block does not change the table, so it decodes the same way
        # until a block that may change the table comes, and is decoded once.
        self._indexed: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0  # the highest stream id the client has opened
        self._continuation: tuple[int, int, bytearray] | None = None  # stream, END_STREAM, block
        self._send_window = 65_535
        self._peer_window = 65_535  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_max_frame = 16_384
        self._unacknowledged = 0  # bytes received since the connection's last WINDOW_UPDATE
        self._blocked: dict[int, _Stream] = {}  # answers waiting for flow control
        self._out: list[bytes] = []
        self._going_away = False
        self._closed = False

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    # -- the transport's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            )
        )
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - 65_535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self._blocked.clear()

    def pause_writing(self) -> None:
        # A client that does not read its answers is not sent more work's worth of requests.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buffer = self._buffer + data if self._buffer else data
        position = 0
        try:
            if not self._preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(buffer):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._buffer = buffer
                    return
                if not buffer.startswith(PREFACE):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface = True
                position = len(PREFACE)
            end = len(buffer)
            while end - position >= 9:
                high, low, kind, flags, stream_id = _FRAME.unpack_from(buffer, position)
                length = high << 16 | low
                if length > MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                start = position + 9
                if end - start < length:
                    break
                position = start + length
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, buffer[start:position])
            self._buffer = buffer[position:]
        except _ConnectionError as exc:
            self._fail(exc.code, str(exc))
        except Exception:
            logger.exception("gRPC connection: unexpected error; closing it")
            self._fail(INTERNAL_ERROR, "internal error")
        self._flush()

    # -- frames in ------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was cut by another frame")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = _unpadded(flags, payload)
            if flags & PRIORITY_FLAG:
                if len(block) < 5:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                block = block[5:]
            if flags & END_HEADERS:
                self._on_header_block(stream_id, flags & END_STREAM, block)
            else:
                self._continuation = (stream_id, flags & END_STREAM, bytearray(block))
        elif kind == CONTINUATION:
            if self._continuation is None or self._continuation[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            pieces = self._continuation[2]
            pieces += payload
            if len(pieces) > 2 * MAX_HEADER_LIST:
                raise _ConnectionError(PROTOCOL_ERROR, "a header block larger than allowed")
            if flags & END_HEADERS:
                stream_id, end_stream, _ = self._continuation
                self._continuation = None
                self._on_header_block(stream_id, end_stream, bytes(pieces))
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if stream_id != 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream_id == 0 or stream_id > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
            stream = self._streams.pop(stream_id, None)
            self._blocked.pop(stream_id, None)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
            self._close_if_done()
        elif kind == GOAWAY:
            # The client starts no new call; those in flight are answered, then the connection ends.
            self._going_away = True
            self._close_if_done()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and frame types this server does not know are ignored, as HTTP/2 asks.

    def _on_header_block(self, stream_id: int, end_stream: int, block: bytes) -> None:
        headers = self._indexed.get(block)
        if headers is None:
            try:
                headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
            except hpack.HPACKError as exc:
                # The decoder's table may be out of step with the client's: the connection ends.
                raise _ConnectionError(COMPRESSION_ERROR, f"header block: {exc}") from None
            if not _only_indexed(block):
                self._indexed.clear()  # the table may have changed: what was cached may not hold
            elif len(self._indexed) < 64:
                self._indexed[block] = headers
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: they end its request
            if not end_stream:
                self._reset(stream, PROTOCOL_ERROR)
            else:
                self._request_ended(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order")
        self._last_stream = stream_id
        if self._going_away or len(self._streams) >= MAX_STREAMS:
            self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        method = path = content_type = timeout = None
        encoding: bytes = b"identity"
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
        stream = _Stream(stream_id, self._server.methods.get(path or b""), self._peer_window)
        stream.ended = bool(end_stream)
        self._streams[stream_id] = stream
        if method != b"POST":
            self._answer_http(stream, b"405")
        elif content_type is None or not content_type.startswith(b"application/grpc"):
            self._answer_http(stream, b"415")
        elif stream.method is None:
            self._answer_status(
                stream,
                grpc.StatusCode.UNIMPLEMENTED,
                f"Method not found: {(path or b'').decode(errors='replace')}",
            )
        else:
            stream.encoding = encoding
            if timeout is not None:
                try:
                    stream.deadline = time.monotonic() + _grpc_timeout(timeout)
                except ValueError:
                    self._answer_status(
                        stream, grpc.StatusCode.INVALID_ARGUMENT, f"malformed grpc-timeout {timeout!r}"
                    )
                    return
            if end_stream:
                self._request_ended(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        self._unacknowledged += len(payload)  # padding counts against the window too
        if self._unacknowledged > CONNECTION_WINDOW:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "more data than the connection's window")
        if self._unacknowledged >= CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacknowledged)))
            self._unacknowledged = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream already answered or reset: its remaining data is dropped
        if stream.ended:
            self._reset(stream, STREAM_CLOSED)
            return
        stream.unacknowledged += len(payload)
        if stream.unacknowledged > STREAM_WINDOW:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        stream.body += _unpadded(flags, payload)
        if len(stream.body) > self._server.max_message_bytes + _MESSAGE.size:
            self._answer_status(
                stream,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request message is larger than the {self._server.max_message_bytes} bytes allowed",
            )
            return
        if flags & END_STREAM:
            stream.ended = True
            self._request_ended(stream)
        elif stream.unacknowledged >= STREAM_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacknowledged)))
            stream.unacknowledged = 0

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            # The header table size is the client's decoder's: the server's blocks never use it.
        self._out.append(frame(SETTINGS, ACK, 0))
        self._send_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        (increment,) = _U32.unpack(payload)
        increment &= 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection's window beyond 2^31-1")
        else:
            if stream_id > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            if increment == 0:
                self._reset(stream, PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > _MAX_WINDOW:
                self._reset(stream, FLOW_CONTROL_ERROR)
                return
        self._send_blocked()

    # -- calls ----------------------------------------------------------------------------------

    def _request_ended(self, stream: _Stream) -> None:
        """The whole request is in: decode its one message and start the handler."""
        method = stream.method
        assert method is not None
        body = stream.body
        if len(body) < _MESSAGE.size:
            self._answer_status(stream, grpc.StatusCode.INTERNAL, "a unary call without its request message")
            return
        compressed, size = _MESSAGE.unpack_from(body)
        if _MESSAGE.size + size != len(body):
            self._answer_status(
                stream, grpc.StatusCode.INTERNAL, "a unary call's request must be exactly one message"
            )
            return
        message = bytes(body[_MESSAGE.size :])
        stream.body = bytearray()
        if compressed:
            try:
                message = self._decompressed(stream.encoding, message)
            except Abort as exc:
                self._answer_status(stream, exc.code, exc.details)
                return
        try:
            request = method.request_type.FromString(message)
        except DecodeError as exc:
            self._answer_status(
                stream, grpc.StatusCode.INTERNAL, f"the request message does not parse: {exc}"
            )
            return
        stream.task = self._loop.create_task(self._call(stream, method, request))

    def _decompressed(self, encoding: bytes, message: bytes) -> bytes:
        if encoding == b"gzip":
            inflater = zlib.decompressobj(wbits=31)
        elif encoding == b"deflate":
            inflater = zlib.decompressobj()
        elif encoding == b"identity":
            raise Abort(grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
        else:
            raise Abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding.decode(errors='replace')} is not supported",
            )
        limit = self._server.max_message_bytes
        try:
            plain = inflater.decompress(message, limit + 1)
        except zlib.error as exc:
            raise Abort(grpc.StatusCode.INTERNAL, f"the request message does not decompress: {exc}") from None
        if len(plain) > limit or inflater.unconsumed_tail:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request message is larger than the {limit} bytes allowed",
            )
        return plain

    async def _call(self, stream: _Stream, method: Method, request: Any) -> None:
        try:
            response = await method.handler(request, Context(stream.deadline))
            payload = response.SerializeToString()
        except Abort as exc:
            self._answer_status(stream, exc.code, exc.details)
        except Exception:
            logger.exception("gRPC call on stream %d: unexpected error", stream.id)
            self._answer_status(stream, grpc.StatusCode.INTERNAL, "unexpected error in the proxy")
        else:
            self._answer(stream, payload)
        self._flush()

    # -- frames out -----------------------------------------------------------------------------

    def _answer(self, stream: _Stream, payload: bytes) -> None:
        if self._streams.get(stream.id) is not stream:
            return  # reset by the client, or the connection is gone
        data = _MESSAGE.pack(0, len(payload)) + payload
        self._out.append(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        size = len(data)
        if size <= self._send_window and size <= stream.send_window and size <= self._peer_max_frame:
            self._send_window -= size
            self._out.append(frame(DATA, 0, stream.id, data))
            self._out.append(frame(HEADERS, END_STREAM | END_HEADERS, stream.id, OK_TRAILERS))
            self._done(stream)
        else:
            stream.pending, stream.trailers = data, OK_TRAILERS
            self._blocked[stream.id] = stream
            self._send_blocked()

    def _send_blocked(self) -> None:
        """Send what flow control now lets through, oldest answer first."""
        for stream in list(self._blocked.values()):
            while stream.pending and self._send_window > 0 and stream.send_window > 0:
                size = min(len(stream.pending), self._send_window, stream.send_window, self._peer_max_frame)
                chunk, stream.pending = stream.pending[:size], stream.pending[size:]
                self._send_window -= size
                stream.send_window -= size
                self._out.append(frame(DATA, 0, stream.id, chunk))
            if stream.pending:
                if self._send_window <= 0:
                    return
                continue
            self._out.append(frame(HEADERS, END_STREAM | END_HEADERS, stream.id, stream.trailers))
            del self._blocked[stream.id]
            self._done(stream)

    def _answer_status(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        """A call that ends without an answer: its status in one HEADERS frame (trailers-only)."""
        if self._streams.get(stream.id) is not stream:
            return
        block = RESPONSE_HEADERS + status_block(code, details)
        self._out.append(frame(HEADERS, END_STREAM | END_HEADERS, stream.id, block))
        self._done(stream)

    def _answer_http(self, stream: _Stream, status: bytes) -> None:
        """Not a gRPC request: an HTTP status alone (``:status`` is the static table's name 8)."""
        self._out.append(
            frame(HEADERS, END_STREAM | END_HEADERS, stream.id, _integer(8, 4) + _string(status))
        )
        self._done(stream)

    def _done(self, stream: _Stream) -> None:
        del self._streams[stream.id]
        if not stream.ended:
            # Answered before the whole request came: the client is asked to stop sending it.
            self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self._close_if_done()

    def _reset(self, stream: _Stream, code: int) -> None:
        self._streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if stream.task is not None:
            stream.task.cancel()
        self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))

    def _flush(self) -> None:
        if self._out and self._transport is not None and not self._closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    # -- the connection's end -------------------------------------------------------------------

    def go_away(self) -> None:
        """No new stream: those the client opens from now are refused (it may retry them
        elsewhere); those open are answered."""
        if self._closed or self._going_away:
            return
        self._going_away = True
        self._out.append(frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream, NO_ERROR)))
        self._flush()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._going_away and not self._streams:
            self._flush()
            self.close()

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()

    def _fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY naming it, and the connection closed."""
        logger.info("gRPC connection closed: %s", message)
        self._out.append(frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream, code) + message.encode()[:256]))
        self._flush()
        self.close()


def _only_indexed(block: bytes) -> bool:
    """Whether a header block holds indexed fields alone (RFC 7541 6.1: the first bit set, the
    index an integer with a 7-bit prefix), which leave the decoder's table as it was."""
    position, end = 0, len(block)
    while position < end:
        first = block[position]
        if not first & 0x80:
            return False
        position += 1
        if first & 0x7F == 0x7F:  # the index goes on in bytes whose first bit says "more"
            while position < end and block[position] & 0x80:
                position += 1
            position += 1
    return True


def _unpadded(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than its frame")
    return payload[1 : len(payload) - payload[0]]
