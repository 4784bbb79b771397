"""The proxy's event loop (client_proxy.api.accepting): every waiting connection accepted per turn.

No Triton: plain TCP servers on the loop, and clients on blocking sockets in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import uvicorn

from client_proxy.api.accepting import Loop, new_event_loop


class _Echo(asyncio.Protocol):
    connected: ClassVar[list[_Echo]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _Echo.connected.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


def _run(main: Callable[[Loop], Any]) -> Any:
    loop = Loop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


def _connect_all(port: int, count: int, into: list[socket.socket]) -> None:
    for _ in range(count):
        into.append(socket.create_connection(("127.0.0.1", port), timeout=10))


def test_connections_that_waited_while_the_loop_was_busy_are_accepted_within_a_few_turns() -> None:
    """libuv's own listener takes one connection per loop turn: 300 waiting connections would
    need 300 turns, each as long as a busy proxy's turn. This loop takes them all at once."""
    count = 300
    clients: list[socket.socket] = []

    async def main(loop: Loop) -> int:
        _Echo.connected = []
        server = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        connecting = threading.Thread(target=_connect_all, args=(port, count, clients))
        connecting.start()
        connecting.join()  # blocks the loop: all 300 wait in the kernel's accept queue
        turns = 0
        while len(_Echo.connected) < count and turns < count:
            await asyncio.sleep(0)  # one turn of the loop
            turns += 1
        server.close()
        await server.wait_closed()
        for protocol in _Echo.connected:
            protocol.transport.close()
        await asyncio.sleep(0.01)
        return turns

    try:
        turns = _run(main)
    finally:
        for client in clients:
            client.close()
    assert len(_Echo.connected) == count
    assert turns <= 5, f"{turns} loop turns to accept {count} waiting connections"


def test_every_accepted_connection_is_served_and_close_stops_accepting() -> None:
    async def main(loop: Loop) -> tuple[list[bytes], bool]:
        server = await loop.create_server(_Echo, "127.0.0.1", 0)
        assert server.is_serving()
        port = server.sockets[0].getsockname()[1]

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello %d" % i)
            answer = await reader.readexactly(len(b"hello %d" % i))
            writer.close()
            return answer

        answers = await asyncio.gather(*(one(i) for i in range(50)))
        server.close()
        await server.wait_closed()
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            refused = True
        else:
            refused = False
        return answers, refused

    answers, refused = _run(main)
    assert answers == [b"HELLO %d" % i for i in range(50)]
    assert refused


@pytest.mark.parametrize("listening", [False, True], ids=["bound", "listening"])
def test_a_socket_given_to_it_is_served(listening: bool) -> None:
    """uvicorn's path with several workers: the socket is bound once, in the parent, and passed
    to each worker not yet listening (``uvicorn.Config.bind_socket``); a listening one works too."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    if listening:
        listener.listen()

    async def main(loop: Loop) -> bytes:
        server = await loop.create_server(_Echo, sock=listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"abc")
        answer = await reader.readexactly(3)
        writer.close()
        await writer.wait_closed()
        server.close()
        await asyncio.sleep(0.01)
        return answer

    assert _run(main) == b"ABC"


def test_a_port_in_use_is_an_oserror_naming_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]

        async def main(loop: Loop) -> None:
            await loop.create_server(_Echo, "127.0.0.1", port)

        with pytest.raises(OSError, match=rf"127\.0\.0\.1', {port}"):
            _run(main)


def test_uvicorn_takes_it_as_its_loop_factory() -> None:
    config = uvicorn.Config("client_proxy.asgi:app", loop="client_proxy.api.accepting:new_event_loop")
    factory = config.get_loop_factory()
    assert factory is new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, Loop)
    finally:
        loop.close()


def test_what_it_does_not_handle_goes_to_uvloops_own_server() -> None:
    async def main(loop: Loop) -> tuple[str, bytes]:
        server = await loop.create_server(_Echo, "127.0.0.1", 0, reuse_port=True)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"xyz")
        answer = await reader.readexactly(3)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return type(server).__module__, answer

    module, answer = _run(main)
    assert module.startswith("uvloop") and answer == b"XYZ"
