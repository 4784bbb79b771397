"""What a request asks for besides its body: its timeout policy and deadline (query or headers).
(Its body is read within that deadline by ``reading.py``.)"""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from client_proxy.api.inputs import header
from client_proxy.config import Settings
from client_proxy.core.services import TimeoutPolicy
from client_proxy.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class CallOptions:
    request_id: str
    policy: TimeoutPolicy | None
    """As the client asked; None: the model's own, else ``PROXY_TIMEOUT_POLICY`` (the dataplane's)."""
    started: float
    deadline: float
    """``time.monotonic()`` instant by which the answer must be sent (a composition's own
    ``deadline_ms`` may shorten it: the dataplane's)."""


POLICIES = {p.value: p for p in TimeoutPolicy}

#: Where the front leaves a request's id and arrival (``time.monotonic()``) in its ASGI scope.
ARRIVAL = "client_proxy.arrival"


_NO_QUERY: dict[str, str] = {}


#: No answer can come back in less: a shorter deadline is refused as a bad request.
MIN_DEADLINE_MS = 50.0


def call_options(request: Request, settings: Settings) -> CallOptions:
    """Policy and deadline from ``?policy=`` / ``X-Timeout-Policy`` and ``?deadline_ms=`` / ``X-Deadline-Ms``.

    Read by hand rather than through FastAPI's dependency injection: these routes are the hot
    path, and the injection machinery cost more CPU per request than the fan-out itself.
    """
    query = request.query_params if request.scope["query_string"] else _NO_QUERY
    policy = None
    # The query parameter wins over the header; an invalid value is refused wherever it is.
    for where, raw_policy in (
        ("X-Timeout-Policy", header(request, "x-timeout-policy")),
        ("policy", query.get("policy")),
    ):
        if raw_policy is not None:
            if raw_policy not in POLICIES:
                raise InvalidInput(f"{where}: must be 'all_or_nothing' or 'partial', not {raw_policy[:40]!r}")
            policy = POLICIES[raw_policy]
    budget_ms = ceiling_ms = settings.deadline_ms
    for where, raw_deadline in (
        ("X-Deadline-Ms", header(request, "x-deadline-ms")),
        ("deadline_ms", query.get("deadline_ms")),
    ):
        if raw_deadline is not None:
            try:
                asked = float(raw_deadline)
            except ValueError:
                asked = float("nan")
            if not MIN_DEADLINE_MS <= asked < float("inf"):
                raise InvalidInput(
                    f"{where}: must be at least {MIN_DEADLINE_MS:g} milliseconds, not {raw_deadline[:40]!r}"
                )
            budget_ms = min(asked, ceiling_ms)
    request_id, started = request.scope.get(ARRIVAL) or ("", time.monotonic())
    return CallOptions(request_id, policy, started, started + budget_ms / 1000.0)
