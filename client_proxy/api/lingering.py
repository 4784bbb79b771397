"""Lingering close: a client still sending a body the proxy refused reads the answer, not a reset.

The proxy answers 413 from ``Content-Length`` before reading a body over the limit. When the
connection is not kept alive (urllib sends ``Connection: close``), uvicorn then closes the
socket while the rest of the body is still arriving, and the kernel answers those bytes with a
TCP reset: a client that sends its whole body before reading (urllib, requests, most
blocking clients) gets "Connection reset by peer" instead of the 413.

nginx's answer is its lingering close, and this is the same: after the response, shut down
only the sending side (the client sees the answer and end of stream), keep reading and
discarding what still arrives for at most ``linger_s`` seconds and ``linger_bytes`` bytes,
then close. A client that stops sending ends it at once.

The same protocol slows down a client that ignores a shed request's ``Retry-After``: after a
503 from the admission bound (``client_proxy.api.admission``), the connection is not read for
``SHED_PAUSE_S``. The refusal itself goes out at once; the client's next request on that
connection waits in the socket until the pause ends and is then served (or refused) as usual.
Without it, clients that resend at once (wrk, naive retry loops) turn every refusal into
another request, and the flood of refusals starves the requests the proxy admitted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from client_proxy.api.admission import SHED_MARK, SHED_PAUSE_S

#: nginx's lingering_time is 30 s; a refused body needs far less on any link worth serving.
LINGER_SECONDS = 5.0
#: At most this much more is read and thrown away before the socket is closed regardless.
LINGER_BYTES = 256 * 1024 * 1024


class _Transport:
    """The real transport, whose ``close()`` lingers while a request body is still arriving, and
    which sends a response's head together with its body.

    uvicorn writes the status line and headers of a response, then its body, as two writes: two
    ``send`` system calls and two TCP segments per answer (a tenth of the proxy's CPU at
    concurrency 16, profiled). Here the head is held until the next write, which takes it along,
    or until the end of the event loop's current step at the latest (a streaming response whose
    first chunk comes later gets its head at once, as before)."""

    def __init__(self, inner: asyncio.Transport, protocol: LingeringHttpToolsProtocol) -> None:
        self._inner = inner
        self._protocol = protocol
        self._head: bytes | None = None
        #: The request whose response head was held (each response's first write is its head).
        self._headed: object = None
        self.is_closing = inner.is_closing  # a hot call, bound once instead of through __getattr__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._inner.write(head + data)
            return
        cycle = self._protocol.cycle
        if cycle is not None and cycle.response_started and cycle is not self._headed:
            self._headed = cycle
            self._head = data
            self._protocol.loop.call_soon(self.flush)
            return
        self._inner.write(data)

    def flush(self) -> None:
        """Send a held head now."""
        head = self._head
        if head is not None:
            self._head = None
            if not self._inner.is_closing():
                self._inner.write(head)

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def close(self) -> None:
        self.flush()
        protocol = self._protocol
        cycle = protocol.cycle
        body_pending = cycle is not None and cycle.more_body and not cycle.disconnected
        if (
            body_pending
            and not protocol.lingering
            and not self._inner.is_closing()
            and self._inner.can_write_eof()
        ):
            protocol.linger()
        else:
            self._inner.close()


class LingeringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a lingering close (pass the class as ``http=``)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.lingering = False
        self._lingered = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._shed_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]

    def linger(self) -> None:
        """Answer sent: half-close, then read and discard until the client stops or a bound is hit."""
        self.lingering = True
        self.transport.flush()  # type: ignore[attr-defined]  # a head still held goes out first
        transport = self._raw_transport
        transport.write_eof()  # after what is buffered: the client reads the whole answer, then EOF
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)
        self.flow.resume_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.scope.get(SHED_MARK)
            and not self.lingering
            and not self.transport.is_closing()
            and self._shed_timer is None
        ):
            self.flow.pause_reading()
            self._shed_timer = self.loop.call_later(SHED_PAUSE_S, self._after_shed_pause)

    def _after_shed_pause(self) -> None:
        self._shed_timer = None
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self._raw_transport.close()
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if self.lingering:
            self._raw_transport.close()  # the client has sent everything: nothing left to reset

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        super().connection_lost(exc)
