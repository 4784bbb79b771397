"""One HTTP/2 connection, either end: the frame loop, SETTINGS, PING, CONTINUATION and padding,
the peer held to its budgets, GOAWAY on a connection error (flow control: ``flow.py``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import hpack

from client_proxy.http2.flow import FlowControl
from client_proxy.http2.frames import (
    ACK,
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
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    STREAM_CLOSED,
    STREAM_WINDOW,
    U32,
    WINDOW_UPDATE,
    Bucket,
    ConnectionFailure,
    Limits,
    Stream,
    frame,
    only_indexed,
    unpadded,
)

logger = logging.getLogger("client_proxy.http2")


class Connection(FlowControl, asyncio.Protocol):
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
            self._control = Bucket(limits.control_frames)
            self._resets = Bucket(limits.resets)

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

    # -- frames out -----------------------------------------------------------------------------

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
