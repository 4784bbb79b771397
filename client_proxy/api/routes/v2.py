"""The Open Inference Protocol (KServe v2) over HTTP, under ``/v2``: what Triton serves, so that
``tritonclient.http``, ``perf_analyzer`` and KServe's clients call a composition, a pipeline or
a service of the proxy as if it were one Triton model.

Errors are the protocol's: ``{"error": "<message>"}`` with a 4xx/5xx status (400 for a bad
request, 404 for an unknown model, 503 when too few services answered, 504 past the deadline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from client_proxy.api.fastlane import LaneRoute, Reply, reply, route
from client_proxy.api.oip import (
    HEADER,
    SERVER,
    check_version,
    http_answer,
    inference_request,
    parse_request,
)
from client_proxy.api.openapi import V2_INFER_BODY, V2_MODEL, V2_MODEL_VERSION
from client_proxy.api.reading import header, options_and_body
from client_proxy.api.schemas import (
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    OipError,
    ServerLive,
    ServerMetadata,
    ServerReady,
    oip_errors,
)
from client_proxy.api.state import ProxyState
from client_proxy.core.served import VERSION, Served
from client_proxy.errors import ProxyError


def _error(exc: ProxyError) -> Reply:
    """The protocol's error body; a request the proxy's routes answer with 422 is a 400 here."""
    status = 400 if exc.status_code == 422 else exc.status_code
    return reply({"error": exc.message}, status)


def _version(request: Request) -> None:
    params = request.path_params
    if "version" in params:  # a route under /versions/{version}
        check_version(params["name"], params["version"])


def _timeout(state: ProxyState) -> float:
    return state.settings.service_timeout_ms / 1000


async def server_metadata(request: Request) -> Reply:
    """Server metadata: name, version and the protocol extensions served."""
    return reply(SERVER)


async def server_live(request: Request) -> Reply:
    """Live: the protocol's ``{"live": true}`` (Triton leaves the body empty; clients that read
    it, as KServe's SDK does, get their answer)."""
    return reply({"live": True})


async def server_ready(request: Request) -> Reply:
    """Ready while not draining and the default fan-out can answer (as ``/health/ready``)."""
    state: ProxyState = request.app.state.proxy
    if state.draining:
        return reply({"ready": False, "error": "shutting down"}, 503)
    if await state.plane.models.ready("iris_fanout", _timeout(state)):
        return reply({"ready": True})
    return reply({"ready": False, "error": "the default fan-out is not ready"}, 503)


async def _described(request: Request, view: Callable[[Served], dict[str, Any]]) -> Reply:
    state: ProxyState = request.app.state.proxy
    try:
        _version(request)
        served = await state.plane.models.describe(request.path_params["name"], _timeout(state))
    except ProxyError as exc:
        return _error(exc)
    return reply(view(served))


async def model_metadata(request: Request) -> Reply:
    return await _described(request, Served.metadata)


async def model_config(request: Request) -> Reply:
    """Triton's model configuration extension (``perf_analyzer`` reads it)."""
    return await _described(request, Served.config)


async def model_ready(request: Request) -> Reply:
    state: ProxyState = request.app.state.proxy
    try:
        _version(request)
        ready = await state.plane.models.ready(request.path_params["name"], _timeout(state))
    except ProxyError as exc:
        return _error(exc)
    name = request.path_params["name"]
    if not ready:
        return reply({"name": name, "ready": False, "error": f"model '{name}' is not ready"}, 400)
    return reply({"name": name, "ready": True})


async def infer(request: Request) -> Reply:
    """One inference, JSON or with binary tensors; the response as the request asked."""
    state: ProxyState = request.app.state.proxy
    name = request.path_params["name"]
    try:
        _version(request)
        try:
            options, body = await options_and_body(request, state.settings, json_only=False)
            parsed = parse_request(body, header(request, HEADER), state.settings.max_rows)
            parameters = parsed.parameters
            inference = inference_request(
                name,
                "/v2/models/{name}/infer",
                options,
                parameters.get("timeout"),
                parameters.get("timeout_policy"),
                parsed.inputs,
                parsed.outputs,
            )
        except ProxyError:
            state.plane.models.find(name)  # an unknown model is a 404 whatever the body, as in Triton
            raise
        content, header_length = http_answer(await state.plane.infer(inference), name, VERSION, parsed)
    except ProxyError as exc:
        return _error(exc)
    if header_length is None:
        return Reply(content)
    return Reply(content, 200, b"application/octet-stream", [(HEADER.encode(), str(header_length).encode())])


_TAGS = ["open inference protocol (v2)"]
_MODEL_ERRORS = oip_errors({400: "Bad request (a version other than 1)", 404: "Unknown model"})
_INFERRED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "The outputs; with binary tensors, application/octet-stream: the JSON "
        "header (Inference-Header-Content-Length bytes) then the tensors",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **oip_errors(
        {
            400: "Bad request: its JSON, a tensor, a missing input, the binary header, a parameter",
            404: "Unknown model",
            408: "Body still arriving at the deadline",
            413: "Body over PROXY_MAX_BODY_BYTES",
            502: "The services answered but cannot be combined as declared",
            503: "Too few services answered (named)",
            504: "Deadline missed",
        }
    ),
}
_READY: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready", "model": ModelReady},
    400: {"description": "Not ready (or a version other than 1)", "model": ModelReady | OipError},
    **oip_errors({404: "Unknown model"}),
}


def _routes() -> list[LaneRoute]:
    """The protocol's routes, each model route also under ``/versions/{version}``; served by the
    fast lane (the handlers read the request themselves, and the protocol's errors are not the
    proxy's JSON errors) and documented by FastAPI."""
    routes = [
        route("/v2", "GET", server_metadata, _TAGS, {200: {"model": ServerMetadata}}),
        route("/v2/health/live", "GET", server_live, _TAGS, {200: {"model": ServerLive}}),
        route(
            "/v2/health/ready", "GET", server_ready, _TAGS,
            {200: {"description": "ready", "model": ServerReady},
             503: {"description": "not ready", "model": ServerReady}},
        ),
    ]  # fmt: skip
    for suffix, extra in (("", V2_MODEL), ("/versions/{version}", V2_MODEL_VERSION)):
        base = f"/v2/models/{{name}}{suffix}"
        routes += [
            route(
                base, "GET", model_metadata, _TAGS, {200: {"model": ModelMetadata}, **_MODEL_ERRORS}, extra
            ),
            route(f"{base}/ready", "GET", model_ready, _TAGS, _READY, extra),
            route(
                f"{base}/config",
                "GET",
                model_config,
                _TAGS,
                {200: {"model": ModelConfig}, **_MODEL_ERRORS},
                extra,
            ),
            route(f"{base}/infer", "POST", infer, _TAGS, _INFERRED, {**extra, **V2_INFER_BODY}),
        ]
    return routes


ROUTES = _routes()
