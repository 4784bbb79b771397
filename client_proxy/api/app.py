"""``create_app(settings, services)``: wires settings, services, the Triton gateway and the routes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from client_proxy import tracing
from client_proxy.alerts import Alerter, WebhookSender, WebhookSettings
from client_proxy.api import grpc_door, lingering
from client_proxy.api.admission import Admission
from client_proxy.api.fastlane import FastLane, document
from client_proxy.api.reading import ARRIVAL
from client_proxy.api.routes import admin, health, predict, v2
from client_proxy.api.routes import compositions as composition_routes
from client_proxy.api.routes import experiments as experiment_routes
from client_proxy.api.routes import pipelines as pipeline_routes
from client_proxy.api.state import JSON, ProxyState
from client_proxy.config import (
    Settings,
    TracingSettings,
    check_settings,
    ensemble_service,
    initial_services,
    load_settings,
    stored_changes,
)
from client_proxy.core.dataplane import DataPlane, Ensemble
from client_proxy.core.declared import Configuration, load_configuration
from client_proxy.core.fanout import FanOut
from client_proxy.core.served import ServedModels
from client_proxy.core.services import Service
from client_proxy.core.shadows import Shadows
from client_proxy.errors import ProxyError
from client_proxy.logs import RequestObserver, configure_logging
from client_proxy.observability import ProxyMetrics
from client_proxy.reloading import Reloader, sighup_held
from client_proxy.stores import open_store
from client_proxy.triton.coalesce import Coalescer
from client_proxy.triton.gateway import TritonGateway
from client_proxy.workers import Sharing, Topic, first_generation, metrics_topic, sharing_directory

logger = logging.getLogger("client_proxy")


def create_app(
    settings: Settings | None = None,
    services: list[Service] | None = None,
    tracing_settings: TracingSettings | None = None,
) -> FastAPI:
    """The proxy app. Without arguments, settings, services and tracing come from the environment."""
    settings = settings or load_settings()
    services = services if services is not None else initial_services(os.environ, settings)
    check_settings(settings)
    configure_logging(settings.log_level, settings.log_format)
    lingering.configure(
        lingering.HttpLimits(
            header_timeout=settings.http_header_timeout_ms / 1000,
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            max_connections=settings.http_max_connections,
        )
    )
    # Off unless the OTEL_* variables switch it on.
    tracing.configure(tracing_settings or TracingSettings.from_environ(os.environ))
    ensemble = ensemble_service(settings, services)
    config = load_configuration(
        settings, services, os.environ, generation=first_generation(), changes=stored_changes(settings)
    )
    metrics = ProxyMetrics()
    gateway = TritonGateway(settings, listener=metrics)
    coalescer = Coalescer(
        gateway.infer, settings.max_rows, settings.in_flight_per_service, on_batch=metrics.observe_batch
    )
    infer = coalescer.infer if settings.coalesce else gateway.infer
    # The ensemble route batches its concurrent calls too, in a coalescer of its own (its calls
    # give a label and a probability per row, not one output tensor).
    ensemble_coalescer = Coalescer(
        gateway.ensemble_rows,
        settings.max_rows,
        settings.in_flight_per_service,
        on_batch=metrics.observe_batch,
    )
    ensemble_rows = ensemble_coalescer.infer if settings.coalesce else gateway.ensemble_rows
    state = ProxyState(
        settings=settings,
        gateway=gateway,
        fanout=FanOut(
            infer,
            settings.service_timeout_ms / 1000,
            on_outcome=metrics.observe_outcome,
            submitter=coalescer if settings.coalesce else None,
        ),
        metrics=metrics,
        ensemble=ensemble,
        admission=Admission(settings.max_in_flight, metrics.shed),
    )
    metrics.watch_in_flight(state.admission)

    if settings.feature_store is not None:
        state.features = open_store(settings.feature_store, settings.feature_store_pool)
    alerter = state.alerts = Alerter(metrics, _webhook_sender(settings, config, metrics))
    models = ServedModels(gateway, config)
    # The experiments' shadows run on a dataplane of their own: their calls are coalesced among
    # themselves, never with the requests', and their rules raise no alerts (core/shadows.py).
    shadow_coalescer = Coalescer(gateway.infer, settings.max_rows, settings.in_flight_per_service)
    shadow_plane = DataPlane(
        models,
        gateway,
        FanOut(
            shadow_coalescer.infer if settings.coalesce else gateway.infer,
            settings.service_timeout_ms / 1000,
            on_outcome=metrics.observe_outcome,
            submitter=shadow_coalescer if settings.coalesce else None,
        ),
        RequestObserver(metrics),
        settings.timeout_policy,
        settings.feature_set,
    )

    def post(url: str, source: str, payload: dict[str, Any]) -> None:
        if alerter.webhooks is not None:
            alerter.webhooks.submit(url, source, payload)

    state.shadows = Shadows(
        shadow_plane, metrics.experiments, settings.shadow_concurrency, settings.shadow_queue, post
    )
    state.plane = DataPlane(
        models,
        gateway,
        state.fanout,
        RequestObserver(metrics),
        settings.timeout_policy,
        settings.feature_set,
        state.features,
        state.alerts,
        Ensemble(ensemble, ensemble_rows) if ensemble is not None else None,
        state.shadows,
    )

    def on_config(config: Configuration) -> None:
        # A rule with a webhook in a reloaded file gets a sender, as it would have at start.
        if alerter.webhooks is None:
            alerter.webhooks = _webhook_sender(settings, config, metrics)
            if alerter.webhooks is not None:
                alerter.webhooks.start()

    # Several workers (python -m client_proxy made their directory): metrics shared, and SIGHUP
    # through the supervisor for a change that must reach every worker.
    directory = sharing_directory(os.environ)
    if directory is not None:
        topics = {"experiments": Topic(state.shadows.now, state.shadows.now)}
        if settings.metrics:
            topics["metrics"] = metrics_topic(metrics.registry)
        state.sharing = Sharing(directory, topics)
    supervisor = os.getppid() if directory is not None else None
    reloader = state.reloader = Reloader(
        settings, os.environ, models, gateway.open, metrics, on_config, supervisor
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _drain_on_sigterm(state, settings.shutdown_delay_ms / 1000)
        gateway.open(config.every_service())
        logger.info("serving %s", ", ".join(f"{s.name}={s.describe()}" for s in services))
        grpc_server = (
            await grpc_door.start(state, settings.host, settings.grpc_port) if settings.grpc_port else None
        )
        if alerter.webhooks is not None:
            alerter.webhooks.start()
        if state.sharing is not None:
            await state.sharing.start()
        stop_reloading = _reload_on_sighup(reloader)
        watcher = (
            asyncio.create_task(reloader.watch(settings.watch_interval_ms / 1000))
            if settings.watch_config
            else None
        )
        try:
            yield
        finally:
            stop_reloading()
            if watcher is not None:
                watcher.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=settings.deadline_ms / 1000)
            if state.shadows is not None:
                await state.shadows.aclose()  # copies, not answers: not waited for
            if state.sharing is not None:
                await state.sharing.aclose()  # after the last request: its counts kept for the others
            if alerter.webhooks is not None:
                # The alerts of the last requests, within PROXY_WEBHOOK_FLUSH_MS.
                await alerter.webhooks.aclose()
            if state.features is not None:
                await state.features.aclose()
            await coalescer.aclose()
            await shadow_coalescer.aclose()
            await ensemble_coalescer.aclose()
            closed = await gateway.aclose()
            logger.info("shut down: closed the clients of %d Triton server(s)", closed)
            tracing.flush()

    # Swagger UI (/docs) and ReDoc (/redoc) from files the fastapi-offline package ships, served
    # by the proxy itself: FastAPI's default pages load them from a public CDN, and are blank
    # on a machine without internet.
    app = FastAPIOffline(
        static_url="/docs-assets",
        title="Iris parallel fan-out proxy",
        summary="Calls every Triton-served classifier concurrently and aggregates their scores into a label.",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry instrumentation looks up the global tracer, meter and
        # logger providers (and the environment) on every request to see whether it is
        # configured: 3-4% of the proxy's CPU per request, profiled, for instrumentation the
        # inference routes (served in front of FastAPI's stack) would not get anyway.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.proxy = state
    app.include_router(health.router)
    app.include_router(pipeline_routes.router)
    app.include_router(composition_routes.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
        app.include_router(experiment_routes.router)
    # The inference routes, declared once: the lane serves them, FastAPI documents them.
    lane_routes = [*predict.ROUTES, *composition_routes.ROUTES, *pipeline_routes.ROUTES, *v2.ROUTES]
    document(app, lane_routes)
    _install_error_handlers(app)
    lane = FastLane(
        lane_routes,
        state.admission,
        metrics,
        render_proxy_error,
        render_unexpected,
        _cors(settings.cors_origins),
    )
    build_stack = app.build_middleware_stack
    # Starlette builds its middleware stack once, on the first request: the lane goes in front
    # of it, inside Starlette's own __call__ (which sets scope["app"]).
    app.build_middleware_stack = lambda: lane.in_front_of(build_stack())  # type: ignore[method-assign]
    return app


def _cors(origins: list[str]) -> Callable[[ASGIApp], ASGIApp] | None:
    """Starlette's CORS middleware for ``PROXY_CORS_ORIGINS`` around an app; None without origins."""
    if not origins:
        return None

    def wrap(app: ASGIApp) -> ASGIApp:
        return CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-Request-ID", "X-Timeout-Policy", "X-Deadline-Ms", "X-Route"],
            expose_headers=["X-Request-ID"],
        )

    return wrap


