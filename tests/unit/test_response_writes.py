"""How the proxy's HTTP protocol hands a response to the socket: its head and body in one write
(uvicorn writes them apart: two system calls and two TCP segments per answer). A fake socket
transport and a fake request cycle; the protocol itself is exercised by every HTTP test."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from client_proxy.api.lingering import _Transport


class Socket:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True


def _writes(steps: Any) -> list[bytes]:
    async def scenario() -> list[bytes]:
        socket = Socket()
        protocol = SimpleNamespace(cycle=None, loop=asyncio.get_running_loop(), lingering=False)
        transport = _Transport(socket, protocol)  # type: ignore[arg-type]
        await steps(transport, protocol)
        await asyncio.sleep(0)  # a loop step: a head still held goes out
        return socket.writes

    return asyncio.run(scenario())


def test_a_response_head_goes_out_with_its_body_in_one_write() -> None:
    async def steps(transport: _Transport, protocol: Any) -> None:
        for n in (1, 2):
            protocol.cycle = SimpleNamespace(response_started=True, more_body=False, disconnected=False)
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n")
            transport.write(b"%d" % n)

    assert _writes(steps) == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2",
    ]


def test_a_100_continue_is_not_held_and_a_lone_head_goes_out_within_the_loop_step() -> None:
    async def steps(transport: _Transport, protocol: Any) -> None:
        protocol.cycle = SimpleNamespace(response_started=False, more_body=False, disconnected=False)
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: straight out
        protocol.cycle.response_started = True
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")  # a stream's head

    assert _writes(steps) == [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    ]


def test_a_held_head_goes_out_before_the_connection_closes() -> None:
    async def steps(transport: _Transport, protocol: Any) -> None:
        protocol.cycle = SimpleNamespace(response_started=True, more_body=False, disconnected=False)
        transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        transport.close()

    assert _writes(steps) == [b"HTTP/1.1 204 No Content\r\n\r\n"]
