"""``/predict``, ``/predict/label``, ``/predict/stream`` and the seed's two test endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from numpy.typing import NDArray

from client_proxy.config import Settings, TimeoutPolicy
from client_proxy.errors import InvalidInput, UpstreamError, UpstreamTimeout
from client_proxy.fanout import FanOutResult, Labels, Outcome, aggregate, failure
from client_proxy.inputs import (
    SAMPLE_ROW,
    PredictRequest,
    check_content_type,
    parse_inputs,
    parse_rows,
    read_body,
)
from client_proxy.observability import log_request
from client_proxy.schemas import LabelAnswer, Predictions, errors
from client_proxy.state import JSON, ProxyState
from client_proxy.tensors import Inputs

router = APIRouter(tags=["predict"])

_PARAMETERS: dict[str, Any] = {
    "parameters": [
        {
            "name": "policy",
            "in": "query",
            "required": False,
            "description": "Timeout policy for this request (default: PROXY_TIMEOUT_POLICY)",
            "schema": {"type": "string", "enum": [p.value for p in TimeoutPolicy]},
        },
        {
            "name": "deadline_ms",
            "in": "query",
            "required": False,
            "description": "This request's deadline in ms, from 50 to PROXY_DEADLINE_MS",
            "schema": {"type": "number", "minimum": 50},
        },
        {
            "name": "X-Timeout-Policy",
            "in": "header",
            "required": False,
            "description": "Same as ?policy=",
            "schema": {"type": "string", "enum": [p.value for p in TimeoutPolicy]},
        },
        {
            "name": "X-Deadline-Ms",
            "in": "header",
            "required": False,
            "description": "Same as ?deadline_ms=",
            "schema": {"type": "number", "minimum": 50},
        },
        {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "Request id, returned in the response and passed to Triton (made up when absent)",
            "schema": {"type": "string", "maxLength": 128},
        },
    ]
}
_WITH_BODY: dict[str, Any] = {
    **_PARAMETERS,
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": PredictRequest.model_json_schema(),
                "examples": {
                    "seed": {"summary": "The seed's request", "value": {"data": [[1.0, 2.0, 3.0, 4.0]]}},
                    "batch": {"summary": "Two rows", "value": {"data": [SAMPLE_ROW, [6.3, 3.3, 6.0, 2.5]]}},
                },
            }
        },
    },
}
_ERRORS = errors(
    {
        400: "Body is not JSON",
        408: "Body still arriving at the deadline",
        413: "Body over PROXY_MAX_BODY_BYTES",
        415: "Not application/json, or compressed",
        422: "Rows missing, of the wrong length or type, not finite, or too many; a bad parameter",
        503: "No service answered (all_or_nothing: one did not); the services are named",
        504: "Deadline missed (all_or_nothing: a service was late); the services are named",
    }
)
_PREDICTIONS = {200: {"model": Predictions, "description": "Each service's probabilities"}, **_ERRORS}
_LABELS = {200: {"model": LabelAnswer, "description": "The label per row"}, **_ERRORS}


@dataclass(frozen=True)
class CallOptions:
    request_id: str
    policy: TimeoutPolicy
    deadline: float
    """``time.monotonic()`` instant by which the answer must be sent."""


_POLICIES = {p.value: p for p in TimeoutPolicy}
_NO_QUERY: dict[str, str] = {}
#: No answer can come back in less: a shorter deadline is refused as a bad request.
MIN_DEADLINE_MS = 50.0


def call_options(
    request: Request,
    settings: Settings,
    default_policy: TimeoutPolicy | None = None,
    deadline_ms: float | None = None,
) -> CallOptions:
    """Policy and deadline from ``?policy=`` / ``X-Timeout-Policy`` and ``?deadline_ms=`` / ``X-Deadline-Ms``.

    Read by hand rather than through FastAPI's dependency injection: these routes are the hot
    path, and the injection machinery cost more CPU per request than the fan-out itself.
    """
    query = request.query_params if request.scope["query_string"] else _NO_QUERY
    headers = request.headers
    policy = default_policy or settings.timeout_policy
    # The query parameter wins over the header; an invalid value is refused wherever it is.
    for where, raw_policy in (
        ("X-Timeout-Policy", headers.get("x-timeout-policy")),
        ("policy", query.get("policy")),
    ):
        if raw_policy is not None:
            if raw_policy not in _POLICIES:
                raise InvalidInput(f"{where}: must be 'all_or_nothing' or 'partial', not {raw_policy[:40]!r}")
            policy = _POLICIES[raw_policy]
    budget_ms = min(settings.deadline_ms, deadline_ms) if deadline_ms else settings.deadline_ms
    ceiling_ms = budget_ms
    for where, raw_deadline in (
        ("X-Deadline-Ms", headers.get("x-deadline-ms")),
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
    scope_state = request.scope.get("state", {})
    started: float = scope_state.get("started", time.monotonic())
    return CallOptions(scope_state.get("request_id", ""), policy, started + budget_ms / 1000.0)


async def read_rows(request: Request, settings: Settings, options: CallOptions) -> NDArray[np.float32]:
    check_content_type(request)
    body = await read_body(request, settings.max_body_bytes, max(options.deadline - time.monotonic(), 0.001))
    return parse_rows(body, settings.max_rows)


async def read_inputs(request: Request, settings: Settings, options: CallOptions) -> Inputs:
    """Rows of any width and type, or named tensors, for models the services' contracts describe."""
    check_content_type(request)
    body = await read_body(request, settings.max_body_bytes, max(options.deadline - time.monotonic(), 0.001))
    return parse_inputs(body, settings.max_rows)


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
    service = state.ensemble
    budget = min(state.settings.service_timeout_ms / 1000, options.deadline - time.monotonic())
    started = time.perf_counter()
    try:
        if budget <= 0:
            raise TimeoutError
        async with asyncio.timeout(budget):
            names, proba = await state.gateway.infer_ensemble(service, x, options.request_id, budget)
    except TimeoutError:
        error = UpstreamTimeout(
            f"{service.name}: no answer within {budget * 1000:.0f} ms", service=service.name
        )
        state.metrics.observe_outcome(Outcome(service.name, None, error, time.perf_counter() - started))
        raise error from None
    except UpstreamError as exc:
        state.metrics.observe_outcome(Outcome(service.name, None, exc, time.perf_counter() - started))
        raise
    outcome = Outcome(service.name, proba, None, time.perf_counter() - started)
    state.metrics.observe_outcome(outcome)
    log_request(options.request_id, "/predict/label?route=ensemble", [outcome])
    return Labels(names=names, proba=proba)


