"""The inference routes in one ASGI layer, in front of FastAPI's stack.

Every request through FastAPI crosses about ten ASGI layers before its route runs (uvicorn's
proxy headers, Starlette's error and exception middlewares, FastAPI's telemetry, body limit and
exit stack, the proxy's admission and request context, the router), and each layer wraps
``send`` again on the way out. Profiled at concurrency 16, that was a fifth of the proxy's CPU
per request, more than the fan-out itself. The inference routes need what those layers do, so
``FastLane`` does it once, in order, for them alone:

1. admission of a ``POST``: past ``PROXY_MAX_IN_FLIGHT``, the 503 at once (``admission.Refusals``);
2. the request id (the client's ``X-Request-ID`` when plain, else a new one) and the start
   time, in ``scope["state"]`` where the routes read them;
3. the route itself (the same function FastAPI would call, with a Starlette ``Request``);
4. a ``ProxyError`` rendered by the app's own error renderer, anything else a 500 JSON with
   the stack trace in the log only;
5. ``X-Request-ID`` on the answer, and ``proxy_http_requests_total`` /
   ``proxy_http_request_duration_seconds`` as the request context middleware records them.

Everything else (documentation, health, metadata, admin, methods a route does not take) goes
through FastAPI unchanged; the FastAPI routes for the same paths stay for the OpenAPI
documentation. With CORS configured the lane is off: ``CORSMiddleware`` must see every answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client_proxy import tracing
from client_proxy.api.admission import Admission, Refusals
from client_proxy.errors import ProxyError
from client_proxy.observability import ProxyMetrics, request_id_of

logger = logging.getLogger("client_proxy")

Handler = Callable[[Request], Awaitable[Response]]
ErrorRenderer = Callable[[ProxyError, str], Response]


class FastLane:
    """Serves ``(method, path)`` pairs of plain routes; ``match`` says whether it takes a request."""

    def __init__(
        self,
        routes: Sequence[tuple[str, Handler, list[str]]],
        admission: Admission,
        metrics: ProxyMetrics,
        render_error: ErrorRenderer,
        unexpected: Callable[[str], Response],
    ) -> None:
        self._exact: dict[tuple[str, str], tuple[Handler, str]] = {}
        # Templates with parameters, as (method, prefix parts, template): only the v2 paths.
        self._templates: list[tuple[str, list[str], Handler, str]] = []
        for path, handler, methods in routes:
            for method in methods:
                if "{" in path:
                    self._templates.append((method, path.strip("/").split("/"), handler, path))
                else:
                    self._exact[(method, path)] = (handler, path)
        self._admission = admission
        self._metrics = metrics
        self._render_error = render_error
        self._unexpected = unexpected
        self._refusals = Refusals(admission)

    def in_front_of(self, app: ASGIApp) -> ASGIApp:
        """An ASGI app: this lane's requests served here, every other one by ``app``."""
        match, serve = self.match, self.serve

        async def lane(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                found = match(scope)
                if found is not None:
                    await serve(found, scope, receive, send)
                    return
            await app(scope, receive, send)

        return lane

    def match(self, scope: Scope) -> tuple[Handler, str, dict[str, str]] | None:
        """The route for this request, its template and its path parameters; None: not the lane's."""
        method, path = scope["method"], scope["path"]
        found = self._exact.get((method, path))
        if found is not None:
            return found[0], found[1], {}
        if not path.startswith("/v2/models/"):
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

    async def serve(
        self,
        found: tuple[Handler, str, dict[str, str]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        handler, template, path_params = found
        admission = self._admission
        counted = scope["method"] == "POST"  # as AdmissionMiddleware: inference requests only
        if counted and not admission.enter("http"):
            await self._refusals.send(scope, send)
            return
        try:
            await self._answer(handler, template, path_params, scope, receive, send)
        finally:
            if counted:
                admission.leave()

    async def _answer(
        self,
        handler: Handler,
        template: str,
        path_params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        started = time.monotonic()
        request_id = request_id_of(scope)
        traced = (
            tracing.start_request(
                scope["method"], scope["path"], tracing.asgi_carrier(scope["headers"]), request_id
            )
            if tracing.ENABLED
            else None
        )
        scope["path_params"] = path_params
        scope["state"] = {"request_id": request_id, "started": started}
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        try:
            try:
                response = await handler(Request(scope, receive))
            except ProxyError as exc:
                response = self._render_error(exc, request_id)
            except Exception:
                logger.exception("request_id=%s unexpected error", request_id)
                response = self._unexpected(request_id)
            status = response.status_code
            if isinstance(response, StreamingResponse):

                async def send_with_id(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        message["headers"] = [*message.get("headers", []), id_header]
                    await send(message)

                await response(scope, receive, send_with_id)
            else:
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [*response.raw_headers, id_header],
                    }
                )
                await send({"type": "http.response.body", "body": response.body})
        finally:
            self._metrics.observe_request(template, scope["method"], status, time.monotonic() - started)
            if traced is not None:
                tracing.end_request(*traced, scope["method"], template, status)
