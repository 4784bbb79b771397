"""Replicas of a service: which one gets a call, and which ones are left alone for a while.

Balancing: the power of two choices over outstanding calls (two replicas drawn at random among
those that may take calls, the one with fewer calls in flight wins), which spreads load nearly
as well as "least outstanding" without every caller piling onto the same idle replica.

Outlier ejection, after Envoy's: a replica that is unreachable or whose model is not ready is
ejected at once; one that fails or times out ``failures_to_eject`` times in a row is ejected
too. An ejected replica gets no calls for a back-off that doubles with each ejection in a row
(``base_ejection_s`` up to ``max_ejection_s``); then it is half-open: one call probes it, and
its success returns it (a failure ejects it again, for longer). A service whose replicas are
all ejected still calls the one whose ejection ends first (better a call that may fail than
no call at all). Inference is read-only, so a call that failed fast may be sent again.

Hedging, after "The Tail at Scale" (Dean and Barroso, 2013): the set keeps a window of the
service's recent call latencies (for a hedge delay given as a percentile) and a token bucket
that bounds hedged calls to a fraction of all calls (``hedge_budget``): each call adds that
fraction of a token, each hedge takes a whole one, and the bucket holds what
``HEDGE_BURST_CALLS`` calls deposit (so over any stretch of calls, hedges stay within the
budget's fraction of them plus that burst).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from client_proxy.core.services import Hedge, Target

logger = logging.getLogger("client_proxy.replicas")

State = Literal["healthy", "ejected", "probing"]
Balancer = Literal["p2c", "least_outstanding", "round_robin"]

#: Latencies kept per service for a percentile hedge delay, and how many it needs first.
LATENCY_WINDOW = 1024
MIN_LATENCIES = 32
#: Percentiles are computed again after this many new latencies (not on every call).
PERCENTILE_EVERY = 64
#: No hedge sooner than this after its call, whatever the percentile says.
MIN_HEDGE_DELAY_S = 0.001
#: The budget's bucket holds what this many calls deposit: after a calm spell, a stall may
#: be hedged in a burst of up to ``hedge_budget`` x this many calls (100 at 10%).
HEDGE_BURST_CALLS = 1000


class Listener(Protocol):
    """Who hears of each call's outcome and of each ejection and return (the metrics)."""

    def replica_call(self, service: str, replica: str, outcome: str) -> None: ...

    def replica_state(self, service: str, replica: str, state: State) -> None: ...

    def retry(self, service: str) -> None: ...

    def hedge(self, service: str, outcome: str) -> None:
        """A hedge was ``sent``, ``won``, or not sent (``budget``, ``deadline``, ``no_replica``)."""


@dataclass
class Replica:
    target: Target
    outstanding: int = 0
    """Calls in flight to it now."""
    failures: int = 0
    """Failures in a row."""
    ejections: int = 0
    """Ejections in a row (a successful probe ends the run... after it has stayed healthy)."""
    ejected_until: float = 0.0
    ejected: bool = False
    reason: str = ""
    """Why it was last ejected."""

    @property
    def name(self) -> str:
        return self.target.describe()

    def state(self, now: float) -> State:
        if not self.ejected:
            return "healthy"
        return "ejected" if now < self.ejected_until else "probing"


class Latencies:
    """A sliding window of a service's recent call latencies, and percentiles of it."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._values = np.zeros(size)
        self._count = 0
        self._percentiles: dict[float, float] = {}

    def __len__(self) -> int:
        return min(self._count, len(self._values))

    def add(self, seconds: float) -> None:
        self._values[self._count % len(self._values)] = seconds
        self._count += 1
        if self._count % PERCENTILE_EVERY == 0:
            self._percentiles.clear()

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile of the window (seconds); None before ``MIN_LATENCIES`` calls."""
        if self._count < MIN_LATENCIES:
            return None
        value = self._percentiles.get(q)
        if value is None:
            value = self._percentiles[q] = float(np.percentile(self._values[: len(self)], q))
        return value


