"""The lean gRPC client (``client_proxy.triton.grpc_lean``) against a real HTTP/2 gRPC server:
the proxy's own (``grpc_wire``, itself tested against grpcio's client), and a socket that never
answers. Its calls to Triton are tested against the real Triton everywhere else (every
inference over gRPC in the tests goes through it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from client_proxy.api.grpc_calls import Context, Method
from client_proxy.api.grpc_wire import LeanGrpcServer
from client_proxy.triton import grpc_lean
from client_proxy.triton.grpc_lean import CallError, LeanChannel

Request, Response = service_pb2.ModelInferRequest, service_pb2.ModelInferResponse


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Peer:
    """A lean server whose handlers the test watches."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.port = _port()
        self.server = LeanGrpcServer(
            {
                "/t.T/Echo": Method(Request, self.echo),
                "/t.T/Fail": Method(Request, self.fail),
                "/t.T/Slow": Method(Request, self.slow),
            },
            max_message_bytes=64 * 1024 * 1024,
        )

    async def echo(self, request: Any, context: Context) -> Any:
        return Response(id=request.id, raw_output_contents=list(request.raw_input_contents))

    async def fail(self, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.NOT_FOUND, request.id)

    async def slow(self, request: Any, context: Context) -> Any:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return Response(id=request.id)


def scenario(body: Callable[[Peer, LeanChannel], Awaitable[None]], cancel: bool = False) -> None:
    async def run() -> None:
        peer = Peer()
        await peer.server.start("127.0.0.1", peer.port)
        channel = LeanChannel(f"127.0.0.1:{peer.port}", cancel=cancel)
        try:
            await body(peer, channel)
        finally:
            await channel.close()
            await peer.server.stop(grace=0)

    asyncio.run(run())


async def _call(channel: LeanChannel, name: str, request: Any, timeout: float = 5.0) -> Any:
    return Response.FromString(await channel.unary(f"/t.T/{name}", request.SerializeToString(), timeout))


def test_calls_share_one_connection_and_large_messages_pass_flow_control() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        answers = await asyncio.gather(*(_call(channel, "Echo", Request(id=str(i))) for i in range(50)))
        assert [a.id for a in answers] == [str(i) for i in range(50)]
        assert len(peer.server.connections) == 1
        # 6 MiB each way: more than the server's 4 MiB stream window (the client waits for its
        # WINDOW_UPDATE), and more than the client's half window (it sends WINDOW_UPDATEs).
        payload = bytes(range(256)) * (6 * 4096)
        answer = await _call(channel, "Echo", Request(raw_input_contents=[payload]))
        assert answer.raw_output_contents == [payload]

    scenario(body)


def test_a_status_other_than_ok_is_a_call_error_with_its_message() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        with pytest.raises(CallError) as failed:
            await _call(channel, "Fail", Request(id="model 'ünï 100%' is not found"))
        assert failed.value.code == grpc.StatusCode.NOT_FOUND
        assert failed.value.details == "model 'ünï 100%' is not found"
        with pytest.raises(CallError) as unknown:
            await _call(channel, "Nope", Request())
        assert unknown.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert (await _call(channel, "Echo", Request(id="after"))).id == "after"

    scenario(body)


def test_a_call_past_its_deadline_is_abandoned_not_cancelled() -> None:
    # Cancelling can crash Triton 24.10: the call is left to finish and its answer dropped.
    async def body(peer: Peer, channel: LeanChannel) -> None:
        with pytest.raises(CallError) as late:
            await _call(channel, "Slow", Request(), timeout=0.1)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert peer.started.is_set() and channel.abandoned == 1
        peer.release.set()
        await asyncio.wait_for(peer.finished.wait(), 2)
        for _ in range(100):
            if channel.abandoned == 0:
                break
            await asyncio.sleep(0.01)
        assert channel.abandoned == 0 and not peer.cancelled.is_set()
        assert (await _call(channel, "Echo", Request(id="next"))).id == "next"

    scenario(body)


def test_a_caller_that_gives_up_abandons_its_call_too() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        waiter = asyncio.ensure_future(_call(channel, "Slow", Request()))
        await asyncio.wait_for(peer.started.wait(), 2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert channel.abandoned == 1
        peer.release.set()
        await asyncio.wait_for(peer.finished.wait(), 2)
        assert not peer.cancelled.is_set()

    scenario(body)


def test_with_cancel_a_call_given_up_on_is_cancelled_on_the_server() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        with pytest.raises(CallError):
            await _call(channel, "Slow", Request(), timeout=0.1)
        await asyncio.wait_for(peer.cancelled.wait(), 2)
        assert channel.abandoned == 0

    scenario(body, cancel=True)


def test_a_server_that_stops_answers_calls_in_flight_and_new_calls_find_it_gone() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        waiter = asyncio.ensure_future(_call(channel, "Slow", Request(id="in flight")))
        await asyncio.wait_for(peer.started.wait(), 2)
        stopping = asyncio.ensure_future(peer.server.stop(grace=5))
        await asyncio.sleep(0.1)
        peer.release.set()
        assert (await waiter).id == "in flight"
        await stopping
        with pytest.raises(CallError) as gone:
            await _call(channel, "Echo", Request())
        assert gone.value.code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in gone.value.details

    scenario(body)


def test_a_connection_lost_mid_call_fails_it_as_unavailable_and_the_next_call_reconnects() -> None:
    async def body(peer: Peer, channel: LeanChannel) -> None:
        assert (await _call(channel, "Echo", Request(id="first"))).id == "first"
        waiter = asyncio.ensure_future(_call(channel, "Slow", Request()))
        await asyncio.wait_for(peer.started.wait(), 2)
        for connection in list(peer.server.connections):
            assert connection.transport is not None
            connection.transport.abort()
        with pytest.raises(CallError) as lost:
            await waiter
        assert lost.value.code == grpc.StatusCode.UNAVAILABLE
        assert (await _call(channel, "Echo", Request(id="again"))).id == "again"

    scenario(body)


def test_a_server_gone_silent_is_left_after_a_ping_goes_unanswered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_lean, "SILENCE_TIMEOUT_S", 0.2)
    held: list[asyncio.StreamWriter] = []

    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        channel = LeanChannel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            with pytest.raises(CallError) as late:
                await channel.unary("/t.T/Echo", b"", 0.1)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            first = channel._connection
            assert first is not None and not first.closed
            # The PING goes unanswered: the connection is closed 0.2 s later (waited for up to 5 s).
            for _ in range(100):
                if first.closed:
                    break
                await asyncio.sleep(0.05)
            assert first.closed
            with pytest.raises(CallError):
                await channel.unary("/t.T/Echo", b"", 0.1)
            assert channel._connection is not first  # the next call opened another
        finally:
            await channel.close()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_a_connect_cancelled_before_its_first_step_is_forgotten() -> None:
    """The connect a channel shares among its callers, cancelled before it ran (as at a close in
    the same turn): the next call connects afresh instead of waiting on the cancelled one."""

    async def body(peer: Peer, channel: LeanChannel) -> None:
        call = asyncio.ensure_future(_call(channel, "Echo", Request(id="first")))
        await asyncio.sleep(0)  # the call has started the connect, which has not run yet
        connecting = channel._connecting
        assert connecting is not None and not connecting.done()
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)
        assert channel._connecting is None
        assert (await _call(channel, "Echo", Request(id="again"), timeout=2.0)).id == "again"

    scenario(body)
