"""The webhook sender against a real HTTP receiver: signed posts, retries, time-outs, a bounded
queue, and the flush at shutdown. (The proxy and Triton around it: tests/test_alerts.py.)"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from standardwebhooks import Webhook

from bench.webhook_receiver import WebhookReceiver, webhook_receiver
from client_proxy.alerts import WebhookSender, WebhookSettings
from client_proxy.observability import ProxyMetrics
from client_proxy.signing import secret_bytes, signature
from local_triton import free_ports

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _settings(**overrides: Any) -> WebhookSettings:
    values = {
        "secret": SECRET,
        "queue_size": 100,
        "timeout_s": 1.0,
        "retries": 3,
        "backoff_s": 0.01,
        "workers": 2,
        "flush_s": 5.0,
    }
    return WebhookSettings(**{**values, **overrides})


def _run(settings: WebhookSettings, body: Callable[[WebhookSender], Awaitable[None]]) -> ProxyMetrics:
    """``body(sender)`` with a started sender, closed after it (the flush included)."""
    metrics = ProxyMetrics()

    async def main() -> None:
        sender = WebhookSender(settings, metrics)
        sender.start()
        try:
            await body(sender)
        finally:
            await sender.aclose()

    asyncio.run(main())
    return metrics


def test_a_post_is_signed_as_the_standard_webhooks_library_verifies_it() -> None:
    with webhook_receiver(secret=SECRET) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "rule_a", {"rule": "rule_a", "rows": [{"row": 3}]})

        metrics = _run(_settings(), body)
        (post,) = receiver.wait_for(1)
    assert post.signed is True  # Webhook(SECRET).verify(...) accepted it
    assert post.payload == {"rule": "rule_a", "rows": [{"row": 3}]}
    assert post.webhook_id.startswith("msg_") and post.headers["content-type"] == "application/json"
    assert metrics.webhook_deliveries.value(("rule_a", "delivered")) == 1
    assert metrics.webhook_attempts.value(("rule_a", "2xx")) == 1


def test_the_signature_is_the_specifications_and_a_bad_secret_is_refused() -> None:
    key = secret_bytes(SECRET)
    assert key == b"0123456789abcdef0123456789abcdef"
    assert secret_bytes(SECRET.removeprefix("whsec_")) == key  # the prefix is optional
    sign = signature(key, "msg_1", 1_700_000_000, b'{"a":1}')
    assert sign == Webhook(SECRET).sign("msg_1", _when(1_700_000_000), '{"a":1}')
    with pytest.raises(ValueError, match="must be base64"):
        secret_bytes("not base64 at all!")
    with pytest.raises(ValueError, match="use 16 or more"):
        secret_bytes("whsec_" + base64.b64encode(b"short").decode())


def _when(seconds: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, tz=UTC)


def test_a_receiver_answering_500_is_tried_again_with_the_same_id_then_given_up() -> None:
    with webhook_receiver(status=500) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        metrics = _run(_settings(retries=3), body)
        posts = receiver.wait_for(4)
    assert len(posts) == 4 and len({p.webhook_id for p in posts}) == 1
    assert metrics.webhook_attempts.value(("r", "5xx")) == 4
    assert metrics.webhook_deliveries.value(("r", "failed")) == 1
    assert metrics.webhook_deliveries.value(("r", "delivered")) == 0


def test_a_receiver_that_refuses_the_payload_is_not_asked_again() -> None:
    with webhook_receiver(status=400) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        metrics = _run(_settings(), body)
        time.sleep(0.1)
        assert len(receiver.received) == 1
    assert metrics.webhook_attempts.value(("r", "4xx")) == 1
    assert metrics.webhook_deliveries.value(("r", "failed")) == 1


def test_a_receiver_that_recovers_gets_the_alert() -> None:
    with webhook_receiver(status=503) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})
            while not receiver.received:
                await asyncio.sleep(0.005)
            receiver.status = 200  # the next attempt succeeds

        metrics = _run(_settings(retries=5, backoff_s=0.05), body)
    assert metrics.webhook_deliveries.value(("r", "delivered")) == 1
    assert metrics.webhook_attempts.value(("r", "5xx")) >= 1


def test_a_receiver_that_is_down_counts_connection_errors() -> None:
    (port,) = free_ports(1)  # nothing listens there

    async def body(sender: WebhookSender) -> None:
        sender.submit(f"http://127.0.0.1:{port}/alerts", "r", {"n": 1})

    metrics = _run(_settings(retries=2), body)
    assert metrics.webhook_attempts.value(("r", "connection_error")) == 3
    assert metrics.webhook_deliveries.value(("r", "failed")) == 1


def test_a_slow_receiver_times_out_and_does_not_hold_the_other_workers() -> None:
    with webhook_receiver(delay_s=1.0) as slow, webhook_receiver() as fast:

        async def body(sender: WebhookSender) -> None:
            sender.submit(slow.url, "slow", {"n": 1})
            started = time.monotonic()
            sender.submit(fast.url, "fast", {"n": 2})
            while not fast.received:
                await asyncio.sleep(0.005)
            assert time.monotonic() - started < 0.5  # not behind the slow post

        metrics = _run(_settings(timeout_s=0.2, retries=1, workers=2), body)
    assert metrics.webhook_attempts.value(("slow", "timeout")) == 2
    assert metrics.webhook_deliveries.value(("slow", "failed")) == 1
    assert metrics.webhook_deliveries.value(("fast", "delivered")) == 1


def test_a_full_queue_drops_the_new_alert_at_once_and_counts_it() -> None:
    with webhook_receiver(delay_s=0.3) as receiver:
        accepted: list[bool] = []

        async def body(sender: WebhookSender) -> None:
            accepted.append(sender.submit(receiver.url, "r", {"n": 0}))
            while not receiver.received:  # the worker holds the first, the receiver sits on it
                await asyncio.sleep(0.005)
            # Submitting never waits: it is no coroutine, and a full queue drops at once.
            assert not inspect.iscoroutinefunction(sender.submit)
            accepted.extend(sender.submit(receiver.url, "r", {"n": i}) for i in range(1, 6))
            assert sender.queued == 3  # one in the worker's hands, two queued

        metrics = _run(_settings(queue_size=2, workers=1), body)
    # The worker takes the first at once, two wait in the queue; the other three are dropped.
    assert accepted == [True, True, True, False, False, False]
    assert metrics.webhook_deliveries.value(("r", "dropped")) == 3
    assert metrics.webhook_deliveries.value(("r", "delivered")) == 3  # flushed at close


def test_drops_are_logged_once_in_a_while_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    with webhook_receiver(delay_s=0.5) as receiver:

        async def body(sender: WebhookSender) -> None:
            with caplog.at_level(logging.WARNING, logger="client_proxy.alerts"):
                for i in range(50):
                    sender.submit(receiver.url, "r", {"n": i})

        metrics = _run(_settings(queue_size=1, workers=1, flush_s=0.1), body)
    lines = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert metrics.webhook_deliveries.value(("r", "dropped")) == 49
    assert len(lines) == 1 and "dropped 1 alert(s) of rule r" in lines[0].getMessage()


def test_shutdown_flushes_what_is_queued_within_its_bound_and_abandons_the_rest() -> None:
    with webhook_receiver(delay_s=0.15) as receiver:

        async def body(sender: WebhookSender) -> None:
            for i in range(4):
                sender.submit(receiver.url, "r", {"n": i})

        started = time.monotonic()
        metrics = _run(_settings(workers=1, flush_s=5.0), body)
        assert metrics.webhook_deliveries.value(("r", "delivered")) == 4
        assert time.monotonic() - started < 3

    with webhook_receiver(delay_s=6.0) as receiver:

        async def body(sender: WebhookSender) -> None:
            for i in range(4):
                sender.submit(receiver.url, "r", {"n": i})
            await asyncio.sleep(0.05)

        started = time.monotonic()
        metrics = _run(_settings(workers=1, flush_s=0.3, timeout_s=10.0), body)
        # The flush bound (0.3 s), not the receiver (6 s), decides: a bound far from both.
        assert time.monotonic() - started < 3.0
    assert metrics.webhook_deliveries.value(("r", "abandoned")) == 4
    assert metrics.webhook_deliveries.value(("r", "delivered")) == 0


def test_the_receiver_tells_a_bad_signature() -> None:
    other = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
    receiver = WebhookReceiver(secret=other)
    receiver.start()
    try:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        _run(_settings(), body)
        (post,) = receiver.wait_for(1)
    finally:
        receiver.stop()
    assert post.signed is False


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_a_status_the_receiver_may_get_over_is_tried_again(status: int) -> None:
    with webhook_receiver(first=[status]) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        metrics = _run(_settings(retries=2), body)
        posts = receiver.wait_for(2)
    assert len(posts) == 2 and posts[0].webhook_id == posts[1].webhook_id  # the same message
    assert metrics.webhook_attempts.value(("r", f"{status // 100}xx")) == 1
    assert metrics.webhook_attempts.value(("r", "2xx")) == 1
    assert metrics.webhook_deliveries.value(("r", "delivered")) == 1


@pytest.mark.parametrize("status", [400, 404, 410, 413, 422])
def test_a_status_that_blames_the_payload_is_not_tried_again(status: int) -> None:
    with webhook_receiver(status=status) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        metrics = _run(_settings(retries=3), body)
    assert len(receiver.received) == 1
    assert metrics.webhook_deliveries.value(("r", "failed")) == 1


def test_the_back_off_is_exponential_with_full_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wait is drawn uniformly from 0 to backoff x 2^attempt (full jitter), so that receivers
    that failed together are not all called again at one instant."""
    from client_proxy import alerts

    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return 0.0

    monkeypatch.setattr(alerts.random, "uniform", uniform)
    with webhook_receiver(status=503) as receiver:

        async def body(sender: WebhookSender) -> None:
            sender.submit(receiver.url, "r", {"n": 1})

        _run(_settings(retries=3, backoff_s=0.2), body)
    assert len(receiver.received) == 4
    assert draws == [(0, 0.2), (0, 0.4), (0, 0.8)]


