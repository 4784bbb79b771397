"""The front of every HTTP request, and the inference routes' one declaration.

Every request through FastAPI crosses about ten ASGI layers before its route runs (uvicorn's
proxy headers, Starlette's error and exception middlewares, FastAPI's body limit and exit stack,
the router), and each layer wraps ``send`` again on the way out. Profiled at concurrency 16,
that was a fifth of the proxy's CPU per request, more than the fan-out itself. So the
inference routes are declared once (``LaneRoute``: path, methods, handler and what the OpenAPI
document says of them) and served here, in front of FastAPI's stack; the same declarations
give FastAPI the routes it documents (``document``), which never serve.

``FastLane`` is the one front for every HTTP request, the lane's and the app's alike:

1. admission of a ``POST`` (not ``/admin``): past ``PROXY_MAX_IN_FLIGHT``, the 503 at once
   (``admission.Refusals``), counted as shed and nowhere else;
2. the request id (the client's ``X-Request-ID`` when plain, else a new one) and the arrival
   time, in the scope (``reading.ARRIVAL``) where ``call_options`` reads them;
3. a lane route's handler called with a Starlette ``Request`` (a ``ProxyError`` rendered by the
   app's error renderer, anything else a 500 JSON with the stack trace in the log only), or
   FastAPI's stack for every other request (documentation, health, admin, a method a route
   does not take);
4. with ``PROXY_CORS_ORIGINS``, Starlette's ``CORSMiddleware`` around both: the lane stays on;
5. ``X-Request-ID`` on the answer, ``proxy_http_requests_total`` and
   ``proxy_http_request_duration_seconds`` under the route's template, and the request's span.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client_proxy import tracing
from client_proxy.api.admission import Admission, Refusals
from client_proxy.api.reading import ARRIVAL
from client_proxy.errors import ProxyError
from client_proxy.observability import UNTRACED, ProxyMetrics, request_id_of

logger = logging.getLogger("client_proxy")


class Reply:
    """A lane route's answer as the lane sends it: the body, its status, type and extra headers.
    A Starlette ``Response`` built only for the lane to take apart cost as much as rendering the
    JSON; a stream (``StreamingResponse``) and the error renderers' responses are still sent as
    Starlette sends them."""

    __slots__ = ("body", "headers", "status_code")

    def __init__(
        self,
        body: bytes,
        status_code: int = 200,
        media_type: bytes = b"application/json",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", media_type),
            *headers,
        ]


def reply(content: Any, status_code: int = 200) -> Reply:
    """``content`` as JSON by orjson (numpy arrays included: float32 as the shortest exact decimal)."""
    return Reply(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code)


#: A lane route's handler: its JSON answer (200), a ``Reply``, or a Starlette ``Response``.
Handler = Callable[[Request], Awaitable[dict[str, Any] | Reply | Response]]
ErrorRenderer = Callable[[ProxyError, str], Response]
Found = tuple[Handler, str, dict[str, str]]

#: Where the front leaves a request's route for the lane behind CORS (None: not the lane's).
_FOUND = "client_proxy.lane_route"
_PARAMETER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class LaneRoute:
    """One inference route, declared once: the lane serves it, FastAPI documents it."""

    path: str
    methods: tuple[str, ...]
    handler: Handler
    doc: dict[str, Any] = field(default_factory=dict)
    """What the OpenAPI document says (``APIRouter.add_api_route``'s keyword arguments:
    ``response_class``, ``responses``, ``openapi_extra``, ``tags``); the path's parameters are
    added unless ``openapi_extra`` names them."""


def route(
    path: str,
    method: str,
    handler: Handler,
    tags: Sequence[str],
    responses: dict[int | str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    response_class: type[Response] = JSONResponse,
) -> LaneRoute:
    """A ``LaneRoute`` for one method, documented with its ``responses``, ``extra`` OpenAPI
    (``openapi_extra``: parameters and body read by hand) and tags."""
    doc = {
        "tags": list(tags),
        "responses": responses,
        "openapi_extra": extra,
        "response_class": response_class,
    }
    return LaneRoute(path, (method,), handler, doc)


def document(app: FastAPI, routes: Sequence[LaneRoute]) -> None:
    """The routes in ``app``'s OpenAPI document (FastAPI's routes for them never serve: the lane does)."""
    for route in routes:
        doc = dict(route.doc)
        extra = dict(doc.pop("openapi_extra", None) or {})
        named = {p.get("name") for p in extra.get("parameters", [])}
        missing = [name for name in _PARAMETER.findall(route.path) if name not in named]
        if missing:
            path_parameters = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in missing
            ]
            extra["parameters"] = [*path_parameters, *extra.get("parameters", [])]
        app.add_api_route(
            route.path,
            route.handler,
            methods=list(route.methods),
            openapi_extra=extra or None,
            response_model=None,  # the handlers return a dict or a ``Reply``; ``responses`` documents it
            **doc,
        )


class FastLane:
    """The lane's routes by ``(method, path)``; ``match`` says whether it takes a request."""

    def __init__(
        self,
        routes: Sequence[LaneRoute],
        admission: Admission,
        metrics: ProxyMetrics,
        render_error: ErrorRenderer,
        unexpected: Callable[[str], Response],
        cors: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        """``cors``: wraps an ASGI app in the CORS middleware (None: no CORS)."""
        self._exact: dict[tuple[str, str], tuple[Handler, str]] = {}
        # Templates with parameters, as (method, prefix parts, handler, template).
        self._templates: list[tuple[str, list[str], Handler, str]] = []
        for route in routes:
            for method in route.methods:
                if "{" in route.path:
                    self._templates.append(
                        (method, route.path.strip("/").split("/"), route.handler, route.path)
                    )
                else:
                    self._exact[(method, route.path)] = (route.handler, route.path)
        self._prefixes = tuple({"/" + t[1][0] + "/" for t in self._templates})
        self._admission = admission
        self._metrics = metrics
        self._render_error = render_error
        self._unexpected = unexpected
        self._refusals = Refusals(admission)
        self._cors = cors

    def match(self, scope: Scope) -> Found | None:
        """The route for this request, its template and its path parameters; None: not the lane's."""
        method, path = scope["method"], scope["path"]
        found = self._exact.get((method, path))
        if found is not None:
            return found[0], found[1], {}
        if not path.startswith(self._prefixes):
            return None
        parts = path.strip("/").split("/")
        for route_method, template_parts, handler, template in self._templates:
            if route_method != method or len(template_parts) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(template_parts, parts, strict=True):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return handler, template, params
        return None

    def in_front_of(self, app: ASGIApp) -> ASGIApp:
        """An ASGI app: every request through the front; the lane's served here, others by ``app``."""
        match, answer, behind, admission = self.match, self._answer, self._behind, self._admission
        refusals, metrics = self._refusals, self._metrics
        inner: ASGIApp | None = None
        if self._cors is not None:

            async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
                found = scope.get(_FOUND)  # matched once, by the front
                if found is None:
                    await app(scope, receive, send)
                else:
                    await answer(found, scope, receive, send, None)

            inner = self._cors(dispatch)

        async def front(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            method = scope["method"]
            counted = method == "POST" and not scope["path"].startswith("/admin")
            if counted and not admission.enter("http"):
                await refusals.send(scope, send)
                return
            started = time.monotonic()
            request_id = request_id_of(scope)
            scope[ARRIVAL] = (request_id, started)
            found = match(scope)
            if inner is not None:
                scope[_FOUND] = found
            traced = (
                tracing.start_request(
                    method, scope["path"], tracing.asgi_carrier(scope["headers"]), request_id
                )
                if tracing.ENABLED and (found is not None or not scope["path"].startswith(UNTRACED))
                else None
            )
            status, endpoint = 500, found[1] if found is not None else "unmatched"
            try:
                if found is not None and inner is None:
                    status = await answer(found, scope, receive, send, request_id)
                else:
                    status = await behind(inner or app, scope, receive, send, request_id)
                    if found is None:
                        endpoint = _template(scope)
            finally:
                if counted:
                    admission.leave()
                metrics.observe_request(endpoint, method, status, time.monotonic() - started)
                if traced is not None:
                    tracing.end_request(*traced, method, endpoint, status)

        return front

    async def _behind(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, request_id: str) -> int:
        """``app``'s answer, with the request id on it; its status."""
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await app(scope, receive, send_with_id)
        return status

    async def _answer(
        self, found: Found, scope: Scope, receive: Receive, send: Send, request_id: str | None
    ) -> int:
        """A lane route's answer (with the request id, unless ``None``: the front adds it); its status."""
        handler, _, path_params = found
        scope["path_params"] = path_params
        if request_id is None:
            request_id = scope[ARRIVAL][0]
            id_headers: list[tuple[bytes, bytes]] = []
        else:
            id_headers = [(b"x-request-id", request_id.encode())]
        response: Reply | Response
        try:
            answered = await handler(Request(scope, receive))
            response = reply(answered) if isinstance(answered, dict) else answered  # a door's JSON
        except ProxyError as exc:
            response = self._render_error(exc, request_id)
        except Exception:
            logger.exception("request_id=%s unexpected error", request_id)
            response = self._unexpected(request_id)
        status = response.status_code
        if isinstance(response, Reply):
            headers = response.headers
            if id_headers:
                headers.extend(id_headers)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})
        elif isinstance(response, StreamingResponse):

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), *id_headers]
                await send(message)

            await response(scope, receive, send_with_id)
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*response.raw_headers, *id_headers],
                }
            )
            await send({"type": "http.response.body", "body": response.body})
        return status


def _template(scope: Scope) -> str:
    """The template of the FastAPI route that answered (``unmatched`` when none did)."""
    route: Any = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
