"""``GET /compositions`` and ``POST /compositions/{name}/predict|label``: any models, declared.

Each composition (``PROXY_COMPOSITIONS_FILE``) names its services, their weights and the
aggregator; ``default`` is the ``SERVICE_*`` services with the seed's ``one_vs_rest`` rule,
unless the file declares its own ``default``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from client_proxy.api.answers import label_rows, line, predictions_body, service_line, with_alerts
from client_proxy.api.openapi import COMPOSITION_BODY, COMPOSITION_ERRORS
from client_proxy.api.options import CallOptions, call_options
from client_proxy.api.reading import read_inputs, with_keys
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.compositions import (
    Composition,
    CompositionAnswer,
    aggregate,
    check_rules,
    enough_answers,
    run_composition,
)
from client_proxy.core.fanout import FanOutResult, Outcome, failure
from client_proxy.core.features import Fetched
from client_proxy.core.tensors import Inputs, row_count
from client_proxy.errors import InvalidInput, ProxyError, UnknownComposition
from client_proxy.observability import log_request

router = APIRouter(tags=["compositions"])


def _composition(state: ProxyState, name: str) -> Composition:
    found: Composition | None = state.compositions.get(name)
    if found is None and name == "default":
        found = state.default_composition()
    if found is None:
        known = ", ".join(sorted({*state.compositions, "default"}))
        raise UnknownComposition(f"no composition {name!r} (known: {known})")
    return found


@router.get("/compositions", response_class=JSON)
async def list_compositions(request: Request) -> JSON:
    """Every composition: its services and targets, weights, aggregator, classes, policy, deadline."""
    state: ProxyState = request.app.state.proxy
    every = {"default": state.default_composition(), **state.compositions}
    return JSON(
        {"file": state.compositions_source, "compositions": {n: c.describe() for n, c in every.items()}}
    )


async def _read(
    state: ProxyState, name: str, request: Request
) -> tuple[Composition, CallOptions, Inputs, Fetched | None]:
    """The composition, the request's policy and deadline (within the composition's), its input
    (and, by key, what the store gave)."""
    composition = _composition(state, name)
    options = call_options(request, state.settings, composition.timeout_policy, composition.deadline_ms)
    rows, fetched = await read_inputs(
        request, state, options, composition.features, forward=composition.keys == "forward"
    )
    return composition, options, rows, fetched


async def _run(
    state: ProxyState, name: str, request: Request, endpoint: str
) -> tuple[Composition, CompositionAnswer, bool, Fetched | None]:
    composition, options, rows, fetched = await _read(state, name, request)
    answer = await run_composition(
        composition,
        rows,
        state.gateway,
        state.fanout,
        options.request_id,
        options.deadline,
        options.policy,
        state.alerts,
    )
    log_request(options.request_id, endpoint, list(answer.result.outcomes.values()))
    if answer.result.partial:
        state.metrics.partial_answers.labels(endpoint).inc()
    return composition, answer, row_count(rows) == 1, fetched


@router.post(
    "/compositions/{name}/predict",
    response_class=JSON,
    openapi_extra=COMPOSITION_BODY,
    responses=COMPOSITION_ERRORS,
)
async def predict(name: str, request: Request) -> JSON:
    """Every service's output for the rows: ``{service: {"prediction": ...}}``, as ``/predict``;
    a service that did not answer has ``"prediction": null`` and an ``"error"``."""
    state: ProxyState = request.app.state.proxy
    _, answer, one_row, fetched = await _run(state, name, request, "/compositions/{name}/predict")
    return JSON(with_keys(with_alerts(predictions_body(answer.result, one_row), answer.alerts), fetched))


@router.post(
    "/compositions/{name}/label",
    response_class=JSON,
    openapi_extra=COMPOSITION_BODY,
    responses=COMPOSITION_ERRORS,
)
async def label(name: str, request: Request) -> JSON:
    """The aggregated answer per row: ``{"label", "proba", "scores"}`` (one object for one row,
    a list for N), marked ``partial`` with each ``missing`` service's reason when some did not answer."""
    state: ProxyState = request.app.state.proxy
    composition = _composition(state, name)
    if composition.aggregator == "none":
        raise InvalidInput(
            f"composition {name!r} has no aggregator (aggregator: none): use /compositions/{name}/predict"
        )
    _, answer, one_row, fetched = await _run(state, name, request, "/compositions/{name}/label")
    rows = label_rows(answer)
    body: dict[str, Any] = {"prediction": rows[0] if one_row else rows}
    if answer.result.partial:
        body["partial"] = True
        body["missing"] = answer.result.missing
    return JSON(with_keys(with_alerts(body, answer.alerts), fetched))


@router.post(
    "/compositions/{name}/stream",
    openapi_extra=COMPOSITION_BODY,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "One JSON line per service, then the answer",
        },
        **COMPOSITION_ERRORS,
    },
)
async def stream(name: str, request: Request) -> StreamingResponse:
    """The asynchronous variant: one NDJSON line per service the moment it answers, then a final
    line ``{"final": true, ...}`` with the aggregated answer (or the error, when too few answered)."""
    state: ProxyState = request.app.state.proxy
    composition, options, rows, fetched = await _read(state, name, request)
    one_row = row_count(rows) == 1
    services = composition.services
    await state.gateway.ensure_fit(services, rows, max(options.deadline - time.monotonic(), 0.001))

    async def lines() -> AsyncIterator[bytes]:
        arrived: list[Outcome] = []
        async for outcome in state.fanout.stream(services, rows, options.request_id, options.deadline):
            arrived.append(outcome)
            yield service_line(outcome, one_row)
        log_request(options.request_id, "/compositions/{name}/stream", arrived)
        by_name = {o.service: o for o in arrived}
        ordered = {s.name: by_name[s.name] for s in services if s.name in by_name}
        result = FanOutResult(
            outcomes=ordered,
            answered=[n for n, o in ordered.items() if o.ok],
            missing={n: failure(o) for n, o in ordered.items() if not o.ok},
        )
        final: dict[str, Any] = {"final": True}
        try:
            enough_answers(composition, result, options.policy)
            aggregated, classes = await aggregate(composition, result, state.gateway, rows, options.deadline)
        except ProxyError as exc:
            final.update(exc.body())
        else:
            if aggregated is not None:
                labelled = label_rows(CompositionAnswer(result, aggregated, classes))
                final["prediction"] = labelled[0] if one_row else labelled
            alerts = check_rules(composition, result, aggregated, classes, options.request_id, state.alerts)
            with_alerts(final, alerts)
        if result.partial:
            final["partial"] = True
            final["missing"] = result.missing
            state.metrics.partial_answers.labels("/compositions/{name}/stream").inc()
        yield line(with_keys(final, fetched))

    return StreamingResponse(lines(), media_type="application/x-ndjson")
