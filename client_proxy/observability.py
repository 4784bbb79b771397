"""Request ids, Prometheus metrics and logging.

Every request gets an id (the client's ``X-Request-ID`` when it is sane, else a new one: see
``request_id_of``), returned in the response header, and is counted and timed by route
template, by the front of every request (``client_proxy.api.fastlane.FastLane``). The
dataplane reports each answer to ``RequestObserver``: the request log line, partial answers,
feature-store lookups.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from starlette.types import Scope

from client_proxy.core.outcomes import Outcome

_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

logger = logging.getLogger("client_proxy")
#: Probes and scrapes: no spans (they would be most of a trace store's traces and say nothing).
#: Paths whose requests get no span: probes and scrapes.
UNTRACED = ("/health", "/metrics")


class LoopCounter(Collector):
    """A labelled counter kept as plain numbers and turned into a metric family when scraped.

    For the few series the proxy updates on every request and every service call:
    prometheus_client's ``Counter`` takes a lock and makes a handful of calls per increment
    (with its ``Histogram``, about a twentieth of the proxy's CPU per request, profiled). Only
    the event loop's thread updates these; a scrape copies them first. The exposition is the
    same as a ``Counter``'s, ``_created`` series included.
    """

    _type = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        try:
            self._values[labels] += amount
        except KeyError:
            self._created[labels] = time.time()
            self._values[labels] = amount

    def value(self, labels: tuple[str, ...]) -> float:
        return self._values.get(labels, 0.0)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = dict(self._created)
        for labels, value in dict(self._values).items():
            family.add_metric(labels, value, created=created.get(labels))
        yield family


class LoopHistogram(Collector):
    """A labelled histogram kept as plain numbers (see ``LoopCounter``): an observation is one
    bisection and two additions. The exposition is the same as a ``Histogram``'s."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        #: Per label values: the count in each bucket (the last one +Inf), then the sum.
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            self._created[labels] = time.time()
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
        series[bisect_left(self._bounds, value)] += 1  # the first bucket whose bound is >= value
        series[-1] += value

    def count(self, labels: tuple[str, ...]) -> float:
        series = self._series.get(labels)
        return sum(series[:-1]) if series is not None else 0.0

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = dict(self._created)
        bounds = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for labels, values in dict(self._series).items():
            values = list(values)
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, values[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, values[-1])
            if labels in created:
                family.samples.append(
                    Sample(
                        f"{self._name}_created",
                        dict(zip(self._labelnames, labels, strict=True)),
                        created[labels],
                    )
                )
        yield family


@dataclass(frozen=True)
class MetricInfo:
    """One metric as a scrape shows it: its name (a counter's with ``_total``), its type, its
    labels and its help text."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    across_workers: str = "sum"
    """With several workers, how the workers' values make the one shown (``ACROSS_WORKERS``)."""


class ProxyMetrics:
    """The proxy's Prometheus metrics, in a registry of their own (one per app)."""

    #: With several workers (``client_proxy.workers``), how a gauge's values in each are shown as
    #: one: ``sum`` (the default), ``min``, ``max``, or ``self`` (the worker that answers the
    #: scrape). Counters and histograms are summed.
    ACROSS_WORKERS: ClassVar[dict[str, str]] = {
        "proxy_ready": "self",  # measured by the worker answering the scrape
        "proxy_service_ready": "self",
        "proxy_config_generation": "min",  # the oldest configuration a worker serves
        "proxy_config_last_reload_successful": "min",  # 0 when any worker refused
        "process_start_time_seconds": "min",
        "process_max_fds": "self",
        "process_virtual_memory_max_bytes": "self",
    }

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Updated on every request and service call: kept as plain numbers (see LoopCounter).
        self.requests = LoopCounter(
            "proxy_http_requests",
            "HTTP requests answered, by route, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_latency = LoopHistogram(
            "proxy_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.service_calls = LoopCounter(
            "proxy_service_calls",
            "Calls to a service, by outcome (ok, timeout, unavailable, rejected, error, cancelled)",
            ["service", "outcome"],
            registry=r,
        )
        self.service_latency = LoopHistogram(
            "proxy_service_call_duration_seconds",
            "Time for one service's answer, by service",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # (proxy_service_timeouts_total and proxy_upstream_errors_total, which counted the same
        # calls again by reason, are gone: proxy_service_calls_total{outcome} has them.)
        self.batch_rows = LoopHistogram(
            "proxy_coalesced_batch_rows",
            "Rows in one Triton call the coalescer sent, by service",
            ["service"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = LoopHistogram(
            "proxy_coalesced_batch_requests",
            "Requests sharing one Triton call the coalescer sent, by service",
            ["service"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.partial_answers = Counter(
            "proxy_partial_answers", "Answers given without every service, by route", ["endpoint"], registry=r
        )

        from client_proxy.experiment_metrics import ExperimentMetrics  # it builds on this module

        self.experiments = ExperimentMetrics(r)
        """An experiment's variants and shadows (``core/experiments.py``, ``core/shadows.py``)."""

        self.replica_calls = LoopCounter(
            "proxy_replica_calls",
            "Calls to one replica of a service, by outcome (ok, timeout, unavailable, rejected, error; "
            "cancelled: it lost to a hedge)",
            ["service", "replica", "outcome"],
            registry=r,
        )
        self.replica_state_gauge = Gauge(
            "proxy_replica_state",
            "1 for a replica's current state (healthy, ejected, probing), 0 for the others",
            ["service", "replica", "state"],
            registry=r,
        )
        self.replica_ejections = Counter(
            "proxy_replica_ejections", "Times a replica was ejected", ["service", "replica"], registry=r
        )
        self.retries = Counter(
            "proxy_retries",
            "Calls sent again to another replica after a fast failure",
            ["service"],
            registry=r,
        )

        self.hedges = Counter(
            "proxy_hedges",
            "Hedges of slow calls: sent; won (a sent hedge answered first, also counted as sent); "
            "or due but not sent for lack of budget, deadline or another replica "
            "(budget, deadline, no_replica)",
            ["service", "outcome"],
            registry=r,
        )

        self.shed_requests = Counter(
            "proxy_shed_requests",
            "Inference requests refused at once (503, gRPC UNAVAILABLE) because PROXY_MAX_IN_FLIGHT "
            "were in flight, by door (http, grpc)",
            ["door"],
            registry=r,
        )
        self.ready = Gauge(
            "proxy_ready",
            "1 when the default composition can answer (as /health/ready: a service ready, not "
            "draining), measured when scraped",
            registry=r,
        )
        self.service_ready = Gauge(
            "proxy_service_ready",
            "1 when the service's model is ready in Triton, measured when scraped",
            ["service"],
            registry=r,
        )
        # The proxy's own process: CPU seconds, resident and virtual memory, open descriptors,
        # start time (Linux), the Python version and the garbage collector's counts.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.in_flight = Gauge(
            "proxy_requests_in_flight", "Inference requests in flight now (HTTP and gRPC)", registry=r
        )

        # Requests by key (client_proxy/api/reading.py).
        self.feature_lookups = LoopCounter(
            "proxy_feature_lookups",
            "Feature store lookups, by store (sqlite, redis, postgresql) and outcome "
            "(ok, unavailable, timeout)",
            ["store", "outcome"],
            registry=r,
        )
        self.feature_latency = LoopHistogram(
            "proxy_feature_lookup_duration_seconds",
            "Time for one feature store lookup (all of a request's keys), by store",
            ["store"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feature_keys = LoopCounter(
            "proxy_feature_keys",
            "Distinct keys asked of the feature store, by outcome (found, missing)",
            ["outcome"],
            registry=r,
        )
        # Rules and their webhooks (client_proxy/alerts.py).
        self.alerts = LoopCounter(
            "proxy_alerts",
            "Rows that met a rule, by source (composition/<name>, pipeline/<name>) and rule",
            ["source", "rule"],
            registry=r,
        )
        self.webhook_deliveries = LoopCounter(
            "proxy_webhook_deliveries",
            "Alerts posted to webhooks, by rule and outcome (delivered; failed: no attempt left or "
            "refused; dropped: the queue was full; abandoned: left at shutdown)",
            ["rule", "outcome"],
            registry=r,
        )
        self.webhook_attempts = LoopCounter(
            "proxy_webhook_attempts",
            "Webhook posts tried, by rule and result (2xx, 4xx, 5xx, timeout, connection_error)",
            ["rule", "result"],
            registry=r,
        )
        self.webhook_queued = Gauge(
            "proxy_webhook_queued", "Webhook posts waiting or being tried, measured when scraped", registry=r
        )

        # Reloads of the configuration (client_proxy/reloading.py).
        self.config_reloads = Counter(
            "proxy_config_reloads",
            "Reloads of the configuration (SIGHUP, POST /admin/reload, PROXY_WATCH_CONFIG), by "
            "outcome (applied; refused: invalid, the configuration in place kept)",
            ["outcome"],
            registry=r,
        )
        self.config_last_reload_ok = Gauge(
            "proxy_config_last_reload_successful",
            "0 when the last reload was refused (what is served is not what the files say), else 1",
            registry=r,
        )
        self.config_last_reload_ok.set(1)
        self.config_generation = Gauge(
            "proxy_config_generation",
            "The configuration served: 1 at start, one more at each reload or admin change applied",
            registry=r,
        )
        self.config_generation.set(1)

        #: The request counter's labels by (endpoint, method, status): the status as text, once.
        self._request_labels: dict[tuple[str, str, int], tuple[str, str, str]] = {}

    def catalogue(self) -> list[MetricInfo]:
        """Every ``proxy_*`` metric registered here, in order (the documentation's metrics table
        is made from it). The process, platform and garbage-collector collectors are not listed."""
        found = []
        for metric in [*vars(self).values(), *vars(self.experiments).values()]:
            kind, name = getattr(metric, "_type", None), getattr(metric, "_name", None)
            if kind is None or name is None:
                continue
            shown = f"{name}_total" if kind == "counter" else name
            across = self.ACROSS_WORKERS.get(name, "sum") if kind == "gauge" else "sum"
            found.append(MetricInfo(shown, kind, tuple(metric._labelnames), metric._documentation, across))
        return found

    def observe_outcome(self, outcome: Outcome) -> None:
        service = outcome.service
        self.service_calls.inc((service, outcome.reason))
        self.service_latency.observe((service,), outcome.latency_s)

    def observe_batch(self, service: str, rows: int, requests: int) -> None:
        """One Triton call the coalescer sent: its rows and how many requests shared it."""
        labels = (service,)
        self.batch_rows.observe(labels, rows)
        self.batch_requests.observe(labels, requests)

    def replica_call(self, service: str, replica: str, outcome: str) -> None:
        self.replica_calls.inc((service, replica, outcome))

    def replica_state(self, service: str, replica: str, state: str) -> None:
        for each in ("healthy", "ejected", "probing"):
            self.replica_state_gauge.labels(service, replica, each).set(1 if each == state else 0)
        if state == "ejected":
            self.replica_ejections.labels(service, replica).inc()

    def retry(self, service: str) -> None:
        self.retries.labels(service).inc()

    def hedge(self, service: str, outcome: str) -> None:
        self.hedges.labels(service, outcome).inc()

    def shed(self, door: str) -> None:
        self.shed_requests.labels(door).inc()

    def watch_in_flight(self, admission: Any) -> None:
        """``proxy_requests_in_flight`` reads ``admission.in_flight`` when scraped (no hot-path cost)."""
        self.in_flight.set_function(lambda: admission.in_flight)

    def watch_webhooks(self, sender: Any) -> None:
        """``proxy_webhook_queued`` reads ``sender.queued`` when scraped."""
        self.webhook_queued.set_function(lambda: sender.queued)

    def config_reloaded(self, outcome: str) -> None:
        """A reload's outcome (the generation served is set when a configuration is put in place)."""
        self.config_reloads.labels(outcome).inc()
        self.config_last_reload_ok.set(1 if outcome == "applied" else 0)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method, status)
        labels = self._request_labels.get(key)
        if labels is None:
            labels = self._request_labels[key] = (endpoint, method, str(status))
        self.requests.inc(labels)
        self.request_latency.observe((endpoint,), seconds)


def request_id_from(raw: str | None) -> str:
    """The client's id when it is short and plain; otherwise a new one (never echo junk into logs)."""
    if raw is not None and _VALID_REQUEST_ID.match(raw):
        return raw
    # 32 hex digits, unique without a system call per request: a random per-process prefix
    # (so workers and restarts never collide) and a counter.
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_of(scope: Scope) -> str:
    """The request's id: its ``X-Request-ID`` header when short and plain, else a new one."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            return request_id_from(value.decode("latin-1"))
    return request_id_from(None)
