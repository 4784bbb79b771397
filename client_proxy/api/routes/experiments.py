"""``/experiments``: what each experiment does and how its variants compare while it serves
(``core/experiments.py``, ``core/shadows.py``). Registered with the admin endpoints, behind the
same token: the disagreeing rows are the requests' answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from client_proxy.api.routes.admin import Admin
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.shadows import merged
from client_proxy.errors import ProxyError

router = APIRouter(prefix="/experiments", tags=["admin"])


class UnknownExperiment(ProxyError):
    status_code = 404
    code = "unknown_experiment"


async def _snapshots(state: ProxyState) -> list[dict[str, Any]]:
    """Every worker's comparisons (``Shadows.now()``), asked once per answer."""
    assert state.shadows is not None
    sharing = state.sharing
    return await sharing.gather("experiments") if sharing is not None else [state.shadows.now()]


def _figures(snapshots: list[dict[str, Any]], name: str, keep: int) -> tuple[dict[str, Any], list[Any]]:
    """The experiment's rows compared so far and the disagreeing rows kept: every worker's."""
    counts, sample = merged(snapshots, name, keep)
    for outcome in ("agree", "disagree", "failed", "dropped"):
        counts.setdefault(outcome, 0)
    compared = counts["agree"] + counts["disagree"]
    agreement = round(counts["agree"] / compared, 6) if compared else None
    return {"rows": counts, "agreement": agreement}, sample


@router.get("", response_class=JSON, responses={401: {"description": "Missing or wrong token"}})
async def list_experiments(request: Request, by: Admin) -> JSON:
    """Every experiment: its variants, splits and shadows, and its rows compared so far."""
    state: ProxyState = request.app.state.proxy
    found = {}
    snapshots = await _snapshots(state)
    for name, experiment in sorted(state.config.experiments.items()):
        figures, _ = _figures(snapshots, name, 0)
        found[name] = {**experiment.describe(), **figures}
    return JSON({"experiments": found})


@router.get("/{name}", response_class=JSON, responses={401: {}, 404: {}})
async def experiment(request: Request, name: str, by: Admin) -> JSON:
    """One experiment, its rows compared (``agree``, ``disagree``, ``failed``; copies ``dropped``)
    and the disagreeing rows kept (``disagreements``, the oldest first): request id, row, both
    answers. With several workers, every worker's."""
    state: ProxyState = request.app.state.proxy
    found = state.config.experiments.get(name)
    if found is None:
        known = ", ".join(sorted(state.config.experiments)) or "none"
        raise UnknownExperiment(f"no experiment {name!r} (known: {known})")
    figures, sample = _figures(await _snapshots(state), name, found.sample)
    return JSON({**found.describe(), **figures, "disagreements": sample})
