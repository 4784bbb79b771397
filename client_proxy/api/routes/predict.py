"""``/predict``, ``/predict/label``, ``/predict/stream`` and the seed's two test endpoints."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from numpy.typing import NDArray

from client_proxy.api.answers import label_body, line, predictions_body, service_line
from client_proxy.api.inputs import SAMPLE_ROW, header
from client_proxy.api.openapi import ERRORS, LABEL, LABELS, PARAMETERS, PREDICTIONS, WITH_BODY
from client_proxy.api.options import CallOptions, call_options
from client_proxy.api.reading import read_rows, with_keys
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.fanout import FanOutResult, Labels, Outcome, aggregate, failure
from client_proxy.core.services import TimeoutPolicy
from client_proxy.errors import InvalidInput
from client_proxy.observability import log_request

router = APIRouter(tags=["predict"])


_SAMPLE = np.asarray([SAMPLE_ROW], dtype=np.float32)


async def ensure_fit(state: ProxyState, x: NDArray[np.float32], options: CallOptions) -> None:
    """422 before any inference call when the rows do not fit a service's model."""
    if not state.gateway.fits(state.services, x):
        await state.gateway.ensure_fit(state.services, x, max(options.deadline - time.monotonic(), 0.001))


async def _fan_out(
    state: ProxyState, x: NDArray[np.float32], options: CallOptions, endpoint: str
) -> FanOutResult:
    await ensure_fit(state, x, options)
    result = await state.fanout.run(state.services, x, options.request_id, options.deadline, options.policy)
    log_request(options.request_id, endpoint, result.outcomes)
    if result.partial:
        state.metrics.partial_answers.labels(endpoint).inc()
    return result


async def _ensemble(state: ProxyState, x: NDArray[np.float32], options: CallOptions) -> Labels:
    """Triton's own fan-out: one call to the ensemble, bounded and recorded like a service call."""
    service = state.ensemble

    def call(budget: float) -> Awaitable[NDArray[Any]]:
        return state.ensemble_rows(service, x, options.request_id, budget)

    rows, outcome = await state.fanout.call_alone(service, call, options.deadline)
    log_request(options.request_id, "/predict/label?route=ensemble", [outcome])
    return Labels(names=rows[:, 0].tolist(), proba=rows[:, 1].astype(np.float32))


@router.post("/predict", response_class=JSON, openapi_extra=WITH_BODY, responses=PREDICTIONS)
async def predict(request: Request) -> JSON:
    """Every service's ``[P(class), P(other)]`` for the rows, each service called once, concurrently."""
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    rows, fetched = await read_rows(request, state, options)
    result = await _fan_out(state, rows, options, "/predict")
    return JSON(with_keys(predictions_body(result, one_row=rows.shape[0] == 1), fetched))


@router.post("/predict/label", response_class=JSON, openapi_extra=LABEL, responses=LABELS)
async def predict_label(request: Request) -> JSON:
    """The label per row: the service whose P(class) is highest, and that probability.

    ``?route=ensemble`` (or ``X-Route``, or ``PROXY_LABEL_ROUTE``) answers with one call to
    Triton's own ensemble instead of the proxy's fan-out; the answer has the same shape.
    """
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    route = request.query_params.get("route") if request.scope["query_string"] else None
    route = route or header(request, "x-route") or state.settings.label_route
    if route not in ("fanout", "ensemble"):
        raise InvalidInput(f"route: must be 'fanout' or 'ensemble', not {route[:40]!r}")
    rows, fetched = await read_rows(request, state, options)
    if route == "ensemble":
        labelled = await _ensemble(state, rows, options)
        return JSON(with_keys(label_body(labelled, rows.shape[0] == 1, None), fetched))
    result = await _fan_out(state, rows, options, "/predict/label")
    labels = aggregate({name: result.outcomes[name].probabilities for name in result.answered})  # type: ignore[misc]
    return JSON(with_keys(label_body(labels, rows.shape[0] == 1, result), fetched))


@router.get("/predict/get/test", response_class=JSON, openapi_extra=PARAMETERS, responses=PREDICTIONS)
async def predict_get_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]``."""
    state: ProxyState = request.app.state.proxy
    result = await _fan_out(state, _SAMPLE, call_options(request, state.settings), "/predict/get/test")
    return JSON(predictions_body(result, one_row=True))


@router.post("/predict/post/test", response_class=JSON, openapi_extra=PARAMETERS, responses=PREDICTIONS)
async def predict_post_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]`` (the body is ignored)."""
    state: ProxyState = request.app.state.proxy
    result = await _fan_out(state, _SAMPLE, call_options(request, state.settings), "/predict/post/test")
    return JSON(predictions_body(result, one_row=True))


@router.post(
    "/predict/stream",
    openapi_extra=WITH_BODY,
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "One JSON line per service, then the label",
        },
        **ERRORS,
    },
)
async def predict_stream(request: Request) -> StreamingResponse:
    """The asynchronous variant: one NDJSON line per service the moment it answers (completion
    order), then a final line ``{"final": true, "prediction": ...}`` with the aggregated label."""
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    rows, fetched = await read_rows(request, state, options)
    one_row = rows.shape[0] == 1
    await ensure_fit(state, rows, options)

    async def lines() -> AsyncIterator[bytes]:
        arrived: list[Outcome] = []
        async for outcome in state.fanout.stream(state.services, rows, options.request_id, options.deadline):
            arrived.append(outcome)
            yield service_line(outcome, one_row)
            if not outcome.ok and options.policy is TimeoutPolicy.ALL_OR_NOTHING:
                break
        log_request(options.request_id, "/predict/stream", arrived)
        yield line(with_keys(_final_line(state, arrived, one_row, options.policy), fetched))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _final_line(
    state: ProxyState, arrived: list[Outcome], one_row: bool, policy: TimeoutPolicy
) -> dict[str, Any]:
    missing = {o.service: failure(o) for o in arrived if not o.ok}
    answered = {o.service: o.probabilities for o in arrived if o.probabilities is not None}
    order = [s.name for s in state.services]
    final: dict[str, Any] = {"final": True}
    if (missing and policy is TimeoutPolicy.ALL_OR_NOTHING) or not answered:
        names = ", ".join(f"{n} ({m.reason})" for n, m in missing.items())
        final["error"] = {"code": "services_failed", "message": f"no answer: {names}", "services": missing}
        return final
    labels = aggregate({name: answered[name] for name in order if name in answered})
    final.update(label_body(labels, one_row, None))
    if missing:
        state.metrics.partial_answers.labels("/predict/stream").inc()
        final["partial"] = True
        final["missing"] = missing
    return final


#: The hot routes, served as plain Starlette routes placed in front of the FastAPI ones (which
#: stay for the OpenAPI documentation): the handlers take only the request, so FastAPI's
#: per-request machinery (dependency solving, parameter analysis) would be pure overhead.
FAST_ROUTES = [
    ("/predict", predict, ["POST"]),
    ("/predict/label", predict_label, ["POST"]),
    ("/predict/stream", predict_stream, ["POST"]),
    ("/predict/get/test", predict_get_test, ["GET"]),
    ("/predict/post/test", predict_post_test, ["POST"]),
]
