"""``GET /compositions`` and ``POST /compositions/{name}/predict|label``: any models, declared.

Each composition (``PROXY_COMPOSITIONS_FILE``) names its services, their weights and the
aggregator; ``default`` is the ``SERVICE_*`` services with the seed's ``one_vs_rest`` rule,
unless the file declares its own ``default``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from client_proxy.api.answers import (
    composition_label,
    composition_predictions,
    finished,
    line,
    service_line,
    with_alerts,
    with_missing,
)
from client_proxy.api.fastlane import route
from client_proxy.api.inputs import parse_inputs
from client_proxy.api.openapi import COMPOSITION_BODY, COMPOSITION_ERRORS, streamed
from client_proxy.api.reading import inference_request
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.compositions import Composition
from client_proxy.core.dataplane import InferenceRequest
from client_proxy.errors import InvalidInput

router = APIRouter(tags=["compositions"])


async def _request(state: ProxyState, request: Request, endpoint: str) -> InferenceRequest:
    name = request.path_params["name"]
    return await inference_request(request, state, name, endpoint, parse_inputs, kind="composition")


@router.get("/compositions", response_class=JSON)
async def list_compositions(request: Request) -> JSON:
    """Every composition: its services and targets, weights, aggregator, classes, policy, deadline."""
    config = request.app.state.proxy.config
    every = {"default": config.default, **config.compositions}
    return JSON(
        {"file": config.compositions_source, "compositions": {n: c.describe() for n, c in every.items()}}
    )


async def predict(request: Request) -> dict[str, Any]:
    """Every service's output for the rows: ``{service: {"prediction": ...}}``, as ``/predict``;
    a service that did not answer has ``"prediction": null`` and an ``"error"``."""
    state: ProxyState = request.app.state.proxy
    return composition_predictions(
        await state.plane.infer(await _request(state, request, "/compositions/{name}/predict"))
    )


async def label(request: Request) -> dict[str, Any]:
    """The aggregated answer per row: ``{"label", "proba", "scores"}`` (one object for one row,
    a list for N), marked ``partial`` with each ``missing`` service's reason when some did not answer."""
    state: ProxyState = request.app.state.proxy
    inference = await _request(state, request, "/compositions/{name}/label")
    inference.target = composition = state.plane.models.find(inference.model, "composition")
    if isinstance(composition, Composition) and composition.aggregator == "none":
        name = composition.name
        raise InvalidInput(
            f"composition {name!r} has no aggregator (aggregator: none): use /compositions/{name}/predict"
        )
    return composition_label(await state.plane.infer(inference))


async def stream(request: Request) -> StreamingResponse:
    """The asynchronous variant: one NDJSON line per service the moment it answers, then a final
    line ``{"final": true, ...}`` with the aggregated answer (or the error, when too few answered)."""
    state: ProxyState = request.app.state.proxy
    answer, outcomes = await state.plane.stream(await _request(state, request, "/compositions/{name}/stream"))

    async def lines() -> AsyncIterator[bytes]:
        async for outcome in outcomes:
            yield service_line(outcome, answer.one_row)
        final: dict[str, Any] = {"final": True}
        if answer.error is None and answer.aggregated is not None:
            final.update(composition_label(answer))
        else:
            if answer.error is not None:
                final.update(answer.error.body())
            finished(with_missing(with_alerts(final, answer.alerts), answer.result), answer)
        yield line(final)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


_TAGS = ["compositions"]
_STREAMED = streamed("One JSON line per service, then the answer", COMPOSITION_ERRORS)

#: The compositions' inference routes, served by the fast lane and documented by FastAPI.
ROUTES = [
    route("/compositions/{name}/predict", "POST", predict, _TAGS, COMPOSITION_ERRORS, COMPOSITION_BODY, JSON),
    route("/compositions/{name}/label", "POST", label, _TAGS, COMPOSITION_ERRORS, COMPOSITION_BODY, JSON),
    route(
        "/compositions/{name}/stream", "POST", stream, _TAGS, _STREAMED, COMPOSITION_BODY, StreamingResponse
    ),
]
