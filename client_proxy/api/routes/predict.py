"""``/predict``, ``/predict/label``, ``/predict/stream`` and the seed's two test endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse

from client_proxy.api.answers import (
    finished,
    label_body,
    line,
    seed_label,
    seed_labels,
    seed_predictions,
    service_line,
)
from client_proxy.api.fastlane import route
from client_proxy.api.inputs import SAMPLE_ROW, parse_rows
from client_proxy.api.openapi import ERRORS, LABEL, LABELS, PARAMETERS, PREDICTIONS, WITH_BODY, streamed
from client_proxy.api.reading import call_options, header, inference_request, with_options
from client_proxy.api.state import JSON, ProxyState
from client_proxy.core.dataplane import InferenceAnswer, InferenceRequest
from client_proxy.errors import InvalidInput

#: The seed's routes are the default composition seen through the seed's JSON.
DEFAULT = "default"
_SAMPLE = np.asarray([SAMPLE_ROW], dtype=np.float32)


def _sample_request(request: Request, state: ProxyState, endpoint: str) -> InferenceRequest:
    return with_options(call_options(request, state.settings), DEFAULT, endpoint, inputs=_SAMPLE)


async def predict(request: Request) -> dict[str, Any]:
    """Every service's ``[P(class), P(other)]`` for the rows, each service called once, concurrently."""
    state: ProxyState = request.app.state.proxy
    inference = await inference_request(request, state, DEFAULT, "/predict", parse_rows)
    return seed_predictions(await state.plane.infer(inference))


async def predict_label(request: Request) -> dict[str, Any]:
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
    return seed_label(await state.plane.infer(inference))


async def predict_get_test(request: Request) -> dict[str, Any]:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]``."""
    state: ProxyState = request.app.state.proxy
    return seed_predictions(await state.plane.infer(_sample_request(request, state, "/predict/get/test")))


async def predict_post_test(request: Request) -> dict[str, Any]:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]`` (the body is ignored)."""
    state: ProxyState = request.app.state.proxy
    return seed_predictions(await state.plane.infer(_sample_request(request, state, "/predict/post/test")))


async def predict_stream(request: Request) -> StreamingResponse:
    """The asynchronous variant: one NDJSON line per service the moment it answers (completion
    order), then a final line ``{"final": true, "prediction": ...}`` with the aggregated label."""
    state: ProxyState = request.app.state.proxy
    inference = await inference_request(request, state, DEFAULT, "/predict/stream", parse_rows)
    answer, outcomes = await state.plane.stream(inference)

    async def lines() -> AsyncIterator[bytes]:
        async for outcome in outcomes:
            yield service_line(outcome, answer.one_row)
        yield line(finished(_final_line(answer), answer))

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


_TAGS = ["predict"]
_STREAMED = streamed("One JSON line per service, then the label", ERRORS)

#: The seed's routes, served by the fast lane and documented by FastAPI.
ROUTES = [
    route("/predict", "POST", predict, _TAGS, PREDICTIONS, WITH_BODY, JSON),
    route("/predict/label", "POST", predict_label, _TAGS, LABELS, LABEL, JSON),
    route("/predict/stream", "POST", predict_stream, _TAGS, _STREAMED, WITH_BODY, StreamingResponse),
    route("/predict/get/test", "GET", predict_get_test, _TAGS, PREDICTIONS, PARAMETERS, JSON),
    route("/predict/post/test", "POST", predict_post_test, _TAGS, PREDICTIONS, PARAMETERS, JSON),
]
