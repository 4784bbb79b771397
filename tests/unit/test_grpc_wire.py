"""The lean gRPC server (``client_proxy.api.grpc_wire``) against grpcio's own client (the C core
every Python gRPC client uses) and, for what a well-behaved client never sends, raw HTTP/2 frames
over a socket. The door's methods over this server are tested against a real Triton in
tests/test_v2_grpc.py; here the handlers are small ones of the test's own."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from client_proxy import http2 as wire
from client_proxy.api.grpc_calls import Context, Method
from client_proxy.api.grpc_wire import LeanGrpcServer
from client_proxy.http2 import Limits, frame
from tests.rawh2 import Raw
from tests.rawh2 import message as _message

Request, Response = service_pb2.ModelInferRequest, service_pb2.ModelInferResponse
MAX_MESSAGE = 8 * 1024 * 1024


class Handlers:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def echo(self, request: Any, context: Context) -> Any:
        remaining = context.time_remaining()
        return Response(
            id=request.id,
            model_version="none" if remaining is None else f"{remaining:.3f}",
            raw_output_contents=list(request.raw_input_contents),
        )

    async def big(self, request: Any, context: Context) -> Any:
        size = request.parameters["size"].int64_param
        return Response(id=request.id, raw_output_contents=[bytes(i % 251 for i in range(size))])

    async def abort(self, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.NOT_FOUND, request.id)

    async def boom(self, request: Any, context: Context) -> Any:
        raise RuntimeError("a bug")

    async def slow(self, request: Any, context: Context) -> Any:
        self.started.set()
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(id=request.id)

    def methods(self) -> dict[str, Method]:
        return {
            f"/test.T/{name.capitalize()}": Method(Request, getattr(self, name))
            for name in ("echo", "big", "abort", "boom", "slow")
        }


class Running:
    def __init__(self, limits: Limits | None = None, max_connections: int = 1024) -> None:
        self.handlers = Handlers()
        self.server = LeanGrpcServer(
            self.handlers.methods(),
            max_message_bytes=MAX_MESSAGE,
            limits=limits,
            max_connections=max_connections,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.run(self.server.start("127.0.0.1", self.port))

    def run(self, coroutine: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Running]:
    server = Running()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def channel(running: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        f"127.0.0.1:{running.port}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as opened:
        yield opened


def _call(channel: grpc.Channel, name: str, request: Any, **kwargs: Any) -> Any:
    method = channel.unary_unary(
        f"/test.T/{name}",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return method(request, **kwargs)


def test_a_unary_call_round_trips_with_grpcios_client(channel: grpc.Channel) -> None:
    answer = _call(channel, "Echo", Request(id="one", raw_input_contents=[b"\x00\x01", b"abc"]))
    assert answer.id == "one" and list(answer.raw_output_contents) == [b"\x00\x01", b"abc"]
    assert answer.model_version == "none"  # no deadline given


def test_the_clients_deadline_reaches_the_handler(channel: grpc.Channel) -> None:
    answer = _call(channel, "Echo", Request(id="d"), timeout=5.0)
    assert 4.0 < float(answer.model_version) <= 5.1  # grpc's encoding rounds the timeout up a little


def test_many_calls_at_once_on_one_connection(channel: grpc.Channel) -> None:
    futures = [_call_future(channel, Request(id=str(i))) for i in range(200)]
    assert [f.result(timeout=10).id for f in futures] == [str(i) for i in range(200)]


def _call_future(channel: grpc.Channel, request: Any) -> Any:
    method = channel.unary_unary(
        "/test.T/Echo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return method.future(request)


def test_status_codes_and_messages_reach_the_client(channel: grpc.Channel) -> None:
    details = "model 'ünïcode 100%' is not found"
    with pytest.raises(grpc.RpcError) as aborted:
        _call(channel, "Abort", Request(id=details))
    assert aborted.value.code() == grpc.StatusCode.NOT_FOUND and aborted.value.details() == details
    with pytest.raises(grpc.RpcError) as bug:
        _call(channel, "Boom", Request())
    assert bug.value.code() == grpc.StatusCode.INTERNAL and "unexpected error" in bug.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        channel.unary_unary("/test.T/Nope")(b"")
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/test.T/Nope" in unknown.value.details()


def test_large_messages_both_ways_pass_flow_control(channel: grpc.Channel) -> None:
    # 5 MiB in: more than half the stream's window (WINDOW_UPDATEs from the server); 6 MiB out:
    # more than the client's initial window (the server waits for its WINDOW_UPDATEs).
    payload = bytes(range(256)) * (5 * 4096)
    assert _call(channel, "Echo", Request(raw_input_contents=[payload])).raw_output_contents == [payload]
    request = Request(id="big")
    request.parameters["size"].int64_param = 6 * 1024 * 1024
    (out,) = _call(channel, "Big", request).raw_output_contents
    assert len(out) == 6 * 1024 * 1024 and out[:300] == bytes(i % 251 for i in range(300))


def test_a_compressed_request_is_decompressed(channel: grpc.Channel) -> None:
    payload = b"iris " * 10_000
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        answer = _call(channel, "Echo", Request(raw_input_contents=[payload]), compression=compression)
        assert answer.raw_output_contents == [payload]


def test_a_message_over_the_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _call(channel, "Echo", Request(raw_input_contents=[b"x" * (MAX_MESSAGE + 1)]))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    zipped = Request(raw_input_contents=[b"\x00" * (MAX_MESSAGE + 1)])  # small on the wire
    with pytest.raises(grpc.RpcError) as inflated:
        _call(channel, "Echo", zipped, compression=grpc.Compression.Gzip)
    assert inflated.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _call(channel, "Echo", Request(id="after")).id == "after"  # the connection goes on


def test_a_call_the_client_gives_up_on_is_cancelled_in_the_server(
    running: Running, channel: grpc.Channel
) -> None:
    with pytest.raises(grpc.RpcError) as late:
        _call(channel, "Slow", Request(), timeout=0.2)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert running.handlers.started.is_set()
    assert running.handlers.cancelled.wait(2), "the handler still runs after the client's RST_STREAM"
    assert _call(channel, "Echo", Request(id="next")).id == "next"


# -- raw frames -----------------------------------------------------------------------------------


@pytest.fixture
def raw(running: Running) -> Iterator[Raw]:
    client = Raw(running.port)
    yield client
    client.close()


def test_padding_priority_and_continuation_frames_are_understood(raw: Raw) -> None:
    block = raw.block()
    padded = b"\x03" + b"\x80\x00\x00\x00\x10" + block[:5] + b"\x00\x00\x00"  # pad 3, priority
    data = _message(Request(id="padded"))
    raw.send(
        frame(wire.HEADERS, wire.PADDED | wire.PRIORITY_FLAG, 1, padded),
        frame(wire.CONTINUATION, wire.END_HEADERS, 1, block[5:]),
        frame(wire.DATA, wire.PADDED | wire.END_STREAM, 1, b"\x02" + data + b"\x00\x00"),
    )
    headers, body, reset = raw.answer(1)
    assert reset is None and headers[b":status"] == b"200" and headers[b"grpc-status"] == b"0"
    assert Response.FromString(body[5:]).id == "padded"


def test_a_ping_is_acknowledged_with_its_payload(raw: Raw) -> None:
    raw.send(frame(wire.PING, 0, 0, b"12345678"))
    while (got := raw.next_frame()) is not None and got[0] != wire.PING:
        pass
    assert got == (wire.PING, wire.ACK, 0, b"12345678")


def test_a_unary_call_with_two_messages_is_refused(raw: Raw) -> None:
    data = _message(Request(id="a")) + _message(Request(id="b"))
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 1, raw.block()), frame(wire.DATA, wire.END_STREAM, 1, data)
    )
    headers, _, _ = raw.answer(1)
    assert headers[b"grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0]).encode()
    assert b"exactly one message" in headers[b"grpc-message"]


def test_a_request_that_is_not_grpc_gets_415(raw: Raw) -> None:
    raw.send(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, raw.block(content_type="text/plain")))
    headers, _, _ = raw.answer(1)
    assert headers[b":status"] == b"415"


def test_an_answer_waits_for_the_clients_window(running: Running) -> None:
    # The client allows 100 bytes per stream: the answer stops there until a WINDOW_UPDATE.
    client = Raw(running.port, settings=(4).to_bytes(2, "big") + (100).to_bytes(4, "big"))
    try:
        request = Request(id="w")
        request.parameters["size"].int64_param = 1000
        client.send(
            frame(wire.HEADERS, wire.END_HEADERS, 1, client.block("/test.T/Big")),
            frame(wire.DATA, wire.END_STREAM, 1, _message(request)),
        )
        received = 0
        client.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            while (got := client.next_frame()) is not None:
                if got[0] == wire.DATA:
                    received += len(got[3])
        assert received == 100
        client.sock.settimeout(5)
        client.send(frame(wire.WINDOW_UPDATE, 0, 1, (2000).to_bytes(4, "big")))
        headers, body, _ = client.answer(1)
        assert headers[b"grpc-status"] == b"0" and received + len(body) > 1000
    finally:
        client.close()


def test_not_http2_is_told_so_and_closed(running: Running) -> None:
    client = Raw(running.port, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        got = client.next_frame()
        while got is not None and got[0] != wire.GOAWAY:  # the server's SETTINGS and WINDOW_UPDATE first
            got = client.next_frame()
        assert got is not None
        assert int.from_bytes(got[3][4:8], "big") == wire.PROTOCOL_ERROR
        assert client.next_frame() is None  # closed
    finally:
        client.close()


def test_a_stop_answers_calls_in_flight_and_refuses_new_ones(running: Running, raw: Raw) -> None:
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 1, raw.block("/test.T/Slow")),
        frame(wire.DATA, wire.END_STREAM, 1, _message(Request(id="in flight"))),
    )
    assert running.handlers.started.wait(5)
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(grace=5), running.loop)
    goaway = None
    while goaway is None and (got := raw.next_frame()) is not None:
        goaway = got if got[0] == wire.GOAWAY else None
    assert goaway is not None and int.from_bytes(goaway[3][:4], "big") == 1  # the last stream served
    raw.send(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 3, raw.block()))
    _, _, reset = raw.answer(3)
    assert reset == wire.REFUSED_STREAM
    time.sleep(0.1)
    running.handlers.release.set()
    headers, body, _ = raw.answer(1)
    assert headers[b"grpc-status"] == b"0" and Response.FromString(body[5:]).id == "in flight"
    stopping.result(5)
    assert raw.next_frame() is None  # then the connection is closed


def test_a_header_block_of_table_references_means_what_the_table_says_now(raw: Raw) -> None:
    # The server decodes a block of references once and keeps the result; the same bytes must be
    # decoded afresh once the client's table has changed. Hand-made HPACK blocks (RFC 7541):
    def string(value: bytes) -> bytes:
        return bytes([len(value)]) + value

    def indexing(name_index: int, value: bytes) -> bytes:  # literal, added to the table
        return bytes([0x40 | name_index]) + string(value)

    def call(stream: int, block: bytes) -> dict[bytes, bytes]:
        raw.send(
            frame(wire.HEADERS, wire.END_HEADERS, stream, block),
            frame(wire.DATA, wire.END_STREAM, stream, _message(Request(id=f"call {stream}"))),
        )
        headers, _, _ = raw.answer(stream)
        return headers

    method_scheme = b"\x83\x86"  # :method POST, :scheme http (static entries 3 and 6)
    te = b"\x40" + string(b"te") + string(b"trailers")
    first = method_scheme + indexing(4, b"/test.T/Echo") + indexing(31, b"application/grpc") + te
    # The table is now 62 te, 63 content-type, 64 :path Echo; this block is references alone:
    references = method_scheme + bytes([0x80 | 64, 0x80 | 63, 0x80 | 62])
    assert call(1, first)[b"grpc-status"] == b"0"
    assert call(3, references)[b"grpc-status"] == b"0"  # Echo
    assert call(5, references)[b"grpc-status"] == b"0"  # Echo again, from what was kept
    # Three new entries: 62 content-type, 63 te, 64 :path Abort. The same bytes now say Abort
    # (and still in an order HTTP/2 allows: the pseudo-header first).
    call(7, method_scheme + indexing(4, b"/test.T/Abort") + te + indexing(31, b"application/grpc"))
    aborted = call(9, references)
    assert aborted[b"grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0]).encode()
    assert aborted[b"grpc-message"] == b"call 9"


# -- RFC 9113's rules, and what one client may cost (issue 30) -----------------------------------


def test_a_second_headers_on_a_call_whose_request_ended_resets_it_and_cancels_its_handler(
    running: Running, raw: Raw
) -> None:
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 1, raw.block("/test.T/Slow")),
        frame(wire.DATA, wire.END_STREAM, 1, _message(Request(id="slow"))),
    )
    assert running.handlers.started.wait(5)
    trailers = bytes(raw.encoder.encode([("x-late", "1")]))
    raw.send(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, trailers))
    _, _, reset = raw.answer(1)
    assert reset == wire.STREAM_CLOSED
    assert running.handlers.cancelled.wait(5)
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 3, raw.block()),
        frame(wire.DATA, wire.END_STREAM, 3, _message(Request(id="next"))),
    )
    headers, _, _ = raw.answer(3)
    assert headers[b"grpc-status"] == b"0"  # the connection serves on


@pytest.mark.parametrize(
    "extra",
    [
        [("X-Upper", "1")],
        [("connection", "keep-alive")],
        [("transfer-encoding", "chunked")],
        [("te", "gzip")],
        [("upgrade", "h2c")],
    ],
    ids=["uppercase", "connection", "transfer-encoding", "te-not-trailers", "upgrade"],
)
def test_a_malformed_request_is_reset_with_protocol_error(raw: Raw, extra: list[tuple[str, str]]) -> None:
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 1, raw.block(extra=extra)),
        frame(wire.DATA, wire.END_STREAM, 1, _message(Request())),
    )
    _, _, reset = raw.answer(1)
    assert reset == wire.PROTOCOL_ERROR
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 3, raw.block()),
        frame(wire.DATA, wire.END_STREAM, 3, _message(Request())),
    )
    headers, _, _ = raw.answer(3)
    assert headers[b"grpc-status"] == b"0"


def test_a_pseudo_header_after_a_regular_field_is_malformed(raw: Raw) -> None:
    block = bytes(
        raw.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                ("content-type", "application/grpc"),
                (":path", "/test.T/Echo"),
            ]
        )
    )
    raw.send(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, block))
    assert raw.answer(1)[2] == wire.PROTOCOL_ERROR


def test_a_stream_that_depends_on_itself_is_reset(raw: Raw) -> None:
    raw.send(frame(wire.PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x10"))
    assert raw.answer(1)[2] == wire.PROTOCOL_ERROR
    priority = (3).to_bytes(4, "big") + b"\x10"
    raw.send(frame(wire.HEADERS, wire.END_HEADERS | wire.PRIORITY_FLAG, 3, priority + raw.block()))
    assert raw.answer(3)[2] == wire.PROTOCOL_ERROR
    raw.send(
        frame(wire.HEADERS, wire.END_HEADERS, 5, raw.block()),
        frame(wire.DATA, wire.END_STREAM, 5, _message(Request())),
    )
    assert raw.answer(5)[0][b"grpc-status"] == b"0"  # and the HPACK table followed the refused block


def test_enable_push_other_than_0_or_1_is_a_connection_error(running: Running) -> None:
    client = Raw(running.port, settings=wire.SETTING.pack(wire.SETTINGS_ENABLE_PUSH, 2))
    try:
        assert client.goaway()[0] == wire.PROTOCOL_ERROR
    finally:
        client.close()


@pytest.mark.parametrize(
    "flood",
    [
        frame(wire.PING, 0, 0, b"12345678"),
        frame(wire.SETTINGS, 0, 0),
        frame(wire.PRIORITY, 0, 9, (7).to_bytes(4, "big") + b"\x10"),
        frame(0x42, 0, 0, b"unknown"),
        frame(wire.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")),
        frame(wire.RST_STREAM, 0, 1, (8).to_bytes(4, "big")),
    ],
    ids=["ping", "settings", "priority", "unknown-type", "window-update", "reset-of-a-closed-stream"],
)
def test_a_flood_of_frames_that_carry_no_call_ends_with_enhance_your_calm(
    running: Running, flood: bytes
) -> None:
    client = Raw(running.port)
    try:
        client.send(
            frame(wire.HEADERS, wire.END_HEADERS, 1, client.block()),
            frame(wire.DATA, wire.END_STREAM, 1, _message(Request())),
        )
        assert client.answer(1)[0][b"grpc-status"] == b"0"
        client.send(flood * (running.server.limits.control_frames + 50))
        code, debug = client.goaway()
        assert code == wire.ENHANCE_YOUR_CALM, debug
    finally:
        client.close()


def test_empty_data_frames_and_continuations_are_budgeted(running: Running) -> None:
    client = Raw(running.port)
    try:
        client.send(frame(wire.HEADERS, wire.END_HEADERS, 1, client.block()))
        client.send(frame(wire.DATA, 0, 1) * 1100)
        assert client.goaway()[0] == wire.ENHANCE_YOUR_CALM
    finally:
        client.close()
    client = Raw(running.port)
    try:
        block = client.block()
        client.send(
            frame(wire.HEADERS, 0, 1, block[:1]), *(frame(wire.CONTINUATION, 0, 1, b"") for _ in range(40))
        )
        assert client.goaway()[0] == wire.ENHANCE_YOUR_CALM
    finally:
        client.close()


def test_rapid_resets_beyond_the_budget_end_the_connection() -> None:
    server = Running(limits=Limits(resets=100))
    try:
        client = Raw(server.port)
        frames = []
        for i in range(200):
            stream = 1 + 2 * i
            frames += [
                frame(wire.HEADERS, wire.END_HEADERS, stream, client.block("/test.T/Slow")),
                frame(wire.RST_STREAM, 0, stream, (8).to_bytes(4, "big")),
            ]
        client.send(*frames)
        assert client.goaway()[0] == wire.ENHANCE_YOUR_CALM
        client.close()
    finally:
        server.close()


def test_a_connection_holds_no_more_unconsumed_request_bytes_than_its_window() -> None:
    """Requests never finished do not get their window back: a client that sends past it has
    broken flow control (FLOW_CONTROL_ERROR), so what the server holds is bounded."""
    window = 2 * (MAX_MESSAGE + 5) + 65_536
    server = Running(limits=Limits(connection_window=window))
    try:
        client = Raw(server.port, settings=wire.SETTING.pack(wire.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20))
        chunk = b"\0" * 16_384
        frames = []
        for i in range(window // (16_384 * 64) + 2):
            stream = 1 + 2 * i
            frames.append(frame(wire.HEADERS, wire.END_HEADERS, stream, client.block()))
            frames += [frame(wire.DATA, 0, stream, chunk)] * 64  # 1 MiB each, never ended
        client.send(*frames)
        assert client.goaway()[0] == wire.FLOW_CONTROL_ERROR
        client.close()
        # A request that ends gives its bytes back: many more than the window, one after another.
        client = Raw(server.port)
        body = _message(Request(model_name="x" * 1_000_000))  # not echoed: the answer is small
        for i in range(3 * window // len(body)):
            stream = 1 + 2 * i
            pieces = [body[k : k + 16_384] for k in range(0, len(body), 16_384)]
            client.send(
                frame(wire.HEADERS, wire.END_HEADERS, stream, client.block()),
                *(frame(wire.DATA, 0, stream, p) for p in pieces[:-1]),
                frame(wire.DATA, wire.END_STREAM, stream, pieces[-1]),
            )
            assert client.answer(stream)[0][b"grpc-status"] == b"0"
        client.close()
    finally:
        server.close()


def test_a_silent_connection_is_closed_at_the_handshake_timeout_and_an_idle_one_at_the_idle_timeout() -> None:
    server = Running(limits=Limits(handshake_timeout=0.3, idle_timeout=0.3))
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        data = b""
        while chunk := silent.recv(65536):  # SETTINGS, then GOAWAY, then the end
            data += chunk
        kinds, position = [], 0
        while position < len(data):  # the frames it was sent: SETTINGS, WINDOW_UPDATE, GOAWAY
            length, kind = int.from_bytes(data[position : position + 3], "big"), data[position + 3]
            kinds.append(kind)
            payload, position = data[position + 9 : position + 9 + length], position + 9 + length
        assert kinds[-1] == wire.GOAWAY and int.from_bytes(payload[4:8], "big") == wire.PROTOCOL_ERROR
        assert payload[8:] == b"no connection preface and SETTINGS in time"
        silent.close()
        idle = Raw(server.port)
        idle.send(
            frame(wire.HEADERS, wire.END_HEADERS, 1, idle.block()),
            frame(wire.DATA, wire.END_STREAM, 1, _message(Request())),
        )
        assert idle.answer(1)[0][b"grpc-status"] == b"0"
        assert idle.goaway()[0] == wire.NO_ERROR
        idle.close()
    finally:
        server.close()


def test_connections_beyond_the_limit_are_told_so_and_closed() -> None:
    server = Running(max_connections=2)
    try:
        kept = [Raw(server.port), Raw(server.port)]
        for client in kept:
            client.send(frame(wire.PING, 0, 0, b"pingpong"))
            assert client.next_frame() is not None
        extra = Raw(server.port)
        assert extra.goaway()[0] == wire.ENHANCE_YOUR_CALM
        extra.close()
        kept[0].close()
        time.sleep(0.2)
        again = Raw(server.port)
        again.send(
            frame(wire.HEADERS, wire.END_HEADERS, 1, again.block()),
            frame(wire.DATA, wire.END_STREAM, 1, _message(Request())),
        )
        assert again.answer(1)[0][b"grpc-status"] == b"0"
        again.close()
        kept[1].close()
    finally:
        server.close()


def test_a_well_behaved_client_is_never_cut_off_by_the_budgets() -> None:
    """grpcio's client (the C core perf_analyzer and every Python client use) sends two
    WINDOW_UPDATEs per call, and PINGs and SETTINGS of its own: with budgets of 100, a thousand
    calls on one connection, one after another and many at once, all answered."""
    server = Running(limits=Limits(control_frames=100, resets=100))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for i in range(500):
                assert _call(channel, "Echo", Request(id=str(i))).id == str(i)
            futures = [
                channel.unary_unary(
                    "/test.T/Echo",
                    request_serializer=Request.SerializeToString,
                    response_deserializer=Response.FromString,
                ).future(Request(id=str(i)))
                for i in range(500)
            ]
            assert [f.result(timeout=30).id for f in futures] == [str(i) for i in range(500)]
        assert server.server.refused == 0
    finally:
        server.close()
