"""``/experiments``: what each experiment does and how its variants compare while it serves
(``core/experiments.py``, ``core/shadows.py``). Registered with the admin endpoints, behind the
same token: the disagreeing rows are the requests' answers."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from client_proxy.api.routes.admin import Admin
from client_proxy.api.state import JSON, ProxyState
from client_proxy.errors import ProxyError

router = APIRouter(prefix="/experiments", tags=["admin"])


class UnknownExperiment(ProxyError):
    status_code = 404
    code = "unknown_experiment"


def _figures(state: ProxyState, name: str) -> dict[str, Any]:
    counts = dict(state.shadows.counts.get(name, {})) if state.shadows is not None else {}
    for outcome in ("agree", "disagree", "failed", "dropped"):
        counts.setdefault(outcome, 0)
    compared = counts["agree"] + counts["disagree"]
    found: dict[str, Any] = {
        "rows": counts,
        "agreement": round(counts["agree"] / compared, 6) if compared else None,
    }
    if state.settings.workers > 1:
        found["worker"] = os.getpid()  # each worker compares its own requests' rows
    return found


@router.get("", response_class=JSON, responses={401: {"description": "Missing or wrong token"}})
async def list_experiments(request: Request, by: Admin) -> JSON:
    """Every experiment: its variants, splits and shadows, and its rows compared so far."""
    state: ProxyState = request.app.state.proxy
    experiments = state.config.experiments
    return JSON(
        {"experiments": {n: {**e.describe(), **_figures(state, n)} for n, e in sorted(experiments.items())}}
    )


@router.get("/{name}", response_class=JSON, responses={401: {}, 404: {}})
async def experiment(request: Request, name: str, by: Admin) -> JSON:
    """One experiment, its rows compared (``agree``, ``disagree``, ``failed``; copies ``dropped``)
    and the disagreeing rows kept (``disagreements``, the oldest first): request id, row, both
    answers."""
    state: ProxyState = request.app.state.proxy
    found = state.config.experiments.get(name)
    if found is None:
        known = ", ".join(sorted(state.config.experiments)) or "none"
        raise UnknownExperiment(f"no experiment {name!r} (known: {known})")
    sample = state.shadows.sample(name) if state.shadows is not None else []
    return JSON({**found.describe(), **_figures(state, name), "disagreements": sample})
