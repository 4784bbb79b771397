"""The proxy's hot-path counters and histograms (kept as plain numbers, collected when scraped)
expose exactly what prometheus_client's own Counter and Histogram would for the same updates."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from client_proxy.observability import LoopCounter, LoopHistogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _samples(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample but the creation times' values (which differ by when each was made)."""
    text = generate_latest(registry).decode()
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            value = 0.0 if s.name.endswith("_created") else round(s.value, 9)
            samples.append((s.name, tuple(sorted(s.labels.items())), value))
    return sorted(samples)


def test_the_same_exposition_as_prometheus_clients_counter_and_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("calls", "Calls, by service and outcome", ["service", "outcome"], registry=ours)
    histogram = LoopHistogram("latency_seconds", "Latency", ["service"], buckets=BUCKETS, registry=ours)
    reference_counter = Counter(
        "calls", "Calls, by service and outcome", ["service", "outcome"], registry=theirs
    )
    reference_histogram = Histogram(
        "latency_seconds", "Latency", ["service"], buckets=BUCKETS, registry=theirs
    )
    rng = random.Random(7)
    values = [*BUCKETS, 0.0, 11.0, *(rng.uniform(0, 12) for _ in range(500))]  # bounds land in their bucket
    for i, value in enumerate(values):
        service = ("setosa", "versicolor", "virginica")[i % 3]
        outcome = "ok" if i % 7 else "timeout"
        counter.inc((service, outcome))
        reference_counter.labels(service, outcome).inc()
        histogram.observe((service,), value)
        reference_histogram.labels(service).observe(value)
    assert _samples(ours) == _samples(theirs)
    assert counter.value(("setosa", "ok")) == reference_counter.labels("setosa", "ok")._value.get()
    assert histogram.count(("virginica",)) == sum(1 for i in range(len(values)) if i % 3 == 2)


def test_series_appear_only_once_observed_with_their_creation_time() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("calls", "Calls", ["service"], registry=registry)
    assert "calls_total{" not in generate_latest(registry).decode()
    counter.inc(("setosa",), 2)
    text = generate_latest(registry).decode()
    assert 'calls_total{service="setosa"} 2.0' in text and 'calls_created{service="setosa"}' in text
