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
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from client_proxy.core.services import Target

logger = logging.getLogger("client_proxy.replicas")

State = Literal["healthy", "ejected", "probing"]


class Listener(Protocol):
    """Who hears of each call's outcome and of each ejection and return (the metrics)."""

    def replica_call(self, service: str, replica: str, outcome: str) -> None: ...

    def replica_state(self, service: str, replica: str, state: State) -> None: ...

    def retry(self, service: str) -> None: ...


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
    ) -> None:
        self.service = service
        self.replicas = [Replica(t) for t in targets]
        self._listener = listener
        self._failures_to_eject = failures_to_eject
        self._base_ejection_s = base_ejection_s
        self._max_ejection_s = max_ejection_s
        self._random = rng or random.Random()

    def __len__(self) -> int:
        return len(self.replicas)

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica:
        """The replica for the next call (none of ``exclude`` unless nothing else is left)."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        now = time.monotonic()
        excluded = {id(r) for r in exclude}
        left = [r for r in self.replicas if id(r) not in excluded] or self.replicas
        # Healthy ones; a half-open one takes a single probing call at a time.
        open_ = [r for r in left if not r.ejected or (now >= r.ejected_until and r.outstanding == 0)]
        if not open_:
            return min(left, key=lambda r: (r.ejected_until, r.outstanding))
        if len(open_) == 1:
            return open_[0]
        a, b = self._random.sample(open_, 2)
        return a if a.outstanding <= b.outstanding else b

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        if replica.ejected:
            replica.ejected = False
            replica.ejections = 0
            logger.info("replica %s of %s returns: its probe succeeded", replica.name, self.service)
            self._state(replica, "healthy")
        self._call(replica, "ok")

    def failed(self, replica: Replica, reason: str, fatal: bool, message: str) -> None:
        """A call to ``replica`` failed: ``fatal`` (unreachable, not ready) ejects it at once,
        other failures after ``failures_to_eject`` in a row; a failed probe always does."""
        self._call(replica, reason)
        replica.failures += 1
        now = time.monotonic()
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

    def describe(self) -> list[dict[str, object]]:
        """Each replica's state and why, for ``/health/all`` and ``/metadata``."""
        now = time.monotonic()
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
