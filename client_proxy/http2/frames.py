"""HTTP/2's wire: frame and setting codes, the frame header, the few HPACK literals this side
writes, and what a connection keeps per stream and per peer (``Stream``, ``Limits``, ``Bucket``)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

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


class Bucket:
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