def _webhook_sender(settings: Settings, config: Configuration, metrics: ProxyMetrics) -> WebhookSender | None:
    """The webhook sender, when some rule or experiment has a webhook (none otherwise: no client,
    no task)."""
    rules = [
        *((c.name, r) for c in config.compositions.values() for r in c.rules),
        *((p.name, r) for p in config.pipelines.values() for r in p.rules),
    ]
    hooked = [f"{owner}/{rule.name}" for owner, rule in rules if rule.webhook is not None]
    hooked += [f"experiment/{e.name}" for e in config.experiments.values() if e.webhook is not None]
    if not hooked:
        return None
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret is not None else None
    if secret is None:
        logger.warning(
            "PROXY_WEBHOOK_SECRET is not set: the webhooks of %s are not signed", ", ".join(hooked)
        )
    sender = WebhookSender(
        WebhookSettings(
            secret=secret,
            queue_size=settings.webhook_queue,
            timeout_s=settings.webhook_timeout_ms / 1000,
            retries=settings.webhook_retries,
            backoff_s=settings.webhook_backoff_ms / 1000,
            workers=settings.webhook_workers,
            flush_s=settings.webhook_flush_ms / 1000,
        ),
        metrics,
    )
    metrics.watch_webhooks(sender)
    return sender


