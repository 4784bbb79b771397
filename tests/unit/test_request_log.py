"""The request log line: written straight to the proxy's handler, the same text logging writes."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import numpy as np
import pytest

from client_proxy import logs
from client_proxy.core.outcomes import Outcome
from client_proxy.errors import UpstreamTimeout
from client_proxy.logs import configure_logging, log_request


@pytest.fixture
def proxy_log() -> Iterator[io.StringIO]:
    """The proxy logger as ``configure_logging`` sets it up, writing into a string."""
    proxy_logger = logging.getLogger("client_proxy")
    saved = (
        proxy_logger.handlers[:],
        proxy_logger.propagate,
        proxy_logger.level,
        logs._request_handler,
    )
    proxy_logger.handlers.clear()
    configure_logging("INFO")
    assert logs._request_handler is not None
    stream = io.StringIO()
    logs._request_handler.setStream(stream)
    try:
        yield stream
    finally:
        proxy_logger.handlers[:], proxy_logger.propagate, level, logs._request_handler = saved
        proxy_logger.setLevel(level)


def _outcomes() -> list[Outcome]:
    ok = Outcome("setosa", np.asarray([[0.9, 0.1]], dtype=np.float32), None, 0.00123)
    late = Outcome("virginica", None, UpstreamTimeout("virginica: no answer within 200 ms"), 0.2)
    return [ok, late]


def _without_time(text: str) -> list[str]:
    return [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in text.splitlines()]


def test_the_direct_line_is_the_line_logging_writes(
    proxy_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:

        def not_through_logging(*args: object) -> None:
            raise AssertionError("the line went through logging")

        patch.setattr(logs.logger, "log", not_through_logging)
        # pytest attaches its capture handlers to non-propagating loggers too: without them here.
        patch.setattr(logs.logger, "handlers", [logs._request_handler])
        log_request("r-1", "/predict/label", _outcomes()[:1])
        log_request("r-2", "/predict/label", _outcomes())
    direct = proxy_log.getvalue()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO client_proxy request_id=r-1 ", direct)
    # Through logging's own machinery (a filter that lets everything through forces it).
    handler = logs._request_handler
    assert handler is not None
    handler.addFilter(lambda record: True)
    proxy_log.seek(0)
    proxy_log.truncate()
    log_request("r-1", "/predict/label", _outcomes()[:1])
    log_request("r-2", "/predict/label", _outcomes())
    assert _without_time(direct) == _without_time(proxy_log.getvalue())
    assert _without_time(direct) == [
        "INFO client_proxy request_id=r-1 endpoint=/predict/label setosa=ok/1.2ms",
        "WARNING client_proxy request_id=r-2 endpoint=/predict/label "
        "setosa=ok/1.2ms virginica=timeout/200.0ms",
    ]


def test_another_handler_gets_the_line_through_logging(proxy_log: io.StringIO) -> None:
    other = io.StringIO()
    extra = logging.StreamHandler(other)
    logging.getLogger("client_proxy").addHandler(extra)
    log_request("r-3", "/predict", _outcomes()[:1])
    assert "request_id=r-3" in proxy_log.getvalue() and "request_id=r-3" in other.getvalue()


def test_above_info_nothing_is_written(proxy_log: io.StringIO) -> None:
    logging.getLogger("client_proxy").setLevel(logging.WARNING)
    log_request("r-4", "/predict", _outcomes())
    assert proxy_log.getvalue() == ""
