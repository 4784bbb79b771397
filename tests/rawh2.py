"""A raw HTTP/2 client for tests: frames as bytes over a blocking socket, for what a well-behaved
gRPC client never sends (tests/unit/test_grpc_wire.py, tests/test_attacks.py)."""

from __future__ import annotations

import socket
import time
from typing import Any

import hpack

from client_proxy import http2 as wire
from client_proxy.http2 import frame


class Raw:
    """A client speaking HTTP/2 frame by frame."""

    def __init__(self, port: int, preface: bytes = wire.PREFACE, settings: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.buffer = b""
        self.goaway_at = 0.0  # when the server's GOAWAY was read (time.monotonic())
        self.sock.sendall(preface + frame(wire.SETTINGS, 0, 0, settings))

    def close(self) -> None:
        self.sock.close()

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def block(
        self,
        path: str = "/test.T/Echo",
        content_type: str = "application/grpc",
        extra: list[tuple[str, str]] | None = None,
    ) -> bytes:
        return bytes(
            self.encoder.encode(
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "test"),
                    ("content-type", content_type),
                    ("te", "trailers"),
                    *(extra or []),
                ]
            )
        )

    def goaway(self) -> tuple[int, bytes]:
        """Reads to the server's GOAWAY: its error code and debug text (the connection must then end)."""
        while (got := self.next_frame()) is not None:
            kind, _, _, payload = got
            if kind == wire.GOAWAY:
                self.goaway_at = time.monotonic()
                code = int.from_bytes(payload[4:8], "big")
                try:
                    while self.next_frame() is not None:  # the server closes the connection after it
                        pass
                except ConnectionResetError:  # what this side still sent was not read
                    pass
                return code, payload[8:]
        raise AssertionError("the connection ended without a GOAWAY")

    def next_frame(self) -> tuple[int, int, int, bytes] | None:
        while True:
            if len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) >= 9 + length:
                    kind, flags = self.buffer[3], self.buffer[4]
                    stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
                    payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
                    return kind, flags, stream, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def answer(self, stream: int) -> tuple[dict[bytes, bytes], bytes, int | None]:
        """Headers (with trailers), data, and the RST_STREAM code of ``stream``, to its end."""
        headers: dict[bytes, bytes] = {}
        data = b""
        while (got := self.next_frame()) is not None:
            kind, flags, sid, payload = got
            if sid != stream:
                continue
            if kind == wire.HEADERS:
                headers.update(dict(self.decoder.decode(payload, raw=True)))
            elif kind == wire.DATA:
                data += payload
            elif kind == wire.RST_STREAM:
                return headers, data, int.from_bytes(payload, "big")
            if flags & wire.END_STREAM:
                return headers, data, None
        raise AssertionError("the connection ended first")


def message(request: Any) -> bytes:
    """A gRPC message: its prefix (not compressed, length), then the serialized protobuf."""
    body = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body
