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

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

import hpack

logger = logging.getLogger("client_proxy.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A frame header: the 24-bit length as its high byte and low 16 bits, type, flags, stream id.
FRAME = struct.Struct(">BHBBI")
#: A gRPC message's prefix: compressed flag, length.
MESSAGE = struct.Struct(">BI")
SETTING = struct.Struct(">HI")
U32 = struct.Struct(">I")
GOAWAY_HEAD = struct.Struct(">II")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

#: How much the peer may send on one stream, and on the connection, before a WINDOW_UPDATE
#: (the stream's sent when half is used; the connection's when a quarter is consumed, which a
#: guarded connection counts when a request is handed on, not when it arrives): wide, so that a
#: message rarely waits for one.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
#: The largest header list accepted (decoded), as grpcio's hard limit.
MAX_HEADER_LIST = 16 * 1024
#: The largest frame accepted (HTTP/2's default, not raised).
MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
#: WINDOW_UPDATE frames a peer may send free for each DATA frame this side sent (Envoy's
#: max_inbound_window_update_frames_per_data_frame_sent), and the most it may save up.
WINDOW_UPDATES_PER_DATA = 10
WINDOW_CREDIT_CAP = 10_000
#: After a connection error's GOAWAY, how long the peer's last frames are read and dropped.
LINGER_S = 0.5
DEFAULT_WINDOW = 65_535


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
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


def string(value: bytes) -> bytes:
    return integer(len(value), 7) + value


def literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal never added to the dynamic table, so every block this side sends is
    fixed bytes and no table has to be kept in step with the peer's decoder."""
    return b"\x00" + string(name) + string(value)


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """A literal never added to the table, its name the static table's entry ``index``."""
    return integer(index, 4) + string(value)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return FRAME.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def only_indexed(block: bytes) -> bool:
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


def unpadded(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionFailure(PROTOCOL_ERROR, "padding longer than its frame")
    return payload[1 : len(payload) - payload[0]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one peer may cost a guarded connection (a server's, facing clients it does not know)."""

    #: Frames that carry no call (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM of a closed
    #: stream, empty DATA or CONTINUATION, unknown types, DATA forced tiny by the peer's windows)
    #: the peer may send in a burst. The budget refills by a tenth of this a second and by one per
    #: call answered; spent, the connection ends with GOAWAY ENHANCE_YOUR_CALM.
    control_frames: int = 1000
    #: Calls the peer may reset before their answer in a burst (rapid reset, CVE-2023-44487);
    #: refilled as ``control_frames`` is.
    resets: int = 1000
    #: Seconds from the connection's start to the peer's preface and first SETTINGS.
    handshake_timeout: float = 10.0
    #: Seconds without a call started or answered and with none running, after which the
    #: connection ends (GOAWAY NO_ERROR): between one and two such periods.
    idle_timeout: float = 300.0
    #: Request bytes the connection may hold before the calls they belong to are consumed: the
    #: connection's receive window, given back only as requests are handed to their handlers.
    connection_window: int = CONNECTION_WINDOW
    #: Frames handled in one turn of the event loop before the others' turn (the rest wait in
    #: the buffer, the socket unread meanwhile).
    frames_per_turn: int = 256
    #: CONTINUATION frames one header block may take.
    continuations: int = 16


class _Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``rate`` a second and by ``refund``."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: int) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / 10.0
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def take(self, count: float = 1.0) -> bool:
        tokens = self.tokens
        if tokens < self.capacity:
            now = time.monotonic()
            tokens = min(self.capacity, tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if tokens < count:
            self.tokens = tokens
            return False
        self.tokens = tokens - count
        return True

    def refund(self, count: float) -> None:
        self.tokens = min(self.capacity, self.tokens + count)


class ConnectionFailure(Exception):
    """A connection error (RFC 9113 5.4.1): the connection ends with a GOAWAY naming it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """What both ends keep of a stream: its windows, and answer bytes flow control holds back."""

    __slots__ = ("credit", "ended", "held", "id", "pending", "tail", "unacknowledged")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        #: The stream's send window less the peer's initial window (``Connection.peer_window``):
        #: a change of the initial window changes every stream's window at no cost.
        self.credit = 0
        self.unacknowledged = 0  # bytes received since the stream's last WINDOW_UPDATE
        self.held = 0  # bytes received whose connection window is given back when consumed
        self.ended = False  # the peer's END_STREAM arrived
        self.pending = b""  # DATA payload not sent yet
        self.tail: bytes | None = None  # a frame to send after ``pending`` (None: END_STREAM on the data)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection, either end; ``server`` says which (the server reads the preface).
    With ``limits`` (a server's connection), the peer is held to them."""

    server = False

    def __init__(self, limits: Limits | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.limits = limits
        self._buffer = b""
        self._preface = not self.server  # a client reads no preface
        self._settled = limits is None  # the peer's first SETTINGS came (guarded connections)
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        # A peer repeats its header blocks, which after the first are references to the HPACK
        # table alone; such a block does not change the table, so it decodes the same way until
        # a block that may change the table comes, and is decoded once.
        self._indexed: dict[bytes, list[tuple[bytes, bytes]]] = {}
        # A header block cut into CONTINUATION frames: stream, END_STREAM, block, frames, refused.
        self._continuation: tuple[int, int, bytearray, int, bool] | None = None
        self.send_window = DEFAULT_WINDOW
        self.peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16_384
        window = limits.connection_window if limits is not None else CONNECTION_WINDOW
        self.receive_window = self._window = window  # what the peer may still send
        self._to_give_back = 0  # bytes consumed whose window has not been given back yet
        self.streams: dict[int, Any] = {}
        self._blocked: dict[int, Stream] = {}  # streams whose data waits for the connection's window
        self._parked: dict[int, Stream] = {}  # streams whose data waits for their own window
        self.out: list[bytes] = []
        self.last_stream = 0
        self.going_away = False  # a GOAWAY went one way or the other: no new stream
        self._backlog = False  # frames left in the buffer for the next turn (reading paused)
        self._writing_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self._window_credit = 0  # WINDOW_UPDATEs the peer may send free (earned by DATA sent)
        if limits is not None:
            self._control = _Bucket(limits.control_frames)
            self._resets = _Bucket(limits.resets)

    # -- to be provided by each end -------------------------------------------------------------

    def on_headers(self, stream_id: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def on_data(self, stream: Any, data: bytes, end_stream: bool) -> None:
        raise NotImplementedError

    def on_reset(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream: int, code: int, debug: bytes) -> None:
        raise NotImplementedError

    def sent(self, stream: Any) -> None:
        """All of ``stream``'s frames are out."""

    def on_lost(self, exc: Exception | None) -> None:
        """The connection is gone."""

    def on_settled(self) -> None:
        """A guarded connection's peer sent its preface and first SETTINGS."""

    def settings(self) -> list[tuple[int, int]]:
        return [
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
        ]

    # -- the transport's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        payload = b"".join(SETTING.pack(key, value) for key, value in self.settings())
        head = b"" if self.server else PREFACE
        transport.write(
            head
            + frame(SETTINGS, 0, 0, payload)
            + frame(WINDOW_UPDATE, 0, 0, U32.pack(self._window - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._blocked.clear()
        self._parked.clear()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        # A peer that does not read what it is sent is not read from either.
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.transport is not None and not self.closed and not self._backlog:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._frames(self._buffer + data if self._buffer else data)

    def _next_turn(self) -> None:
        """Frames left from an earlier turn: a bounded number more, then the socket is read again."""
        self._backlog = False
        if self.closed:
            return
        self._frames(self._buffer)
        if not self._backlog and not self._writing_paused and not self.closed and self.transport is not None:
            self.transport.resume_reading()

    def _frames(self, buffer: bytes) -> None:
        position = 0
        turn = self.limits.frames_per_turn if self.limits is not None else -1
        try:
            if not self._preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(buffer):
                        raise ConnectionFailure(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._buffer = buffer
                    return
                if not buffer.startswith(PREFACE):
                    raise ConnectionFailure(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface = True
                position = len(PREFACE)
            end = len(buffer)
            while end - position >= 9:
                if turn == 0:
                    # The other connections' turn (the HTTP port's too): the rest waits, unread.
                    self._backlog = True
                    if self.transport is not None:
                        self.transport.pause_reading()
                        asyncio.get_running_loop().call_soon(self._next_turn)
                    break
                turn -= 1
                if self.closed:
                    break
                high, low, kind, flags, stream_id = FRAME.unpack_from(buffer, position)
                length = high << 16 | low
                if length > MAX_FRAME:
                    raise ConnectionFailure(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                start = position + 9
                if end - start < length:
                    break
                position = start + length
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, buffer[start:position])
            self._buffer = buffer[position:]
        except ConnectionFailure as exc:
            self.fail(exc.code, str(exc))
        except Exception:
            logger.exception("HTTP/2 connection: unexpected error; closing it")
            self.fail(INTERNAL_ERROR, "internal error")
        self.flush()

    # -- the peer's budgets ---------------------------------------------------------------------

    def idle_frame(self, cost: float = 1.0) -> None:
        """A frame that carries no call: charged to the peer's budget (guarded connections)."""
        if self.limits is not None and not self._control.take(cost):
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "too many frames that carry no call")

    def reset_by_peer(self) -> None:
        """The peer reset a call before its answer: charged to its reset budget."""
        if self.limits is not None and not self._resets.take():
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "too many calls reset (rapid reset)")

    def answered(self) -> None:
        """A call was answered: the peer's budgets earn one frame each."""
        if self.limits is not None:
            self._control.refund(1.0)
            self._resets.refund(1.0)

    # -- frames in ------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != CONTINUATION:
            raise ConnectionFailure(PROTOCOL_ERROR, "a header block was cut by another frame")
        if not self._settled:
            if kind != SETTINGS or flags & ACK:
                raise ConnectionFailure(PROTOCOL_ERROR, "the connection preface's SETTINGS frame is missing")
            self._settled = True
            self.on_settled()
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise ConnectionFailure(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = unpadded(flags, payload)
            refused = False
            if flags & PRIORITY_FLAG:
                if len(block) < 5:
                    raise ConnectionFailure(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                refused = U32.unpack_from(block)[0] & 0x7FFFFFFF == stream_id
                block = block[5:]
            if flags & END_HEADERS:
                self._headers(stream_id, bool(flags & END_STREAM), block, refused)
            else:
                self._continuation = (stream_id, flags & END_STREAM, bytearray(block), 0, refused)
        elif kind == CONTINUATION:
            if self._continuation is None or self._continuation[0] != stream_id:
                raise ConnectionFailure(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            stream_id, end_stream, pieces, count, refused = self._continuation
            if self.limits is not None and count >= self.limits.continuations:
                raise ConnectionFailure(ENHANCE_YOUR_CALM, "a header block in too many CONTINUATION frames")
            if not payload and not flags & END_HEADERS:
                self.idle_frame()
            pieces += payload
            if len(pieces) > 2 * MAX_HEADER_LIST:
                raise ConnectionFailure(PROTOCOL_ERROR, "a header block larger than allowed")
            if flags & END_HEADERS:
                self._continuation = None
                self._headers(stream_id, bool(end_stream), bytes(pieces), refused)
            else:
                self._continuation = (stream_id, end_stream, pieces, count + 1, refused)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            # A peer's answer to the DATA this side sent (grpc's clients send two per call, the
            # stream's and the connection's): up to ten per DATA frame are free, as Envoy has it;
            # beyond that, each is charged.
            if self._window_credit > 0:
                self._window_credit -= 1
            else:
                self.idle_frame()
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if stream_id != 0:
                raise ConnectionFailure(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ConnectionFailure(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
            self.idle_frame()
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream_id == 0:
                raise ConnectionFailure(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ConnectionFailure(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
            if stream_id in self.streams:
                self.reset_by_peer()
            else:
                self.idle_frame()
            self.unblock(stream_id)
            self.on_reset(stream_id, U32.unpack(payload)[0])
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise ConnectionFailure(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            last, code = GOAWAY_HEAD.unpack_from(payload)
            self.on_goaway(last & 0x7FFFFFFF, code, payload[8:])
        elif kind == PUSH_PROMISE:
            raise ConnectionFailure(PROTOCOL_ERROR, "PUSH_PROMISE, which this side never allows")
        elif kind == PRIORITY:
            # Advice this side does not follow, but a frame all the same (RFC 9113 6.3).
            if stream_id == 0:
                raise ConnectionFailure(PROTOCOL_ERROR, "PRIORITY on stream 0")
            self.idle_frame()
            if len(payload) != 5:
                self.refuse(stream_id, FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")
            elif U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                self.refuse(stream_id, PROTOCOL_ERROR, "a stream that depends on itself")
        else:  # a frame type this side does not know is ignored, as HTTP/2 asks, and charged
            self.idle_frame()

    def _headers(self, stream_id: int, end_stream: bool, block: bytes, refused: bool) -> None:
        headers = self._decode(block)  # decoded even when refused: the HPACK table must follow
        if not refused:
            self.on_headers(stream_id, end_stream, headers)
            return
        if self.server and stream_id > self.last_stream:
            self.last_stream = stream_id
        self.refuse(stream_id, PROTOCOL_ERROR, "a stream that depends on itself")

    def refuse(self, stream_id: int, code: int, reason: str) -> None:
        """A stream error (RFC 9113 5.4.2) on ``stream_id``, open or not: RST_STREAM ``code``."""
        logger.debug("HTTP/2 stream %d reset: %s", stream_id, reason)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.reset(stream, code)
        else:
            self.out.append(frame(RST_STREAM, 0, stream_id, U32.pack(code)))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers = self._indexed.get(block)
        if headers is None:
            try:
                headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
            except hpack.HPACKError as exc:
                # The decoder's table may be out of step with the peer's: the connection ends.
                raise ConnectionFailure(COMPRESSION_ERROR, f"header block: {exc}") from None
            if not only_indexed(block):
                self._indexed.clear()  # the table may have changed: what was kept may not hold
            elif len(self._indexed) < 64:
                self._indexed[block] = headers
        return headers

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts against the window too
        self.receive_window -= size
        if self.receive_window < 0:
            raise ConnectionFailure(FLOW_CONTROL_ERROR, "more data than the connection's window")
        end_stream = bool(flags & END_STREAM)
        if not size and not end_stream:
            self.idle_frame()
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise ConnectionFailure(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self.give_back(size)  # a stream already closed on this side: its data is dropped
            return
        if stream.ended:
            self.give_back(size)
            self.reset(stream, STREAM_CLOSED)
            return
        stream.unacknowledged += size
        if stream.unacknowledged > STREAM_WINDOW:
            self.give_back(size)
            self.reset(stream, FLOW_CONTROL_ERROR)
            return
        if not end_stream and stream.unacknowledged >= STREAM_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.unacknowledged)))
            stream.unacknowledged = 0
        if end_stream:
            stream.ended = True
        if self.limits is None:
            self.give_back(size)  # consumed as it arrives
        else:
            stream.held += size  # given back when the stream's request is consumed or dropped
        self.on_data(stream, unpadded(flags, payload), end_stream)

    def release(self, stream: Stream) -> None:
        """``stream``'s request bytes are consumed or dropped: their window is given back."""
        if stream.held:
            self.give_back(stream.held)
            stream.held = 0

    def give_back(self, size: int) -> None:
        """``size`` bytes received were consumed: the peer may send as much again (sent in one
        WINDOW_UPDATE once a quarter of the window is due)."""
        due = self._to_give_back + size
        if due >= self._window // 4:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(due)))
            self.receive_window += due
            due = 0
        self._to_give_back = due

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFailure(FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            self.idle_frame()
            return
        if len(payload) % 6:
            raise ConnectionFailure(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        # Each entry is work: a frame of many entries is charged as many frames.
        self.idle_frame(1 + len(payload) // 6 / 8)
        window = self.peer_window
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionFailure(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 2**24 - 1:
                    raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH other than 0 or 1")
            # The header table size is the peer's decoder's: this side's blocks never use it.
        self.out.append(frame(SETTINGS, ACK, 0))
        if window != self.peer_window:
            # Every stream's window moves by the difference (RFC 9113 6.9.2), at no cost here.
            grown, self.peer_window = window > self.peer_window, window
            if grown and self._parked:
                # Streams that waited for their own window may send: each is work, charged.
                self.idle_frame(len(self._parked) / 16)
                self._blocked.update(self._parked)
                self._parked.clear()
            self.send_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionFailure(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionFailure(FLOW_CONTROL_ERROR, "the connection's window beyond 2^31-1")
            if self._blocked:
                self.send_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # closed here, or idle (a window may be opened before a stream is)
        if increment == 0:
            self.reset(stream, PROTOCOL_ERROR)
            return
        stream.credit += increment
        if self.peer_window + stream.credit > MAX_WINDOW:
            self.reset(stream, FLOW_CONTROL_ERROR)
            return
        if stream_id in self._parked and self.peer_window + stream.credit > 0:
            del self._parked[stream_id]
            self._blocked[stream_id] = stream
            self.send_blocked()

    # -- frames out -----------------------------------------------------------------------------

    def send(self, stream: Stream, data: bytes, tail: bytes | None) -> None:
        """``data`` as DATA frames on ``stream`` as the windows allow, then ``tail`` (a frame),
        or END_STREAM on the last DATA frame when ``tail`` is None; ``sent`` when all is out."""
        size = len(data)
        if (
            size <= self.send_window
            and size <= self.peer_window + stream.credit
            and size <= self.peer_max_frame
        ):
            self.send_window -= size
            stream.credit -= size
            if self._window_credit < WINDOW_CREDIT_CAP:
                self._window_credit += WINDOW_UPDATES_PER_DATA
            if tail is None:
                self.out.append(frame(DATA, END_STREAM, stream.id, data))
            else:
                self.out.append(frame(DATA, 0, stream.id, data))
                self.out.append(tail)
            self.sent(stream)
            return
        stream.pending, stream.tail = data, tail
        self._blocked[stream.id] = stream
        self.send_blocked()

    def send_blocked(self) -> None:
        """Send what flow control now lets through, oldest stream first. A stream whose own window
        is shut is set apart until it opens, so each stream visited here sends, or waits for the
        connection's window and ends the walk: the work is what is sent, whatever the streams."""
        blocked = self._blocked
        while blocked and self.send_window > 0:
            stream_id = next(iter(blocked))
            stream = blocked[stream_id]
            while stream.pending and self.send_window > 0:
                window = self.peer_window + stream.credit
                if window <= 0:
                    break
                size = min(len(stream.pending), self.send_window, window, self.peer_max_frame)
                # A frame kept tiny by the peer's windows: its work is charged.
                tiny = size < 1024 and size < len(stream.pending)
                if tiny:
                    if self.limits is not None and not self._control.take():
                        self.fail(ENHANCE_YOUR_CALM, "too many frames kept tiny by flow control")
                        return
                elif self._window_credit < WINDOW_CREDIT_CAP:
                    self._window_credit += WINDOW_UPDATES_PER_DATA
                chunk, stream.pending = stream.pending[:size], stream.pending[size:]
                self.send_window -= size
                stream.credit -= size
                last = not stream.pending and stream.tail is None
                self.out.append(frame(DATA, END_STREAM if last else 0, stream.id, chunk))
            if stream.pending:
                if self.peer_window + stream.credit <= 0:
                    del blocked[stream_id]
                    self._parked[stream_id] = stream
                continue  # else the connection's window is shut: the loop ends
            if stream.tail is not None:
                self.out.append(stream.tail)
            del blocked[stream_id]
            self.sent(stream)

    def reset(self, stream: Any, code: int) -> None:
        """Ends ``stream`` with RST_STREAM; the subclass's ``on_reset`` runs as if the peer had."""
        self.unblock(stream.id)
        self.out.append(frame(RST_STREAM, 0, stream.id, U32.pack(code)))
        self.on_reset(stream.id, code)

    def unblock(self, stream_id: int) -> None:
        self._blocked.pop(stream_id, None)
        self._parked.pop(stream_id, None)

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close_if_done(self) -> None:
        """After a GOAWAY, the connection ends with its last stream."""
        if self.going_away and not self.streams:
            self.flush()
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # a connection lingering after its GOAWAY too

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY naming it, and the connection closed. What the peer still
        sends meanwhile is read and dropped for up to ``LINGER_S`` (its socket then closes when
        the peer's does, at the latest then), so that the GOAWAY is read rather than lost to a
        TCP reset."""
        logger.info("HTTP/2 connection closed: %s", message)
        self.out.append(
            frame(GOAWAY, 0, 0, GOAWAY_HEAD.pack(self.last_stream, code) + message.encode()[:256])
        )
        self.flush()
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True  # nothing more is handled, or sent
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, transport.close)
