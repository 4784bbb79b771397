"""Logging: the text and JSON formats, uvicorn's configuration for them, the one line per
request (written straight to the stream when that is all logging would do), and the
dataplane's ``Observer`` that writes it and counts what the answer says."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from client_proxy import tracing
from client_proxy.core.dataplane import InferenceAnswer, InferenceRequest
from client_proxy.core.features import Fetched
from client_proxy.core.outcomes import Outcome
from client_proxy.core.pipelines import PipelineResult
from client_proxy.observability import ProxyMetrics

logger = logging.getLogger("client_proxy")


class _Formatter(logging.Formatter):
    """The stock format, with the timestamp formatted once per second rather than per line
    (``time.strftime`` was a visible share of the per-request cost at INFO)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.timestamp(record.created)

    def timestamp(self, created: float) -> str:
        """``created`` (``time.time()``) as ``%Y-%m-%d %H:%M:%S,mmm``, as logging writes it."""
        second = int(created)
        if second != self._second:
            self._second, self._text = (
                second,
                time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created)),
            )
        return f"{self._text},{int((created - second) * 1000):03d}"


#: The handler ``configure_logging`` installed, when it did: ``log_request`` writes its line to
#: it directly (same text) while it is the proxy logger's only handler and nothing filters.
_request_handler: logging.StreamHandler[Any] | None = None
_request_formatter = _Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def json_formatter() -> logging.Formatter:
    """One JSON object per line (python-json-logger): ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, and whatever a record carries besides (``request_id``,
    ``endpoint``, ``services`` on the request line). The proxy's and uvicorn's loggers share it."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        # uvicorn's records carry their message again with terminal colour codes: left out.
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's ``log_config`` for ``PROXY_LOG_FORMAT``: None (uvicorn's own) for text; for json,
    its loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``) through ``json_formatter``."""
    if log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "client_proxy.logs.json_formatter"}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }


def configure_logging(level: str, log_format: str = "text") -> None:
    """The proxy's loggers at ``level``, one line per record, to stderr: text, or one JSON object
    per line (``log_format="json"``)."""
    global _request_handler
    proxy_logger = logging.getLogger("client_proxy")
    proxy_logger.setLevel(level)
    if not proxy_logger.handlers:
        handler = logging.StreamHandler()
        json_lines = log_format == "json"
        handler.setFormatter(json_formatter() if json_lines else _request_formatter)
        proxy_logger.addHandler(handler)
        proxy_logger.propagate = False
        # The request line's shortcut writes the text format only; JSON goes through logging.
        _request_handler = None if json_lines else handler


class RequestObserver:
    """The dataplane's ``Observer``: each answer's request log line and partial-answer count, each
    feature-store lookup's counts, in ``metrics``."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def answered(self, request: InferenceRequest, answer: InferenceAnswer) -> None:
        endpoint = request.endpoint
        named = endpoint.replace("{name}", request.model) if "{" in endpoint else endpoint
        variant = answer.variant.name if answer.variant is not None else None
        if answer.report is not None:
            log_steps(request.request_id, named, answer.report, variant)
        else:
            log_request(request.request_id, named, answer.outcomes, variant)
        if answer.partial:
            self._metrics.partial_answers.labels(endpoint).inc()

    def variant_answered(self, experiment: str, variant: str, seconds: float) -> None:
        self._metrics.experiments.variant_answered(experiment, variant, seconds)

    def keys_read(self, store: str, outcome: str, fetched: Fetched | None, missing: int) -> None:
        metrics = self._metrics
        metrics.feature_lookups.inc((store, outcome))
        if fetched is not None:
            metrics.feature_latency.observe((store,), fetched.seconds)
            metrics.feature_keys.inc(("found",), len(set(fetched.keys)))
        if missing:
            metrics.feature_keys.inc(("missing",), missing)


def log_steps(request_id: str, endpoint: str, report: PipelineResult, variant: str | None = None) -> None:
    """A pipeline's request line: each step's status and latency, and the Triton calls made (and
    the experiment's ``variant`` that answered)."""
    if logger.isEnabledFor(logging.INFO):
        steps = " ".join(f"{r.step}={r.status}/{r.latency_ms:.1f}ms" for r in report.path)
        if variant is not None:
            steps = f"variant={variant} {steps}"
        extra = {"variant": variant} if variant is not None else {}
        logger.info(
            "request_id=%s endpoint=%s %s calls=%d", request_id, endpoint, steps, report.calls, extra=extra
        )


def log_request(
    request_id: str, endpoint: str, outcomes: Collection[Outcome], variant: str | None = None
) -> None:
    """One line per request: each service's outcome and latency, with the request id (and the
    experiment's ``variant`` that answered)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    parts = " ".join(f"{o.service}={o.reason}/{o.latency_s * 1000:.1f}ms" for o in outcomes)
    if variant is not None:
        parts = f"variant={variant} {parts}"
    ok = all(o.error is None for o in outcomes)
    trace_id = tracing.trace_id() if tracing.ENABLED else None
    if trace_id is not None:
        parts += f" trace_id={trace_id}"
    # One line per request is a visible share of the proxy's CPU through logging's machinery (a
    # LogRecord, two locks, the formatter): the same text goes straight to the same stream when
    # that is all logging would do with it.
    handler = _request_handler
    handlers = logger.handlers
    if (
        handler is not None
        and len(handlers) == 1
        and handlers[0] is handler
        and not (logger.filters or handler.filters)
        and _write(handler, request_id, endpoint, parts, ok)
    ):
        return
    services = {
        o.service: {"outcome": o.reason, "latency_ms": round(o.latency_s * 1000, 1)} for o in outcomes
    }
    logger.log(
        logging.INFO if ok else logging.WARNING,
        "request_id=%s endpoint=%s %s",
        request_id,
        endpoint,
        parts,
        extra={
            "request_id": request_id,
            "endpoint": endpoint,
            "services": services,
            **({"trace_id": trace_id} if trace_id is not None else {}),
            **({"variant": variant} if variant is not None else {}),
        },
    )


def _write(handler: logging.StreamHandler[Any], request_id: str, endpoint: str, parts: str, ok: bool) -> bool:
    """The request line written to ``handler``'s stream as its formatter would; False if that
    failed (logging's own path then reports the failure its way)."""
    line = (
        f"{_request_formatter.timestamp(time.time())} {'INFO' if ok else 'WARNING'} client_proxy "
        f"request_id={request_id} endpoint={endpoint} {parts}\n"
    )
    try:
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line)
            handler.stream.flush()
    except Exception:
        return False
    return True
