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

And it guards the HTTP port against careless and hostile clients, where uvicorn does not
(``HttpLimits``, from the settings by ``configure``): a request's head (request line and
headers) must arrive within ``header_timeout`` of its first byte, and a new connection's first
request within it of the connection (slowloris; 408, or a silent close when nothing came); a
head may hold at most ``max_header_bytes`` and ``max_headers`` fields (431); connections beyond
``max_connections`` are answered 503 and closed. A slow body is the request's deadline's
business (408, ``client_proxy.api.inputs``); idle keep-alive connections uvicorn's
``timeout_keep_alive`` closes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from client_proxy.api.admission import SHED_MARK, SHED_PAUSE_S


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP/1.1 client may cost (``PROXY_HTTP_*``)."""

    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 4096


_limits = HttpLimits()


def configure(limits: HttpLimits) -> None:
    """The limits every connection of this process is held to from now on."""
    global _limits
    _limits = limits


def _refusal(status: bytes, code: str, message: str) -> bytes:
    """A whole response closing the connection, with the proxy's JSON error body."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


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
        self._limits = _limits
        #: The head being read: since when (None between requests), its bytes and fields so far.
        self._head_since: float | None = None
        self._head_bytes = 0
        self._head_fields = 0
        self._begun = False  # a request's first byte came, its head not yet whole
        self._heads = 0  # heads read whole
        self._head_raw = 0  # bytes of chunks wholly within the head being read
        self._refused: bytes | None = None  # a refusal to send instead of uvicorn's 400
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        limits = self._limits
        if len(self.connections) > limits.max_connections:
            message = f"more than {limits.max_connections} connections open (PROXY_HTTP_MAX_CONNECTIONS)"
            transport.write(_refusal(b"503 Service Unavailable", "too_many_connections", message))
            transport.close()
            return
        self._head_since = self.loop.time()  # the first request's head is due from now
        self._watch = self.loop.call_later(limits.header_timeout, self._watchdog)

    def _watchdog(self) -> None:
        """A head that has taken longer than the header timeout ends the connection."""
        self._watch = None
        transport = self._raw_transport
        if transport.is_closing() or self.lingering:
            return
        timeout = self._limits.header_timeout
        since = self._head_since
        if since is not None:
            late = self.loop.time() - since - timeout
            if late >= 0:
                if self._begun:  # a request began: it is told why it ends
                    message = f"the request's head did not arrive within {timeout * 1000:.0f} ms"
                    transport.write(_refusal(b"408 Request Timeout", "request_timeout", message))
                transport.close()
                return
            timeout = -late
        self._watch = self.loop.call_later(timeout, self._watchdog)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_since is None:  # a later request on the connection: its head is due from now
            self._head_since = self.loop.time()
        self._head_bytes = self._head_fields = 0
        self._begun = True

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            raise self._too_large(self._over_bytes("the request line is"))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._head_fields += 1
        limits = self._limits
        if self._head_bytes > limits.max_header_bytes:
            raise self._too_large(self._over_bytes("the request's head is"))
        if self._head_fields > limits.max_headers:
            raise self._too_large(f"more than {limits.max_headers} header fields (PROXY_HTTP_MAX_HEADERS)")
        super().on_header(name, value)

    def _over_bytes(self, what: str) -> str:
        return f"{what} larger than {self._limits.max_header_bytes} bytes (PROXY_HTTP_MAX_HEADER_BYTES)"

    def _too_large(self, message: str) -> ValueError:
        """The 431 this connection answers with (``send_400_response``), and the error that, raised
        in a parser callback, stops httptools (uvicorn then calls ``send_400_response``)."""
        self._refused = _refusal(b"431 Request Header Fields Too Large", "headers_too_large", message)
        return ValueError(message)

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._begun = False
        self._heads += 1
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused is None:
            super().send_400_response(msg)
            return
        self.transport.write(self._refused)
        self.transport.close()

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
        heads = self._heads
        super().data_received(data)
        if self._head_since is None or self._raw_transport.is_closing():
            return
        # httptools keeps a field's value until the next field begins, unbounded: a chunk in which
        # no head was completed and after which one is still awaited is the head's, all of it.
        if heads != self._heads:
            self._head_raw = 0  # a head ended in this chunk: the next one began within it
            return
        self._head_raw += len(data)
        if self._head_raw > self._limits.max_header_bytes:
            self._too_large(self._over_bytes("the request's head is"))
            self.send_400_response("")

    def eof_received(self) -> None:
        if self.lingering:
            self._raw_transport.close()  # the client has sent everything: nothing left to reset

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        super().connection_lost(exc)
