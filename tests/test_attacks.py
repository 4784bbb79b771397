"""Hostile and careless clients against the proxy as ``make run`` starts it (``python -m
client_proxy`` in front of the real embedded Triton): one client must never break or starve the
proxy for the others.

Each attack is a bounded loop of raw HTTP/2 frames on 127.0.0.1 (``tests/rawh2.py``) while a
probe beside it calls ``ModelInfer iris_fanout`` on the gRPC door and ``POST /predict/label`` on
the HTTP port. Each test asserts what the README's Security section promises: the probe is
answered throughout, its p99 under 100 ms or twice its p99 with no attack (whichever is larger),
the attacker's connection ends with the right GOAWAY within a second of spending its budget, and
the proxy's memory grows by less than 64 MB per attacking connection.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from client_proxy import http2 as wire
from client_proxy.http2 import frame
from local_triton import TritonServer, free_ports
from tests.helpers import proxy_process, services_on, settings
from tests.rawh2 import Raw, message

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

INFER = "/inference.GRPCInferenceService/ModelInfer"
#: How long each flood runs beside the probe.
ATTACK_S = 2.0
MB = 1024 * 1024


@dataclass
class Door:
    url: str
    grpc_port: int
    pid: int

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def _door(triton: TritonServer, server: str) -> Iterator[Door]:
    (grpc_port,) = free_ports(1)
    chosen = settings(
        grpc_port=grpc_port,
        grpc_server=server,
        grpc_handshake_timeout_ms=1000,
        grpc_max_connections=300,
        http_header_timeout_ms=1000,
        http_max_connections=300,
    )
    with proxy_process(chosen, services_on(triton, "grpc")) as (url, process):
        yield Door(url, grpc_port, process.pid)
        assert process.poll() is None, "the proxy died during the attacks"


@pytest.fixture(scope="module")
def lean(triton: TritonServer) -> Iterator[Door]:
    yield from _door(triton, "lean")


@pytest.fixture(scope="module")
def grpcio_door(triton: TritonServer) -> Iterator[Door]:
    yield from _door(triton, "grpcio")


def _infer_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="iris_fanout")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32).tobytes())
    return request


def _probe_calls(url: str, grpc_port: int, stop: Any, results: Any, count: int = 0) -> None:
    """A well-behaved client of both doors, calling every 20 ms (``count`` rounds, or until
    ``stop`` is set): run in a process of its own, so that the attacker's Python (which holds
    this process's GIL) is not what it measures. Sends (latencies, failures) to ``results``."""
    latencies: list[float] = []
    failures: list[str] = []
    body = {"data": [[5.1, 3.5, 1.4, 0.2]]}
    with (
        grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        httpx.Client(base_url=url, timeout=5) as client,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        rounds = 0
        while not stop.is_set() and (count == 0 or rounds < count):
            rounds += 1
            started = time.perf_counter()
            try:
                stub.ModelInfer(_infer_request(), timeout=5)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError as exc:
                failures.append(f"gRPC {exc.code()}: {exc.details()}")
            started = time.perf_counter()
            try:
                answer = client.post("/predict/label", json=body)
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(f"HTTP {answer.status_code}: {answer.text}")
            except httpx.HTTPError as exc:
                failures.append(f"HTTP {exc!r}")
            if rounds == 1:
                results.put(("ready", None))  # connected: the attack may start
            time.sleep(0.02)
    results.put((latencies, failures))


class Probe:
    """``_probe_calls`` in a process of its own (spawned: the test process runs grpc's threads)."""

    def __init__(self, door: Door, count: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(
            target=_probe_calls,
            args=(door.url, door.grpc_port, self._stop, self._results, count),
            daemon=True,
        )
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def __enter__(self) -> Probe:
        self._process.start()
        first = self._results.get(timeout=60)
        assert first == ("ready", None), first
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.latencies, self.failures = self._results.get(timeout=60)
        self._process.join(10)

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def _idle_p99(door: Door) -> float:
    with Probe(door, count=30) as probe:
        pass
    assert not probe.failures, probe.failures
    return probe.p99()


def _beside_a_probe(door: Door, attack: Callable[[], None]) -> Probe:
    """Runs ``attack`` (until it returns) with the probe beside it; the probe's record."""
    idle = _idle_p99(door)
    with Probe(door) as probe:
        attack()
        time.sleep(0.5)  # and after it
    assert not probe.failures, probe.failures[:5]
    assert len(probe.latencies) >= 6, "the probe was starved"
    bound = max(0.1, 2 * idle)
    assert probe.p99() < bound, (
        f"probe p99 {probe.p99() * 1000:.1f} ms under attack, bound {bound * 1000:.1f} ms"
    )
    return probe


def _settled(client: Raw) -> None:
    """A normal call first, so that the connection is known to work before it misbehaves."""
    client.send(
        frame(wire.HEADERS, wire.END_HEADERS, 1, client.block(INFER)),
        frame(wire.DATA, wire.END_STREAM, 1, message(_infer_request())),
    )
    headers, _, reset = client.answer(1)
    assert reset is None and headers[b"grpc-status"] == b"0", headers


def _until_goaway(door: Door, flood: bytes, opened: bool = False) -> float:
    """One attacking connection: ``flood`` sent at once (with ``opened``, after a call on stream 3
    has started), then the GOAWAY read: the seconds from the end of the sending to it."""
    client = Raw(door.grpc_port)
    try:
        _settled(client)
        if opened:
            client.send(frame(wire.HEADERS, wire.END_HEADERS, 3, client.block(INFER)))
        return _calmed(client, flood)
    finally:
        client.close()


def _calmed(client: Raw, flood: bytes) -> float:
    """``flood`` sent at once; the server must answer GOAWAY ENHANCE_YOUR_CALM within a second of
    the end of the sending (the budget was spent by then). The seconds it took."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.sock.sendall(flood)
    sent = time.monotonic()
    code, debug = client.goaway()
    assert code == wire.ENHANCE_YOUR_CALM, debug
    took = client.goaway_at - sent
    assert took < 1.0, f"the attacker's connection was told {took:.2f} s after its flood"
    return took


def _repeatedly(door: Door, flood: bytes, opened: bool = False) -> Callable[[], None]:
    def attack() -> None:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            _until_goaway(door, flood, opened)

    return attack


BUDGET = 1000  # PROXY_GRPC_MAX_CONTROL_FRAMES and PROXY_GRPC_MAX_RESETS, the defaults

FLOODS = {
    "ping": frame(wire.PING, 0, 0, b"12345678"),
    "settings": frame(wire.SETTINGS, 0, 0),
    "empty-data": frame(wire.DATA, 0, 3, b""),  # on a call whose request goes on
    "priority": frame(wire.PRIORITY, 0, 9, (7).to_bytes(4, "big") + b"\x10"),
    "unknown-type": frame(0x42, 0, 0, b"x"),
    "window-update": frame(wire.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")),
    "reset-closed-stream": frame(wire.RST_STREAM, 0, 1, (8).to_bytes(4, "big")),
}


@pytest.mark.parametrize("kind", FLOODS)
def test_a_frame_flood_is_cut_off_and_starves_no_one(lean: Door, kind: str) -> None:
    before = lean.rss()
    _beside_a_probe(lean, _repeatedly(lean, FLOODS[kind] * (BUDGET * 2), opened=kind == "empty-data"))
    assert lean.rss() - before < 64 * MB


@pytest.mark.parametrize("kind", FLOODS)
def test_a_frame_flood_against_grpcios_server_starves_no_one(grpcio_door: Door, kind: str) -> None:
    """``PROXY_GRPC_SERVER=grpcio``: grpcio's own limits hold (it closes some floods, absorbs
    others); what is asserted is that the other clients are served and memory stays bounded."""
    before = grpcio_door.rss()

    def attack() -> None:
        end = time.monotonic() + ATTACK_S
        connections = 0
        while time.monotonic() < end:
            client = Raw(grpcio_door.grpc_port)
            connections += 1
            try:
                _settled(client)
                if kind == "empty-data":
                    client.send(frame(wire.HEADERS, wire.END_HEADERS, 3, client.block(INFER)))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    client.sock.sendall(FLOODS[kind] * (BUDGET * 2))
                client.sock.settimeout(0.3)
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    while client.next_frame() is not None:
                        pass
            finally:
                client.close()
        assert grpcio_door.rss() - before < 64 * MB * connections

    _beside_a_probe(grpcio_door, attack)


def test_a_continuation_flood_is_cut_off(lean: Door) -> None:
    def attack() -> None:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            client = Raw(lean.grpc_port)
            try:
                _settled(client)
                block = client.block(INFER)
                flood = frame(wire.HEADERS, 0, 3, block[:1]) + frame(wire.CONTINUATION, 0, 3, b"") * 5000
                _calmed(client, flood)
            finally:
                client.close()

    _beside_a_probe(lean, attack)


def _rapid_reset(door: Door, count: int, pause: float | None = 0.003) -> int:
    """``count`` ModelInfer calls to iris_fanout, each reset ``pause`` seconds after it is sent (in
    rounds of 100: by then the calls wait in the coalescer, the wedge's condition) or, with None,
    in the same write (CVE-2023-44487's rapid reset), over as many connections as the server's
    reset budget takes: how many."""
    body = message(_infer_request())
    left = count
    connections = 0
    client: Raw | None = None
    stream = 1
    try:
        while left > 0:
            if client is None:
                client, stream = Raw(door.grpc_port), 1
                connections += 1
                client.sock.settimeout(1.0)
            calls, resets = [], []
            for _ in range(min(left, 100)):
                calls += [
                    frame(wire.HEADERS, wire.END_HEADERS, stream, client.block(INFER)),
                    frame(wire.DATA, wire.END_STREAM, stream, body),
                ]
                resets.append(frame(wire.RST_STREAM, 0, stream, (wire.CANCEL).to_bytes(4, "big")))
                stream += 2
            left -= len(resets)
            try:
                if pause is None:
                    client.sock.sendall(
                        b"".join(h + d + r for h, d, r in zip(calls[::2], calls[1::2], resets, strict=True))
                    )
                else:
                    client.sock.sendall(b"".join(calls))
                    time.sleep(pause)
                    client.sock.sendall(b"".join(resets))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                client.close()  # the budget was spent: GOAWAY, and a new connection
                client = None
        if client is not None:  # what the server still says, to the GOAWAY (the budget) or the end
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while client.next_frame() is not None:
                    pass
    finally:
        if client is not None:
            client.close()
    return connections


def _answers_at_once(door: Door) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{door.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(_infer_request(), timeout=2)
        assert response.model_name == "iris_fanout"
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
    answer = httpx.post(f"{door.url}/v2/models/iris_fanout/infer", json=body, timeout=2)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("server", ["lean", "grpcio"])
def test_rapid_resets_leave_the_fan_out_answering(server: str, request: pytest.FixtureRequest) -> None:
    """The wedge of issue 30: bursts of 1,500-5,000 calls reset right after they are sent left
    iris_fanout answering DEADLINE_EXCEEDED for good. Ten bursts; after each, both doors answer."""
    door: Door = request.getfixturevalue("lean" if server == "lean" else "grpcio_door")
    before = door.rss()
    rng = random.Random(30)
    connections = 0
    for _ in range(10):
        connections += _rapid_reset(door, rng.randint(1500, 5000))
        _answers_at_once(door)
    assert door.rss() - before < 64 * MB * connections


def test_rapid_resets_starve_no_one(lean: Door) -> None:
    def attack() -> None:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            _rapid_reset(lean, 1500, pause=None)

    _beside_a_probe(lean, attack)


def _parked_streams(door: Door, streams: int) -> Raw:
    """A connection whose window for answers is 0, with ``streams`` answered calls held back by it."""
    client = Raw(door.grpc_port, settings=wire.SETTING.pack(wire.SETTINGS_INITIAL_WINDOW_SIZE, 0))
    live = "/inference.GRPCInferenceService/ServerLive"
    body = message(service_pb2.ServerLiveRequest())
    frames = []
    for i in range(streams):
        stream = 1 + 2 * i
        frames += [
            frame(wire.HEADERS, wire.END_HEADERS, stream, client.block(live)),
            frame(wire.DATA, wire.END_STREAM, stream, body),
        ]
    client.send(*frames)
    time.sleep(0.3)  # answered, and every answer waiting for a window
    return client


def test_window_games_on_many_held_streams_cost_what_they_send(lean: Door) -> None:
    """SETTINGS frames of 2,730 window entries, and WINDOW_UPDATEs of one byte on 1,024 streams
    whose answers wait: work in proportion to what is sent, charged to the budget."""

    def settings_game() -> None:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            client = _parked_streams(lean, 1000)
            try:
                entries = b"".join(
                    wire.SETTING.pack(wire.SETTINGS_INITIAL_WINDOW_SIZE, v % 2) for v in range(2730)
                )
                _calmed(client, frame(wire.SETTINGS, 0, 0, entries) * 40)
            finally:
                client.close()

    def window_game() -> None:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            client = _parked_streams(lean, 1000)
            try:
                updates = b"".join(
                    frame(wire.WINDOW_UPDATE, 0, 1 + 2 * i, (1).to_bytes(4, "big")) for i in range(1000)
                )
                _calmed(client, updates * 3)
            finally:
                client.close()

    _beside_a_probe(lean, settings_game)
    _beside_a_probe(lean, window_game)


def test_unfinished_request_bodies_hold_a_bounded_amount_of_memory(lean: Door) -> None:
    """Two connections each start 1,024 calls whose 1 MB bodies never end: each connection may
    make the proxy hold its window (PROXY_GRPC_CONNECTION_WINDOW), not a gigabyte."""
    before = lean.rss()
    attackers = []
    chunk = frame(wire.DATA, 0, 0, b"\0" * 16_384)[:5]  # a frame head, stream patched below
    try:
        for _ in range(2):
            client = Raw(lean.grpc_port)
            client.sock.settimeout(0.5)
            attackers.append(client)

        def fill(client: Raw) -> None:
            for i in range(1024):
                stream = 1 + 2 * i
                frames = [frame(wire.HEADERS, wire.END_HEADERS, stream, client.block(INFER))]
                head = chunk + stream.to_bytes(4, "big")
                frames += [head + b"\0" * 16_384] * 64
                try:
                    client.sock.sendall(b"".join(frames))
                except (TimeoutError, BrokenPipeError, ConnectionResetError):
                    return  # the server stopped reading or closed: the window is spent

        def attack() -> None:
            for client in attackers:
                fill(client)

        _beside_a_probe(lean, attack)
        grown = lean.rss() - before
        assert grown < 64 * MB * len(attackers), f"{grown / MB:.0f} MB held"
    finally:
        for client in attackers:
            client.close()


def test_idle_and_silent_connections_are_bounded_and_closed(lean: Door) -> None:
    """400 connections that never send a preface: those beyond PROXY_GRPC_MAX_CONNECTIONS (300 in
    this test) are refused at once, the others closed at the handshake timeout (1 s here)."""

    def attack() -> None:
        sockets = [socket.create_connection(("127.0.0.1", lean.grpc_port), timeout=5) for _ in range(400)]
        try:
            ended = 0
            deadline = time.monotonic() + 5
            for sock in sockets:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                data = b""
                try:
                    while chunk := sock.recv(65536):
                        data += chunk
                except (TimeoutError, ConnectionResetError):
                    continue
                ended += b"too many connections" in data or b"no connection preface" in data
            assert ended == len(sockets)
        finally:
            for sock in sockets:
                sock.close()

    _beside_a_probe(lean, attack)


# -- HTTP/1.1 (uvicorn with the proxy's guards, client_proxy/api/lingering.py) ---------------------

BODY = b'{"data": [[5.1, 3.5, 1.4, 0.2]]}'
REQUEST = (
    b"POST /predict/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
)


@contextlib.contextmanager
def _connections(door: Door, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to the HTTP port, closed afterwards."""
    port = int(door.url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _read_to_end(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when that was."""
    sock.settimeout(within)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic()


def test_slow_heads_are_answered_408_at_the_header_timeout_and_starve_no_one(lean: Door) -> None:
    """Slowloris: 200 connections send a request's head a byte every 100 ms; each is answered
    408 and closed about a second (PROXY_HTTP_HEADER_TIMEOUT_MS here) after it began."""

    def attack() -> None:
        with _connections(lean, 200) as sockets:
            started = time.monotonic()
            for sock in sockets:
                sock.sendall(b"POST /predict/label HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - started < 2.5:
                for sock in sockets:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                time.sleep(0.1)
            for sock in sockets:
                data, ended = _read_to_end(sock, 2.0)
                assert data.startswith(b"HTTP/1.1 408 "), data[:100]
                assert ended - started < 3.0

    _beside_a_probe(lean, attack)


def test_silent_connections_are_closed_at_the_header_timeout(lean: Door) -> None:
    def attack() -> None:
        with _connections(lean, 200) as sockets:
            started = time.monotonic()
            for sock in sockets:
                data, ended = _read_to_end(sock, 3.0)
                assert data == b"" and ended - started < 2.5  # nothing began: closed without a word

    _beside_a_probe(lean, attack)


@pytest.mark.parametrize(
    "head",
    [
        b"".join(b"X-H%d: v\r\n" % i for i in range(200_000)),
        b"X-Big: " + b"v" * (1 << 20) + b"\r\n",
    ],
    ids=["200000-fields", "one-1MB-field"],
)
def test_oversized_heads_are_answered_431(lean: Door, head: bytes) -> None:
    before = lean.rss()
    with _connections(lean, 1) as (sock,):
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(b"POST /predict/label HTTP/1.1\r\nHost: x\r\n" + head)
        data, _ = _read_to_end(sock, 5.0)
        assert data.startswith(b"HTTP/1.1 431 "), data[:100]
        assert b"headers_too_large" in data
    assert lean.rss() - before < 64 * MB
    assert httpx.post(f"{lean.url}/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200


def test_connections_beyond_the_limit_are_answered_503(lean: Door) -> None:
    """PROXY_HTTP_MAX_CONNECTIONS (300 here): 400 connections at once, the last ones refused at
    once with 503; the probe, whose connection was open before, is served throughout."""

    def attack() -> None:
        with _connections(lean, 400) as sockets:
            refused = 0
            for sock in sockets[-50:]:
                data, _ = _read_to_end(sock, 0.5)
                refused += data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data
            assert refused == 50

    _beside_a_probe(lean, attack)


def test_pipelined_requests_are_all_answered_and_starve_no_one(lean: Door) -> None:
    def attack() -> None:
        with _connections(lean, 1) as (sock,):
            sock.sendall(REQUEST * 2000)
            sock.settimeout(30)
            data = b""
            while data.count(b"HTTP/1.1 200 ") < 2000:
                chunk = sock.recv(1 << 20)
                assert chunk, f"closed after {data.count(b'HTTP/1.1 ')} answers"
                data += chunk
            assert data.count(b"HTTP/1.1 ") == 2000

    _beside_a_probe(lean, attack)


def test_slow_bodies_are_answered_408_at_the_deadline(lean: Door) -> None:
    """A body that trickles in is the request's deadline's business (PROXY_DEADLINE_MS, 2 s)."""

    def attack() -> None:
        with _connections(lean, 100) as sockets:
            started = time.monotonic()
            for sock in sockets:
                sock.sendall(REQUEST[: -len(BODY) + 3])
            for sock in sockets:
                sock.settimeout(5)
                data = sock.recv(65536)
                assert data.startswith(b"HTTP/1.1 408 "), data[:100]
            assert time.monotonic() - started < 4.5

    _beside_a_probe(lean, attack)


def test_idle_keep_alive_connections_are_closed(lean: Door) -> None:
    """200 connections each make a request and then say nothing: uvicorn's keep-alive timeout
    (5 s) closes them."""
    with _connections(lean, 200) as sockets:
        for sock in sockets:
            sock.sendall(REQUEST)
        started = time.monotonic()
        for sock in sockets:
            data, ended = _read_to_end(sock, 10.0)
            assert data.startswith(b"HTTP/1.1 200 ") and ended - started < 8.0
