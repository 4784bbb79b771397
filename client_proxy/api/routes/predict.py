"""``/predict``, ``/predict/label``, ``/predict/stream`` and the seed's two test endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from client_proxy.api.answers import label_body, line, predictions_body, seed_labels, service_line
from client_proxy.api.inputs import SAMPLE_ROW, header, parse_rows
from client_proxy.api.openapi import ERRORS, LABEL, LABELS, PARAMETERS, PREDICTIONS, WITH_BODY
from client_proxy.api.options import call_options
from client_proxy.api.reading import inference_request, with_keys
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.dataplane import InferenceAnswer, InferenceRequest
from client_proxy.errors import InvalidInput

router = APIRouter(tags=["predict"])

#: The seed's routes are the default composition seen through the seed's JSON.
DEFAULT = "default"
_SAMPLE = np.asarray([SAMPLE_ROW], dtype=np.float32)


def _sample_request(request: Request, state: ProxyState, endpoint: str) -> InferenceRequest:
    options = call_options(request, state.settings)
    return InferenceRequest(
        DEFAULT,
        endpoint,
        options.request_id,
        options.started,
        options.deadline,
        options.policy,
        inputs=_SAMPLE,
    )


def _predictions(answer: InferenceAnswer) -> dict[str, Any]:
    assert answer.result is not None
    return with_keys(predictions_body(answer.result, answer.one_row), answer.fetched)


@router.post("/predict", response_class=JSON, openapi_extra=WITH_BODY, responses=PREDICTIONS)
async def predict(request: Request) -> JSON:
    """Every service's ``[P(class), P(other)]`` for the rows, each service called once, concurrently."""
    state: ProxyState = request.app.state.proxy
    inference = await inference_request(request, state, DEFAULT, "/predict", parse_rows)
    return JSON(_predictions(await state.plane.infer(inference)))


@router.post("/predict/label", response_class=JSON, openapi_extra=LABEL, responses=LABELS)
async def predict_label(request: Request) -> JSON:
    """The label per row: the service whose P(class) is highest, and that probability.

    ``?route=ensemble`` (or ``X-Route``, or ``PROXY_LABEL_ROUTE``) answers with one call to
    Triton's own ensemble instead of the proxy's fan-out; the answer has the same shape.
    """
    state: ProxyState = request.app.state.proxy
    route = request.query_params.get("route") if request.scope["query_string"] else None
    route = route or header(request, "x-route") or state.settings.label_route
    if route not in ("fanout", "ensemble"):
        raise InvalidInput(f"route: must be 'fanout' or 'ensemble', not {route[:40]!r}")
    ensemble = route == "ensemble"
    endpoint = "/predict/label?route=ensemble" if ensemble else "/predict/label"
    inference = await inference_request(request, state, DEFAULT, endpoint, parse_rows, ensemble=ensemble)
    answer = await state.plane.infer(inference)
    return JSON(with_keys(label_body(seed_labels(answer), answer.one_row, answer.result), answer.fetched))


@router.get("/predict/get/test", response_class=JSON, openapi_extra=PARAMETERS, responses=PREDICTIONS)
async def predict_get_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]``."""
    state: ProxyState = request.app.state.proxy
    return JSON(_predictions(await state.plane.infer(_sample_request(request, state, "/predict/get/test"))))


@router.post("/predict/post/test", response_class=JSON, openapi_extra=PARAMETERS, responses=PREDICTIONS)
async def predict_post_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]`` (the body is ignored)."""
    state: ProxyState = request.app.state.proxy
    return JSON(_predictions(await state.plane.infer(_sample_request(request, state, "/predict/post/test"))))


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
    inference = await inference_request(request, state, DEFAULT, "/predict/stream", parse_rows)
    answer, outcomes = await state.plane.stream(inference)

    async def lines() -> AsyncIterator[bytes]:
        async for outcome in outcomes:
            yield service_line(outcome, answer.one_row)
        yield line(with_keys(_final_line(answer), answer.fetched))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _final_line(answer: InferenceAnswer) -> dict[str, Any]:
    """The seed's last stream line: the label, ``partial`` and ``missing``; or the error."""
    final: dict[str, Any] = {"final": True}
    if answer.error is not None:
        missing = answer.result.missing if answer.result is not None else {}
        names = ", ".join(f"{n} ({m.reason})" for n, m in missing.items())
        final["error"] = {"code": "services_failed", "message": f"no answer: {names}", "services": missing}
        return final
    final.update(label_body(seed_labels(answer), answer.one_row, answer.result))
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
