"""HTTP/2 flow control, both ways, for ``Connection``: the peer's SETTINGS and WINDOW_UPDATEs
(what this side may send), what this side gives back as it consumes (what the peer may send),
and DATA sent as the windows allow, streams waiting for the connection's window apart from
those waiting for their own."""

from __future__ import annotations

from typing import Any

from client_proxy.http2.frames import (
    ACK,
    DATA,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    U32,
    WINDOW_CREDIT_CAP,
    WINDOW_UPDATE,
    WINDOW_UPDATES_PER_DATA,
    Bucket,
    ConnectionFailure,
    Limits,
    Stream,
    frame,
)


class FlowControl:
    """The flow-control half of ``Connection`` (which sets these attributes and provides the
    methods below them)."""

    limits: Limits | None
    streams: dict[int, Any]
    out: list[bytes]
    send_window: int
    peer_window: int
    peer_max_frame: int
    receive_window: int
    _window: int
    _to_give_back: int
    _blocked: dict[int, Stream]
    _parked: dict[int, Stream]
    _window_credit: int
    _control: Bucket

    def idle_frame(self, cost: float = 1.0) -> None:
        raise NotImplementedError

    def fail(self, code: int, message: str) -> None:
        raise NotImplementedError

    def sent(self, stream: Any) -> None:
        raise NotImplementedError

    def on_reset(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

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
