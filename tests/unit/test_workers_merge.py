"""How several workers' metrics make one proxy's (``client_proxy.workers.merge``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from client_proxy.workers import Registry, families_of, merge


def _worker(requests: int, in_flight: int, generation: int, ready: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("requests", "r", ["route"], registry=registry).labels("/a").inc(requests)
    Gauge("in_flight", "f", registry=registry).set(in_flight)
    Gauge("generation", "g", registry=registry).set(generation)
    Gauge("ready", "ready", registry=registry).set(ready)
    histogram = Histogram("latency", "l", buckets=(0.1, 1.0), registry=registry)
    for _ in range(requests):
        histogram.observe(0.05)
    return registry


def test_counters_and_histograms_add_up_and_gauges_merge_by_their_rule() -> None:
    workers = [_worker(3, 1, 5, 1), _worker(4, 2, 4, 0)]
    merged = merge([families_of(w) for w in workers], {"generation": "min", "ready": "self"})
    text = generate_latest(Registry(merged)).decode()  # type: ignore[arg-type]
    assert 'requests_total{route="/a"} 7.0' in text
    assert 'latency_bucket{le="0.1"} 7.0' in text and "latency_count 7.0" in text
    assert "in_flight 3.0" in text  # summed: the default for a gauge
    assert "generation 4.0" in text  # min
    assert "ready 1.0" in text  # the first worker's (the one answering the scrape)
    assert "_created" not in text


def test_a_label_set_one_worker_alone_has_is_kept() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Counter("calls", "c", ["service"], registry=first).labels("setosa").inc(2)
    Counter("calls", "c", ["service"], registry=second).labels("virginica").inc(5)
    merged = merge([families_of(first), families_of(second)], {})
    text = generate_latest(Registry(merged)).decode()  # type: ignore[arg-type]
    assert 'calls_total{service="setosa"} 2.0' in text and 'calls_total{service="virginica"} 5.0' in text