def test_every_alert_is_logged_with_its_rule_and_rows(caplog: pytest.LogCaptureFixture) -> None:
    from client_proxy.alerts import Alerter
    from client_proxy.core.conditions import parse
    from client_proxy.core.rules import Alert, Rule

    metrics = ProxyMetrics()
    rule = Rule("sure", parse("proba >= 0.9"), "critical", None)
    with caplog.at_level(logging.WARNING, logger="client_proxy.alerts"):
        Alerter(metrics, None).raised("composition/iris", [Alert(rule, (0, 2))], "req-1", None)  # type: ignore[arg-type]
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert (
        record.getMessage()
        == "alert rule=sure severity=critical source=composition/iris request_id=req-1 rows=0,2"
    )
    assert record.rows == [0, 2] and record.rule == "sure"  # type: ignore[attr-defined]
    assert metrics.alerts.value(("composition/iris", "sure")) == 2


def test_an_invalid_secret_stops_the_start_without_being_repeated() -> None:
    from client_proxy.config import load_settings
    from client_proxy.core.services import ConfigError

    leaked = "whsec_this-is-not*base64!!"
    with pytest.raises(ConfigError) as refused:
        load_settings(webhook_secret=leaked)
    message = str(refused.value)
    assert "PROXY_WEBHOOK_SECRET" in message and "its value not shown" in message
    assert "this-is-not" not in message and leaked not in message