class HedgeBudget:
    """A token bucket: each call adds ``ratio`` of a token, each hedge takes one; so hedges stay
    within ``ratio`` of the calls, give or take a burst of ``burst`` (``ratio`` x ``burst_calls``)."""

    def __init__(self, ratio: float, burst_calls: int = HEDGE_BURST_CALLS) -> None:
        self.ratio = ratio
        self.burst = ratio * burst_calls
        self.tokens = self.burst

    def deposit(self) -> None:
        self.tokens = min(self.tokens + self.ratio, self.burst)

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ReplicaSet:
    """The replicas of one service, and their health as the calls to them found it."""

    def __init__(
        self,
        service: str,
        targets: Iterable[Target],
        listener: Listener | None = None,
        failures_to_eject: int = 5,
        base_ejection_s: float = 1.0,
        max_ejection_s: float = 30.0,
        rng: random.Random | None = None,
        balancer: Balancer = "p2c",
        hedge_budget: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: seconds, as ``time.monotonic`` (a test's own clock stands in for it)."""
        self.service = service
        self.replicas = [Replica(t) for t in targets]
        self.balancer = balancer
        self._turn = itertools.count()
        self.latencies = Latencies()
        self.budget = HedgeBudget(hedge_budget)
        #: Calls (first tries), hedges sent and hedges that answered first.
        self.calls = self.hedges = self.hedges_won = 0
        self._listener = listener
        self._failures_to_eject = failures_to_eject
        self._base_ejection_s = base_ejection_s
        self._max_ejection_s = max_ejection_s
        self._random = rng or random.Random()
        self._clock = clock

    def __len__(self) -> int:
        return len(self.replicas)

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica:
        """The replica for the next call (none of ``exclude`` unless nothing else is left)."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        now = self._clock()
        excluded = {id(r) for r in exclude}
        left = [r for r in self.replicas if id(r) not in excluded] or self.replicas
        # Healthy ones; a half-open one takes a single probing call at a time.
        open_ = [r for r in left if not r.ejected or (now >= r.ejected_until and r.outstanding == 0)]
        if not open_:
            return min(left, key=lambda r: (r.ejected_until, r.outstanding))
        if len(open_) == 1:
            return open_[0]
        if self.balancer == "round_robin":
            return open_[next(self._turn) % len(open_)]
        if self.balancer == "least_outstanding":
            least = min(r.outstanding for r in open_)
            return self._random.choice([r for r in open_ if r.outstanding == least])
        a, b = self._random.sample(open_, 2)
        return a if a.outstanding <= b.outstanding else b

    def other(self, tried: Iterable[Replica]) -> Replica | None:
        """A replica not in ``tried`` that may take a call now (not ejected), for a hedge."""
        now = self._clock()
        excluded = {id(r) for r in tried}
        if not any(id(r) not in excluded and r.state(now) == "healthy" for r in self.replicas):
            return None
        replica = self.pick(tried)
        return None if id(replica) in excluded or replica.state(now) != "healthy" else replica

    def hedge_delay(self, hedge: Hedge) -> float | None:
        """How long a call waits before it is hedged; None: it is not (hedging off, one replica,
        or not enough latencies known yet for a percentile)."""
        if len(self.replicas) < 2 or not hedge.on:
            return None
        if hedge.delay_ms:
            return hedge.delay_ms / 1000
        value = self.latencies.percentile(hedge.percentile)
        return None if value is None else max(value, MIN_HEDGE_DELAY_S)

    def hedging(self, hedge: Hedge) -> dict[str, object]:
        """The service's hedging now, for ``/health/all`` and ``/metadata``."""
        delay = self.hedge_delay(hedge)
        return {
            "hedge": hedge.describe(),
            "delay_ms": None if delay is None else round(delay * 1000, 3),
            "calls": self.calls,
            "hedges": self.hedges,
            "hedges_won": self.hedges_won,
            "extra_load": round(self.hedges / self.calls, 4) if self.calls else 0.0,
            "budget": self.budget.ratio,
        }

    def succeeded(self, replica: Replica, outcome: str = "ok") -> None:
        """A call to ``replica`` was answered: ``ok``, or ``rejected`` (the input was at fault)."""
        replica.failures = 0
        if replica.ejected:
            replica.ejected = False
            replica.ejections = 0
            logger.info("replica %s of %s returns: its probe succeeded", replica.name, self.service)
            self._state(replica, "healthy")
        self._call(replica, outcome)

    def failed(self, replica: Replica, reason: str, fatal: bool, message: str) -> None:
        """A call to ``replica`` failed: ``fatal`` (unreachable, not ready) ejects it at once,
        other failures after ``failures_to_eject`` in a row; a failed probe always does."""
        self._call(replica, reason)
        replica.failures += 1
        now = self._clock()
        probing = replica.ejected and now >= replica.ejected_until
        if fatal or probing or replica.failures >= self._failures_to_eject:
            if replica.ejected and not probing:
                return  # already out (a call sent before the ejection came back)
            replica.ejections += 1
            back_off = min(self._base_ejection_s * 2 ** (replica.ejections - 1), self._max_ejection_s)
            replica.ejected, replica.ejected_until = True, now + back_off
            replica.reason = message
            if len(self.replicas) > 1:
                logger.warning(
                    "replica %s of %s ejected for %.1f s (ejection %d in a row): %s",
                    replica.name, self.service, back_off, replica.ejections, message,
                )  # fmt: skip
            self._state(replica, "ejected")

    def cancelled(self, replica: Replica) -> None:
        """A call to ``replica`` was cancelled (it lost to a hedge): says nothing of its health."""
        self._call(replica, "cancelled")

    def describe(self) -> list[dict[str, object]]:
        """Each replica's state and why, for ``/health/all`` and ``/metadata``."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for r in self.replicas:
            entry: dict[str, object] = {"target": r.name, "state": r.state(now), "outstanding": r.outstanding}
            if r.ejected:
                entry["reason"] = r.reason
                entry["ejected_for_s"] = round(max(r.ejected_until - now, 0.0), 3)
            out.append(entry)
        return out

    def _call(self, replica: Replica, outcome: str) -> None:
        if self._listener is not None:
            self._listener.replica_call(self.service, replica.name, outcome)

    def _state(self, replica: Replica, state: State) -> None:
        if self._listener is not None:
            self._listener.replica_state(self.service, replica.name, state)