def predictions_body(result: FanOutResult, one_row: bool) -> dict[str, Any]:
    """The seed's shape: ``{service: {"prediction": [p_class, p_other]}}`` for one row,
    ``{service: {"prediction": [[p_class, p_other], ...]}}`` for N rows. A service that did not
    answer (``partial``) has ``"prediction": null`` and an ``"error"``."""
    body: dict[str, Any] = {}
    for name, outcome in result.outcomes.items():
        if outcome.probabilities is not None:
            body[name] = {"prediction": outcome.probabilities[0] if one_row else outcome.probabilities}
        else:
            body[name] = {"prediction": None, "error": failure(outcome)}
    return body


def label_body(labels: Labels, one_row: bool, result: FanOutResult | None) -> dict[str, Any]:
    """``{"prediction": {"proba": p, "label": name}}`` for one row, a list of those for N rows;
    ``"partial": true`` and ``"missing"`` (service -> reason) when some service did not answer."""
    if one_row:
        prediction: Any = {"proba": float(labels.proba[0]), "label": labels.names[0]}
    else:
        prediction = [
            {"proba": p, "label": n} for p, n in zip(labels.proba.tolist(), labels.names, strict=True)
        ]
    body: dict[str, Any] = {"prediction": prediction}
    if result is not None and result.partial:
        body["partial"] = True
        body["missing"] = result.missing
    return body


@router.post("/predict", response_class=JSON, openapi_extra=_WITH_BODY, responses=_PREDICTIONS)
async def predict(request: Request) -> JSON:
    """Every service's ``[P(class), P(other)]`` for the rows, each service called once, concurrently."""
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    rows = await read_rows(request, state.settings, options)
    result = await _fan_out(state, rows, options, "/predict")
    return JSON(predictions_body(result, one_row=rows.shape[0] == 1))


