"""What the proxy does when a rule is met: count it, log it, and post it to the rule's webhook.

Webhooks never slow or fail the request that raised them: an alert is put on a bounded queue
(``PROXY_WEBHOOK_QUEUE``) and the request goes on; a few worker tasks post what is queued, each
attempt bounded by ``PROXY_WEBHOOK_TIMEOUT_MS``, a failed one (no connection, a time-out, 408,
429 or 5xx) tried again up to ``PROXY_WEBHOOK_RETRIES`` times with exponential back-off and
jitter. Delivery is at least once while the proxy runs: a receiver may see an alert twice (the
``webhook-id`` header is the same on every attempt, to drop repeats by). A full queue drops the
new alert, counted and logged. At shutdown the queue is flushed for at most
``PROXY_WEBHOOK_FLUSH_MS``; what is left then is counted as abandoned.

Each post is signed as the Standard Webhooks specification says (standardwebhooks.com), when
``PROXY_WEBHOOK_SECRET`` is set: ``webhook-signature: v1,<base64 HMAC-SHA256 of
"<webhook-id>.<webhook-timestamp>.<body>">``, the key being the secret's bytes (``whsec_<base64>``,
as the specification's libraries take it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from client_proxy.core.rules import Alert, Result
from client_proxy.signing import secret_bytes, signature

logger = logging.getLogger("client_proxy.alerts")
USER_AGENT = "iris-triton-proxy-webhooks/0.1"
#: A full queue's drops are logged at most this often per rule, with their count.
DROP_LOG_EVERY_S = 10.0
#: Statuses worth another attempt: the receiver may answer later (others are the payload's fault).
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class WebhookSettings:
    secret: str | None
    queue_size: int
    timeout_s: float
    retries: int
    backoff_s: float
    workers: int
    flush_s: float


@dataclass
class _Delivery:
    url: str
    rule: str
    message_id: str
    body: bytes


class WebhookSender:
    """Posts alerts to webhooks from a bounded queue, off the requests' path (see the module)."""

    def __init__(self, settings: WebhookSettings, metrics: Any) -> None:
        """``metrics``: ``ProxyMetrics`` (``webhook_deliveries``, ``webhook_attempts``)."""
        self._settings = settings
        self._key = secret_bytes(settings.secret) if settings.secret else None
        self._metrics = metrics
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(settings.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._busy = 0
        self._drops: dict[str, tuple[float, int]] = {}
        """Per rule: when a drop was last logged, and the drops since."""
        """Deliveries a worker holds (being tried, or waiting to be tried again)."""

    @property
    def queued(self) -> int:
        """Deliveries waiting or being tried."""
        return self._queue.qsize() + self._busy

    def start(self) -> None:
        """The client and the workers (inside the running loop: the app's lifespan)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-{i}") for i in range(self._settings.workers)
        ]

    @property
    def full(self) -> bool:
        """No room for another alert: the next one would be dropped (so need not be built)."""
        return self._queue.full()

    def submit(self, url: str, rule: str, payload: dict[str, Any]) -> bool:
        """Queue one post; False (counted as dropped) when the queue is full."""
        if self._queue.full():
            self.drop(url, rule)
            return False
        self._queue.put_nowait(_Delivery(url, rule, f"msg_{uuid.uuid4().hex}", orjson.dumps(payload)))
        return True

    def drop(self, url: str, rule: str) -> None:
        """One alert dropped for a full queue: counted, and logged at most once per rule every
        ``DROP_LOG_EVERY_S`` with how many (a receiver that is down must not flood the log)."""
        self._metrics.webhook_deliveries.inc((rule, "dropped"))
        now = time.monotonic()
        logged_at, count = self._drops.get(rule, (float("-inf"), 0))
        count += 1
        if now - logged_at < DROP_LOG_EVERY_S:
            self._drops[rule] = (logged_at, count)
            return
        self._drops[rule] = (now, 0)
        logger.warning(
            "webhook queue full (%d): dropped %d alert(s) of rule %s for %s since the last such line",
            self._settings.queue_size,
            count,
            rule,
            url,
            extra={"rule": rule, "dropped": count},
        )

    async def aclose(self) -> None:
        """Flush what is queued (for at most the flush bound), then stop; the rest is abandoned."""
        if not self._workers:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), self._settings.flush_s)
        left = self.queued
        for worker in self._workers:
            worker.cancel()  # a delivery in hand is counted abandoned by its worker
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            self._metrics.webhook_deliveries.inc((self._queue.get_nowait().rule, "abandoned"))
        if left:
            logger.warning(
                "shutdown: %d webhook deliveries abandoned after %.1f s", left, self._settings.flush_s
            )
        if self._session is not None:
            await self._session.close()
        self._workers = []

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._busy += 1
            outcome = "abandoned"
            try:
                outcome = await self._deliver(delivery)
            finally:
                self._busy -= 1
                self._metrics.webhook_deliveries.inc((delivery.rule, outcome))
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> str:
        """``delivered``, or ``failed`` once no attempt is left (or the receiver refused it)."""
        assert self._session is not None
        attempts = self._settings.retries + 1
        for attempt in range(attempts):
            headers = {"webhook-id": delivery.message_id}
            timestamp = int(time.time())
            headers["webhook-timestamp"] = str(timestamp)
            if self._key is not None:
                headers["webhook-signature"] = signature(
                    self._key, delivery.message_id, timestamp, delivery.body
                )
            try:
                async with self._session.post(delivery.url, data=delivery.body, headers=headers) as response:
                    status = response.status
                    await response.read()
            except TimeoutError:
                result, retry, status = "timeout", True, 0
            except aiohttp.ClientError:
                result, retry, status = "connection_error", True, 0
            else:
                result = f"{status // 100}xx"
                retry = status in _RETRY_STATUSES
                if 200 <= status < 300:
                    self._metrics.webhook_attempts.inc((delivery.rule, result))
                    return "delivered"
            self._metrics.webhook_attempts.inc((delivery.rule, result))
            if not retry or attempt == attempts - 1:
                logger.warning(
                    "webhook %s for rule %s: gave up after %d attempt(s), last: %s",
                    delivery.url,
                    delivery.rule,
                    attempt + 1,
                    f"HTTP {status}" if status else result,
                    extra={"rule": delivery.rule, "webhook_id": delivery.message_id},
                )
                return "failed"
            # Exponential back-off with full jitter: receivers that failed together do not all
            # come back to the same instant.
            await asyncio.sleep(random.uniform(0, self._settings.backoff_s * 2**attempt))
        return "failed"  # not reached: the loop returns on its last attempt


class Alerter:
    """The app's ``AlertSink``: every alert counted (``proxy_alerts_total``) and logged, and
    posted to its rule's webhook when it has one."""

    def __init__(self, metrics: Any, webhooks: WebhookSender | None) -> None:
        self._metrics = metrics
        self.webhooks = webhooks
        """Where alerts with a webhook go; set when a reloaded file first has one (None: none)."""

    def raised(self, source: str, alerts: Sequence[Alert], request_id: str, result: Result) -> None:
        now = ""
        for alert in alerts:
            rule = alert.rule
            self._metrics.alerts.inc((source, rule.name), len(alert.rows))
            logger.warning(
                "alert rule=%s severity=%s source=%s request_id=%s rows=%s",
                rule.name,
                rule.severity,
                source,
                request_id,
                ",".join(map(str, alert.rows)),
                extra={
                    "rule": rule.name,
                    "severity": rule.severity,
                    "source": source,
                    "request_id": request_id,
                    "rows": list(alert.rows),
                },
            )
            if rule.webhook is not None and self.webhooks is not None:
                if self.webhooks.full:  # dropped: the payload need not be built
                    self.webhooks.drop(rule.webhook, rule.name)
                    continue
                now = now or datetime.now(UTC).isoformat()
                payload = {
                    "type": "alert",
                    "rule": rule.name,
                    "severity": rule.severity,
                    "when": rule.when.text,
                    "source": source,
                    "request_id": request_id,
                    "time": now,
                    "rows": [{"row": i, **result.row(i)} for i in alert.rows],
                }
                self.webhooks.submit(rule.webhook, rule.name, payload)