def test_webhooks_without_a_secret_start_with_a_warning_naming_them(caplog: pytest.LogCaptureFixture) -> None:
    import types

    from client_proxy.api.app import _webhook_sender
    from client_proxy.config import load_settings
    from client_proxy.core.conditions import parse
    from client_proxy.core.rules import Rule

    hooked = Rule("sure", parse("proba >= 0.9"), "critical", "http://127.0.0.1:9/alerts")
    declared = types.SimpleNamespace(
        compositions={"iris": types.SimpleNamespace(name="iris", rules=[hooked])},
        pipelines={},
        experiments={"canary": types.SimpleNamespace(name="canary", webhook="http://127.0.0.1:9/rows")},
    )
    with caplog.at_level(logging.WARNING, logger="client_proxy"):
        sender = _webhook_sender(load_settings(), declared, ProxyMetrics())  # type: ignore[arg-type]
    assert sender is not None
    (record,) = [r for r in caplog.records if "PROXY_WEBHOOK_SECRET" in r.getMessage()]
    assert record.getMessage() == (
        "PROXY_WEBHOOK_SECRET is not set: the webhooks of iris/sure, experiment/canary are not signed"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="client_proxy"):
        _webhook_sender(load_settings(webhook_secret=SECRET), declared, ProxyMetrics())  # type: ignore[arg-type]
    assert not [r for r in caplog.records if "PROXY_WEBHOOK_SECRET" in r.getMessage()]
