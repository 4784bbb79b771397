"""What came back from the services of one request: each one's ``Outcome`` and, together, the
``FanOutResult`` (who answered, who did not and why)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from client_proxy.errors import Failure, UpstreamError


@dataclass(frozen=True)
class Outcome:
    """One service's part of one request."""

    service: str
    probabilities: NDArray[np.float32] | None
    """``[N, 2]``: ``[P(class), P(other)]`` per row; None when the service did not answer."""
    error: UpstreamError | None
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        return "ok" if self.error is None else self.error.reason


@dataclass(frozen=True)
class FanOutResult:
    outcomes: dict[str, Outcome]
    """By service name, in the services' order."""
    answered: list[str] = field(default_factory=list)
    missing: dict[str, Failure] = field(default_factory=dict)
    """Service name -> why, for each service that did not answer."""

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    @classmethod
    def of(cls, ordered: dict[str, Outcome]) -> FanOutResult:
        """The result of these outcomes (in the services' order): who answered, who did not and why."""
        answered = [name for name, o in ordered.items() if o.error is None]
        if len(answered) == len(ordered):  # all answered, the common case
            return cls(ordered, answered, {})
        missing = {name: failure(o) for name, o in ordered.items() if o.error is not None}
        return cls(ordered, answered, missing)


def failure(outcome: Outcome) -> Failure:
    assert outcome.error is not None
    return Failure.of(outcome.error)
