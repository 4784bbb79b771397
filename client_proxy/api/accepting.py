"""An event loop that accepts a burst of connections at once (uvicorn ``loop=``).

Since libuv's pull request 3696 (2022), a libuv listener accepts one connection per turn of
the event loop, and uvloop inherits it. Under load a turn of the proxy's loop lasts
milliseconds (it answers hundreds of requests per turn), so new connections wait in the
kernel's accept queue at a rate of a few dozen per second: measured here, 1,024 connections
opened at once against a busy proxy, a third of them waited more than 2 s to be accepted,
invisible to the admission bound (``admission.py``) that would have answered them 503 at
once. asyncio's own loop accepts up to the backlog per turn and does not have this problem,
but is slower at everything else.

``Loop`` is uvloop's loop with ``create_server`` for plain TCP listeners replaced: the listening
socket is watched with ``add_reader``, and each time it is readable every waiting connection is
accepted (at most ``backlog`` of them) and handed to uvloop with ``connect_accepted_socket``.
TLS, Unix sockets and ``reuse_port`` keep uvloop's own server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

logger = logging.getLogger("client_proxy")

#: accept() errors that say the process or the system is out of a resource: stop accepting for
#: a moment (asyncio does the same) instead of spinning on a listener that stays readable.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds accepting pauses after one of those.
ACCEPT_RETRY_DELAY_S = 1.0


class BatchAcceptServer(asyncio.AbstractServer):
    """Listening sockets whose pending connections are all accepted on each readable event."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: Iterable[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        batch: int,
    ) -> None:
        self._loop = loop
        self._sockets = tuple(sockets)
        self._protocol_factory = protocol_factory
        self._batch = max(batch, 1)
        self._serving = False
        self._closed = False
        self._handshakes: set[asyncio.Task[Any]] = set()

    # asyncio.AbstractServer

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return self._sockets

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._closed:
            raise RuntimeError("the server is closed")
        if not self._serving:
            self._serving = True
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._loop.create_future()  # until cancelled, as asyncio's servers do

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        # The connections themselves are the application's to close (uvicorn closes its own);
        # what is left here are connections accepted but not yet handed to their protocol.
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    def close_clients(self) -> None:  # Python 3.13's API; uvicorn closes its connections itself
        pass

    def abort_clients(self) -> None:
        pass

    # accepting

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing more waiting
            except ConnectionAbortedError:
                continue  # the client gave up before it was accepted
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                logger.error("accepting connections paused for %.0f s: %s", ACCEPT_RETRY_DELAY_S, exc)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume, listener)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self, listener: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except OSError as exc:  # the peer went away between accept() and here
            logger.debug("an accepted connection failed before it was served: %s", exc)
            conn.close()


def _listen(host: str | list[str] | None, port: int | None, family: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to."""
    hosts = host if isinstance(host, list) else [host]
    addresses: dict[tuple[int, Any], None] = {}
    for name in hosts:
        for info in socket.getaddrinfo(name or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE):
            addresses[(info[0], info[4])] = None
    sockets: list[socket.socket] = []
    try:
        for family_, address in addresses:
            sock = socket.socket(family_, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family_ == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0 binds IPv4
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {exc.strerror}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Loop(uvloop.Loop):
    """uvloop, whose plain TCP servers accept every waiting connection on each readable event."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | list[str] | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_port: bool | None = None,
        start_serving: bool = True,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        unix = sock is not None and sock.family == getattr(socket, "AF_UNIX", None)
        if ssl is not None or reuse_port or unix or kwargs:
            uvloops: Any = super()  # its overloads type host/port and sock apart
            server: asyncio.AbstractServer = await uvloops.create_server(
                protocol_factory,
                host,
                port,
                family=family,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                reuse_port=reuse_port,
                start_serving=start_serving,
                **kwargs,
            )
            return server
        if sock is not None:
            if host is not None or port is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            # A socket handed in may be bound and not listening yet (uvicorn's parent process
            # binds the one its workers share): listen, as asyncio's own servers do.
            sock.listen(backlog)
            sock.setblocking(False)
            sockets = [sock]
        else:
            sockets = _listen(host, port, family, backlog)
        server = BatchAcceptServer(self, sockets, protocol_factory, backlog)
        if start_serving:
            await server.start_serving()
        return server


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn is given (``loop="client_proxy.api.accepting:new_event_loop"``)."""
    return Loop()