def _reload_on_sighup(reloader: Reloader) -> Callable[[], object]:
    """SIGHUP reloads the configuration (``client_proxy.reloading``), as nginx and Prometheus do;
    returns what undoes it. Only in the main thread of a process (uvicorn's): elsewhere (an ASGI
    test client) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return lambda: None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.reload_soon, "SIGHUP")
    if sighup_held():  # it came while the app started: the files may have changed since read
        reloader.reload_soon("SIGHUP during the start")
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _drain_on_sigterm(state: ProxyState, delay_s: float) -> None:
    """Under uvicorn: mark the proxy draining (not ready) the moment SIGTERM arrives, then hand the
    signal to uvicorn's own handler, ``delay_s`` later, which stops accepting and drains.

    uvicorn has installed its handlers before the lifespan starts; this wraps its SIGTERM one
    (each worker process does it for itself). Elsewhere (an ASGI test client) it does nothing.
    """
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(uvicorn_handler):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if state.draining or delay_s <= 0:  # a second SIGTERM does not wait again
            state.draining = True
            uvicorn_handler(signum, frame)
            return
        state.draining = True
        logger.info("SIGTERM: not ready, stopping in %.0f ms", delay_s * 1000)
        loop.call_later(delay_s, uvicorn_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _request_id(request: Request) -> str:
    arrival = request.scope.get(ARRIVAL)
    return arrival[0] if arrival is not None else ""


def render_proxy_error(exc: ProxyError, request_id: str) -> Response:
    """The JSON answer to a ``ProxyError``: its status, code, message and the request id."""
    if exc.status_code >= 500:
        logger.warning("request_id=%s %s %s", request_id, exc.code, exc.message)
    body = exc.body()
    body["error"]["request_id"] = request_id
    return JSON(body, status_code=exc.status_code)


def render_unexpected(request_id: str) -> Response:
    """The 500 answer to a bug: never a stack trace or an internal address (the log has them)."""
    body = {"error": {"code": "internal_error", "message": "internal error", "request_id": request_id}}
    return JSON(body, status_code=500)


def _install_error_handlers(app: FastAPI) -> None:
    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return render_proxy_error(exc, _request_id(request))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # dict.fromkeys: a parameter shared by two dependencies is reported once.
        problems = list(
            dict.fromkeys(
                ".".join(str(p) for p in e.get("loc", ())) + f": {e.get('msg', 'invalid')}"
                for e in exc.errors()
            )
        )
        body: dict[str, Any] = {
            "error": {
                "code": "invalid_request",
                "message": "; ".join(problems),
                "problems": problems,
                "request_id": _request_id(request),
            }
        }
        return JSON(body, status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail), "request_id": _request_id(request)}}
        return JSON(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("request_id=%s unexpected error", _request_id(request))
        return render_unexpected(_request_id(request))

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