_LABEL: dict[str, Any] = {
    **_WITH_BODY,
    "parameters": [
        *_PARAMETERS["parameters"],
        {
            "name": "route",
            "in": "query",
            "required": False,
            "description": "fanout (the proxy calls every service) or ensemble (one call to Triton's "
            "iris_ensemble); default PROXY_LABEL_ROUTE; also the X-Route header",
            "schema": {"type": "string", "enum": ["fanout", "ensemble"]},
        },
    ],
}


@router.post("/predict/label", response_class=JSON, openapi_extra=_LABEL, responses=_LABELS)
async def predict_label(request: Request) -> JSON:
    """The label per row: the service whose P(class) is highest, and that probability.

    ``?route=ensemble`` (or ``X-Route``, or ``PROXY_LABEL_ROUTE``) answers with one call to
    Triton's own ensemble instead of the proxy's fan-out; the answer has the same shape.
    """
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    route = request.query_params.get("route") if request.scope["query_string"] else None
    route = route or request.headers.get("x-route") or state.settings.label_route
    if route not in ("fanout", "ensemble"):
        raise InvalidInput(f"route: must be 'fanout' or 'ensemble', not {route[:40]!r}")
    rows = await read_rows(request, state.settings, options)
    if route == "ensemble":
        return JSON(label_body(await _ensemble(state, rows, options), rows.shape[0] == 1, None))
    result = await _fan_out(state, rows, options, "/predict/label")
    labels = aggregate({name: result.outcomes[name].probabilities for name in result.answered})  # type: ignore[misc]
    return JSON(label_body(labels, rows.shape[0] == 1, result))


@router.get("/predict/get/test", response_class=JSON, openapi_extra=_PARAMETERS, responses=_PREDICTIONS)
async def predict_get_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]``."""
    state: ProxyState = request.app.state.proxy
    result = await _fan_out(state, _SAMPLE, call_options(request, state.settings), "/predict/get/test")
    return JSON(predictions_body(result, one_row=True))


@router.post("/predict/post/test", response_class=JSON, openapi_extra=_PARAMETERS, responses=_PREDICTIONS)
async def predict_post_test(request: Request) -> JSON:
    """``/predict`` on the seed's sample row ``[5.1, 3.5, 1.4, 0.2]`` (the body is ignored)."""
    state: ProxyState = request.app.state.proxy
    result = await _fan_out(state, _SAMPLE, call_options(request, state.settings), "/predict/post/test")
    return JSON(predictions_body(result, one_row=True))


def _line(content: dict[str, Any]) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def service_line(outcome: Outcome, one_row: bool) -> bytes:
    """One stream line: a service's answer (or its error) and how long it took."""
    line: dict[str, Any] = {"service": outcome.service, "latency_ms": round(outcome.latency_s * 1000, 3)}
    if outcome.probabilities is not None:
        line["prediction"] = outcome.probabilities[0] if one_row else outcome.probabilities
    else:
        line["error"] = failure(outcome)
    return _line(line)


@router.post(
    "/predict/stream",
    openapi_extra=_WITH_BODY,
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "One JSON line per service, then the label",
        },
        **_ERRORS,
    },
)
async def predict_stream(request: Request) -> StreamingResponse:
    """The asynchronous variant: one NDJSON line per service the moment it answers (completion
    order), then a final line ``{"final": true, "prediction": ...}`` with the aggregated label."""
    state: ProxyState = request.app.state.proxy
    options = call_options(request, state.settings)
    rows = await read_rows(request, state.settings, options)
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
        yield _line(_final_line(state, arrived, one_row, options.policy))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _final_line(
    state: ProxyState, arrived: list[Outcome], one_row: bool, policy: TimeoutPolicy
) -> dict[str, Any]:
    missing = {o.service: failure(o) for o in arrived if not o.ok}
    answered = {o.service: o.probabilities for o in arrived if o.probabilities is not None}
    order = [s.name for s in state.services]
    final: dict[str, Any] = {"final": True}
    if (missing and policy is TimeoutPolicy.ALL_OR_NOTHING) or not answered:
        names = ", ".join(f"{n} ({m['reason']})" for n, m in missing.items())
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
