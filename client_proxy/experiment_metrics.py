"""The metrics of the experiments (``core/experiments.py``) and their shadows (``core/shadows.py``):
the dataplane's and the shadows' observer, registered with the proxy's (``ProxyMetrics``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from client_proxy.observability import LATENCY_BUCKETS, LoopCounter, LoopHistogram

#: |score differences| between two variants, on [0, 1].
DELTA_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class ExperimentMetrics:
    """Requests per variant, each variant's time, the shadows' copies and rows compared."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.variant_requests = LoopCounter(
            "proxy_variant_requests",
            "Requests an experiment's variant answered, by experiment and variant",
            ["experiment", "variant"],
            registry=r,
        )
        self.variant_duration = LoopHistogram(
            "proxy_variant_duration_seconds",
            "Time for an experiment's variant to answer, by role: answered (the client's answer, "
            "from the call of the model to its answer) or shadow (a copy, off the request's path)",
            ["experiment", "variant", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_requests = LoopCounter(
            "proxy_shadow_requests",
            "Copies of requests to an experiment's shadow, by outcome: answered, failed (no answer "
            "within its deadline, or an error), dropped (too many waiting: PROXY_SHADOW_QUEUE)",
            ["experiment", "shadow", "outcome"],
            registry=r,
        )
        self.shadow_rows = LoopCounter(
            "proxy_shadow_rows",
            "Rows a shadow answered compared with the variant that answered the client: agree "
            "(the same label), disagree, or failed (the shadow gave no answer)",
            ["experiment", "variant", "shadow", "outcome"],
            registry=r,
        )
        self.shadow_score_delta = LoopHistogram(
            "proxy_shadow_score_delta",
            "Per row and class, |shadow's score - answered variant's score| (class probabilities)",
            ["experiment", "variant", "shadow", "class"],
            buckets=DELTA_BUCKETS,
            registry=r,
        )

    def variant_answered(self, experiment: str, variant: str, seconds: float) -> None:
        self.variant_requests.inc((experiment, variant))
        self.variant_duration.observe((experiment, variant, "answered"), seconds)

    def variant_latency(self, experiment: str, variant: str, role: str, seconds: float) -> None:
        self.variant_duration.observe((experiment, variant, role), seconds)

    def shadow_request(self, experiment: str, shadow: str, outcome: str) -> None:
        self.shadow_requests.inc((experiment, shadow, outcome))

    def rows_compared(self, experiment: str, variant: str, shadow: str, outcome: str, rows: int) -> None:
        if rows:
            self.shadow_rows.inc((experiment, variant, shadow, outcome), rows)

    def score_deltas(self, experiment: str, variant: str, shadow: str, deltas: Mapping[str, Any]) -> None:
        observe = self.shadow_score_delta.observe
        for name, values in deltas.items():
            labels = (experiment, variant, shadow, name)
            for value in values.tolist():
                observe(labels, value)
