"""A webhook receiver for the tests, the benchmark and the README: a real HTTP server that keeps
every alert the proxy posts, checks its Standard Webhooks signature with the ``standardwebhooks``
library (what a receiver of such webhooks runs), and can be made slow or failing.

    python -m bench.webhook_receiver --port 8088 --secret "$PROXY_WEBHOOK_SECRET"

prints one line per alert it gets (and whether its signature holds).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    at: float
    """``time.monotonic()`` when it arrived."""
    signed: bool | None
    """The signature checked against the receiver's secret (None: the receiver has none)."""

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


class WebhookReceiver:
    """Every post it got (``received``), on ``url``; ``status`` and ``delay_s`` say how it answers
    (both may be changed while it runs), after the statuses of ``first``, one per post."""

    def __init__(
        self, secret: str | None = None, status: int = 204, delay_s: float = 0.0, first: Sequence[int] = ()
    ) -> None:
        self.secret = secret
        self.status = status
        self.first = list(first)
        self.delay_s = delay_s
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/alerts"

    def start(self, port: int = 0) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver._keep(headers, body)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver._lock:
                    status = receiver.first.pop(0) if receiver.first else receiver.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _keep(self, headers: dict[str, str], body: bytes) -> None:
        signed = None
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                signed = True
            except WebhookVerificationError:
                signed = False
        with self._lock:
            self.received.append(Received(headers, body, time.monotonic(), signed))

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The posts once at least ``count`` have arrived (or what there is after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            return list(self.received)


@contextmanager
def webhook_receiver(
    secret: str | None = None, status: int = 204, delay_s: float = 0.0, first: Sequence[int] = ()
) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret, status, delay_s, first)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print the alerts the proxy posts, and check their signatures."
    )
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--secret", default=None, help="PROXY_WEBHOOK_SECRET, to check the signatures")
    args = parser.parse_args()
    receiver = WebhookReceiver(args.secret)
    receiver.start(args.port)
    print(f"listening on {receiver.url}", flush=True)
    seen = 0
    try:
        while True:
            for post in receiver.wait_for(seen + 1, timeout=1.0)[seen:]:
                seen += 1
                payload = post.payload
                check = {None: "unsigned", True: "signature ok", False: "BAD SIGNATURE"}[post.signed]
                rows = ",".join(str(r["row"]) for r in payload["rows"])
                print(
                    f"{payload['time']} {payload['source']} rule={payload['rule']} "
                    f"severity={payload['severity']} request_id={payload['request_id']} rows={rows} "
                    f"({check}, {post.webhook_id})",
                    flush=True,
                )
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
