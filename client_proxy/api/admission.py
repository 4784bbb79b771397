"""Load shedding: a bound on the inference requests in flight, and a quick 503 beyond it.

A proxy that admits every request under overload queues them all: each waits behind the
others, the ones admitted first time out, and clients that give up leave their work behind.
Refusing the excess at once (503 with ``Retry-After``, which costs a fraction of an answer)
keeps the admitted requests within their deadline and tells the clients to come back.

Only inference requests are counted and refused: every ``POST`` (the seed's routes, the
compositions, pipelines, ``/v2/.../infer``, gRPC ``ModelInfer``). Health, readiness, metrics,
metadata and the documentation always answer, so that an operator and a load balancer see an
overloaded proxy as alive and busy. One bound per process (``PROXY_WORKERS`` multiplies it),
shared by the HTTP and the gRPC doors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.types import Scope, Send

logger = logging.getLogger("client_proxy")

#: Seconds a refused client is asked to wait (``Retry-After``, whole seconds as HTTP has it).
RETRY_AFTER_S = 1
#: After a refusal, its connection is not read for this long (``lingering.py``): a client that
#: ignores ``Retry-After`` and sends again at once waits that much, in its socket, not the proxy.
SHED_PAUSE_S = 0.5
#: The scope key that tells the HTTP protocol a response was a refusal.
SHED_MARK = "client_proxy.shed"
#: At most one warning per this many seconds while shedding.
_LOG_EVERY_S = 10.0


class Admission:
    """How many inference requests are in flight, and whether one more may be admitted."""

    def __init__(self, limit: int, on_shed: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        """0: no bound."""
        self.in_flight = 0
        self.shed = 0
        self._on_shed = on_shed
        self._logged_at = -_LOG_EVERY_S

    def enter(self, door: str) -> bool:
        """True (and counted in flight until ``leave``) when the request is admitted."""
        if self.limit and self.in_flight >= self.limit:
            self.shed += 1
            if self._on_shed is not None:
                self._on_shed(door)
            now = time.monotonic()
            if now - self._logged_at >= _LOG_EVERY_S:
                self._logged_at = now
                logger.warning(
                    "overloaded: %d requests in flight (PROXY_MAX_IN_FLIGHT); refusing more with 503 "
                    "(%d so far)",
                    self.in_flight,
                    self.shed,
                )
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def reason(self) -> str:
        return (
            f"overloaded: {self.limit} requests in flight, the most this proxy admits "
            f"(PROXY_MAX_IN_FLIGHT); retry after {RETRY_AFTER_S} s"
        )


class Refusals:
    """The 503 answers of an ``Admission``: the Open Inference Protocol's error under ``/v2``,
    the proxy's own elsewhere; rendered once."""

    def __init__(self, admission: Admission) -> None:
        message = admission.reason()
        self._bodies = {
            v2: json.dumps(
                {"error": message} if v2 else {"error": {"code": "overloaded", "message": message}}
            ).encode()
            for v2 in (False, True)
        }

    async def send(self, scope: Scope, send: Send) -> None:
        scope[SHED_MARK] = True  # the HTTP protocol pauses reading this connection
        payload = self._bodies[scope["path"].startswith("/v2/")]
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
