"""Settings (``PROXY_*`` environment variables) and the services (``SERVICE_<NAME>`` variables).

A service is a name plus a Triton model on a Triton server. As in the seed, each is one
environment variable::

    SERVICE_SETOSA=triton:8001                    # model "setosa" on that server
    SERVICE_SETOSA=triton:8001/setosa_v2          # another model name
    SERVICE_SETOSA=triton:8001/setosa/3           # and a pinned version
    SERVICE_SETOSA=http://triton:8000/setosa      # per-service protocol (default: PROXY_PROTOCOL)

With no ``SERVICE_*`` variable, the three Iris models on ``PROXY_TRITON_HOST`` are used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from client_proxy.core.features import FEATURE_SET
from client_proxy.core.services import (
    ConfigError,
    Hedge,
    Protocol,
    Service,
    TimeoutPolicy,
    parse_hedge,
    parse_service,
)
from client_proxy.signing import secret_bytes
from client_proxy.stores import check_url

SERVICE_PREFIX = "SERVICE_"
DEFAULT_MODELS = ("setosa", "versicolor", "virginica")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


class Settings(BaseSettings):
    """The proxy's settings, read from ``PROXY_<FIELD>`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="PROXY_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    host: str = "0.0.0.0"
    """Address the proxy listens on."""
    port: int = Field(9000, ge=1, le=65535)
    """Port the proxy listens on."""
    grpc_port: int = Field(9001, ge=0, le=65535)
    """Port of the proxy's Open Inference Protocol gRPC service (Triton's ``GRPCInferenceService``);
    0: no gRPC service."""
    grpc_server: Literal["lean", "grpcio"] = "lean"
    """What serves the gRPC door: ``lean`` (the proxy's own HTTP/2 server for unary calls, on its
    event loop; about a seventh of grpcio's CPU per call) or ``grpcio`` (grpcio's asyncio server)."""
    http_header_timeout_ms: float = Field(10_000.0, gt=0, le=600_000)
    """Longest time, in milliseconds, a request's head (request line and headers) may take to
    arrive from its first byte, and a new connection's first request from the connection: then
    408 (or, when nothing came, the connection closed)."""
    http_max_header_bytes: int = Field(32 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest request head (request line and headers), in bytes; a larger one is answered 431."""
    http_max_headers: int = Field(100, ge=8, le=100_000)
    """Most header fields one request may have; more are answered 431."""
    http_max_connections: int = Field(4096, ge=1, le=1_000_000)
    """Most HTTP connections open at once in one process; one more is answered 503 and closed."""
    grpc_max_connections: int = Field(1024, ge=1, le=1_000_000)
    """Most connections the gRPC door keeps open; one more is answered with GOAWAY
    (ENHANCE_YOUR_CALM) and closed. The lean server only."""
    grpc_handshake_timeout_ms: float = Field(10_000.0, gt=0, le=600_000)
    """Longest wait, in milliseconds, for a new gRPC connection's preface and SETTINGS; then it is
    closed. The lean server only."""
    grpc_idle_timeout_ms: float = Field(300_000.0, gt=0, le=86_400_000)
    """A gRPC connection on which no call started or ended for this long, with none running, is
    closed with GOAWAY (NO_ERROR; clients reconnect when they need to): after one to two such
    periods. The lean server only."""
    grpc_max_control_frames: int = Field(1000, ge=10, le=1_000_000)
    """Frames that carry no call (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, empty DATA, unknown
    types, ...) one gRPC connection may send in a burst; the budget refills by a tenth a second and
    by one per call answered. Spent: GOAWAY ENHANCE_YOUR_CALM. The lean server only."""
    grpc_max_resets: int = Field(1000, ge=10, le=1_000_000)
    """Calls one gRPC connection may reset before their answer in a burst (the rapid reset of
    CVE-2023-44487); refilled like ``grpc_max_control_frames``. Spent: GOAWAY ENHANCE_YOUR_CALM.
    The lean server only."""
    grpc_connection_window: int = Field(4 * 1024 * 1024, ge=65_535, le=2**31 - 1)
    """Request bytes one gRPC connection may have sent and the proxy not yet consumed (its HTTP/2
    receive window, given back as requests are handed on): what a connection's unfinished requests
    may hold in memory. Raised to twice ``max_body_bytes`` where that is larger. The lean server only."""
    grpc_client: Literal["lean", "grpcio"] = "lean"
    """What makes the inference calls to Triton over gRPC: ``lean`` (the proxy's own HTTP/2 client
    for unary calls, on its event loop; a third of grpcio's CPU per call) or ``grpcio``
    (tritonclient's grpcio client, which makes the other calls either way)."""
    protocol: Protocol = "grpc"
    """Protocol to Triton for services that do not name one: ``grpc`` (faster here) or ``http``."""
    triton_host: str = "localhost"
    """Triton host for the default services (used only when no ``SERVICE_*`` variable is set)."""
    service_timeout_ms: float = Field(1000.0, gt=0, le=600_000)
    """Longest wait, in milliseconds, for one service's answer."""
    deadline_ms: float = Field(2000.0, gt=0, le=600_000)
    """Longest time, in milliseconds, a whole request may take; a request may ask for less."""
    timeout_policy: TimeoutPolicy = TimeoutPolicy.PARTIAL
    """Default timeout policy: ``partial`` or ``all_or_nothing``; a request may override it."""
    max_in_flight: int = Field(512, ge=0, le=1_000_000)
    """Most inference requests (HTTP ``POST`` and gRPC ``ModelInfer``) in flight in one process;
    beyond it a request is refused at once with 503 and ``Retry-After`` (gRPC: UNAVAILABLE).
    0: no bound."""
    max_rows: int = Field(1024, ge=1, le=1_000_000)
    """Most rows one request may send (Triton's max_batch_size for these models is 1024)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted, in bytes."""
    coalesce: bool = True
    """Merge concurrent calls to one service into shared, batched Triton calls under load."""
    in_flight_per_service: int = Field(2, ge=1, le=1024)
    """With ``coalesce``: the most Triton calls per service on the wire at once. One goes out at a
    time and later calls wait and batch; another goes out beside it only when those in flight are
    late (4x the service's usual call time, 2 ms at least)."""
    ejection_failures: int = Field(5, ge=1, le=1000)
    """A replica that fails or is late this many times in a row is ejected (unreachable or not
    ready: at once)."""
    ejection_base_ms: float = Field(1000.0, gt=0, le=600_000)
    """How long a replica's first ejection lasts; each ejection in a row doubles it."""
    ejection_max_ms: float = Field(30_000.0, gt=0, le=3_600_000)
    """The longest an ejection lasts."""
    balancer: Literal["p2c", "least_outstanding", "round_robin"] = "p2c"
    """How a service's replicas share its calls: ``p2c`` (the fewer calls in flight of two
    replicas drawn at random), ``least_outstanding`` or ``round_robin``."""
    hedge: str = "off"
    """Default hedging of services with replicas: ``off``, a delay (``20ms``) or a percentile of the
    service's recent latencies (``p95``) after which a call not yet answered is sent to another
    replica too; a composition's service may set its own ``hedge``."""
    hedge_budget: float = Field(0.1, ge=0, le=1)
    """Most hedged calls, as a fraction of a service's calls (a token bucket)."""
    variant_header: str = Field("x-user-id", pattern=r"^[a-z0-9-]+$", max_length=64)
    """The request header (gRPC metadata) whose value keeps a caller on one variant of an
    experiment (any case: read in lower case); without it, the first key of a request by key does."""
    shadow_concurrency: int = Field(4, ge=1, le=1024)
    """Most copies of requests one experiment's shadow answers at once, off the requests' path."""
    shadow_queue: int = Field(64, ge=0, le=100_000)
    """Most copies waiting for one shadow; past it a copy is dropped and counted
    (``proxy_shadow_requests_total{outcome="dropped"}``)."""
    grpc_cancel: bool = False
    """Cancel on Triton a gRPC call the proxy no longer waits for (a hedge's loser, a fan-out that
    stopped early, a client gone). Off: the call is left to finish within its deadline and its
    answer dropped, because cancelling gRPC calls can crash Triton 24.10 (SIGSEGV, fixed upstream
    after that release: triton-inference-server/server#7368, #7840). Turn it on with a Triton
    that has the fix, to spare it the work."""
    max_connections: int = Field(256, ge=1)
    """Connections the HTTP client keeps per Triton server (fan-out width x concurrency)."""
    pipelines_file: Path | None = None
    """YAML file of serial pipelines (``/pipelines``); an invalid one stops the start. Unset: the
    shipped Iris cascade, used only when its services are configured."""
    compositions_file: Path | None = None
    """YAML file of compositions (``/compositions``): services, weights, aggregator, policy,
    deadline and the least answers a partial answer needs; an invalid one stops the start."""
    watch_config: bool = False
    """Reload the configuration when the content of its files changes (the compositions, pipelines
    and services files), looked at every ``watch_interval_ms``; SIGHUP and ``POST /admin/reload``
    reload it either way."""
    watch_interval_ms: float = Field(2000.0, ge=100, le=3_600_000)
    """With ``watch_config``: how often (ms) the files are read to see whether they changed."""
    label_route: Literal["fanout", "ensemble"] = "fanout"
    """How ``/predict/label`` is answered: the proxy's fan-out, or one call to Triton's ensemble."""
    ensemble: str | None = None
    """The ensemble as ``[grpc://|http://]host:port/model``; default: ``iris_ensemble`` on the first
    service's Triton."""
    admin_token: SecretStr | None = None
    """Bearer token for ``/admin/services`` and ``/admin/reload``; unset (the default), those
    endpoints do not exist."""
    services_file: Path | None = None
    """JSON file the admin endpoints keep the services in; read at start, instead of
    ``SERVICE_*``, when it exists."""
    cors_origins: list[str] = []
    """Origins allowed to call the proxy from a browser, as JSON (``["https://app.example"]``);
    empty (the default): no CORS headers at all."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the proxy's own loggers: ``DEBUG``, ``INFO`` (one line per request),
    ``WARNING`` or ``ERROR``."""
    log_format: Literal["text", "json"] = "text"
    """``text``, or ``json``: one JSON object per line, uvicorn's lines too."""
    workers: int = Field(1, ge=1, le=64)
    """uvicorn worker processes (``python -m client_proxy``); several act as one proxy: one
    ``/metrics`` for all, SIGHUP and the admin endpoints reaching each (``client_proxy.workers``)."""
    metrics: bool = True
    """Serve ``GET /metrics`` (with several workers, every worker's figures, added up)."""
    shutdown_delay_ms: float = Field(0.0, ge=0, le=600_000)
    """After a SIGTERM, how long (ms) the proxy goes on serving while ``/health/ready`` answers
    503, so that load balancers stop sending before it stops accepting connections and drains.
    0 (the default): at once; Kubernetes gives the same pause with a ``preStop`` hook."""
    feature_store: str | None = None
    """The feature store requests by key read: ``sqlite:///path.db``, ``redis://host:6379/0`` or
    ``postgresql://user@host:5432/db``; unset: requests by key are refused (400)."""
    feature_set: str = "iris"
    """The feature set of the seed's routes, and of compositions and pipelines that name none."""
    feature_store_pool: int = Field(4, ge=1, le=256)
    """Connections to the feature store (SQLite: reader threads)."""
    webhook_secret: SecretStr | None = None
    """Shared secret that signs every webhook post (Standard Webhooks: ``webhook-signature``):
    ``whsec_<base64>`` of 16 bytes or more. Unset: posts are not signed (a warning at start when a
    rule has a webhook)."""
    webhook_queue: int = Field(1000, ge=1, le=1_000_000)
    """Most alerts waiting to be posted; a new one beyond it is dropped (counted and logged)."""
    webhook_timeout_ms: float = Field(2000.0, gt=0, le=60_000)
    """Longest one webhook post may take, in milliseconds."""
    webhook_retries: int = Field(3, ge=0, le=20)
    """Further attempts after a post fails (no connection, time-out, 408, 429, 5xx)."""
    webhook_backoff_ms: float = Field(200.0, gt=0, le=60_000)
    """Back-off before the first retry, in milliseconds; doubled for each next one (full jitter)."""
    webhook_workers: int = Field(4, ge=1, le=256)
    """Webhook posts in flight at once (one receiver that is slow holds one of them per post)."""
    webhook_flush_ms: float = Field(5000.0, ge=0, le=600_000)
    """At shutdown, how long (ms) queued webhook posts may still be tried; the rest are abandoned."""

    @field_validator(
        "pipelines_file",
        "compositions_file",
        "ensemble",
        "admin_token",
        "services_file",
        "webhook_secret",
        "feature_store",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_bytes(value.get_secret_value())  # a ValueError: pydantic reports it, not the secret
        return value

    @field_validator("feature_store")
    @classmethod
    def _feature_store(cls, value: str | None) -> str | None:
        return check_url(value) if value is not None else None

    @field_validator("feature_set")
    @classmethod
    def _feature_set(cls, value: str) -> str:
        if not FEATURE_SET.match(value):
            raise ValueError("must be lower-case letters, digits and '_'")
        return value

    @field_validator("hedge")
    @classmethod
    def _hedge(cls, value: str) -> str:
        parse_hedge(value, "PROXY_HEDGE")  # a ConfigError is a ValueError: pydantic reports it
        return value

    @property
    def default_hedge(self) -> Hedge:
        return parse_hedge(self.hedge, "PROXY_HEDGE")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("variant_header", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def check_settings(settings: Settings) -> None:
    """What no single field can check."""
    if settings.admin_token is not None and settings.workers > 1 and settings.services_file is None:
        # A change reaches one worker; the others read it from the file (client_proxy.workers).
        raise ConfigError(
            f"PROXY_ADMIN_TOKEN with PROXY_WORKERS={settings.workers} needs PROXY_SERVICES_FILE: "
            "the workers share the admin endpoints' changes through it"
        )


class TracingSettings(BaseModel):
    """The OpenTelemetry variables that decide the proxy's tracing, under their standard names
    (``OTEL_<FIELD>``, no ``PROXY_`` prefix: the same variables switch Triton's and every other
    OpenTelemetry program's tracing). The SDK reads the rest of its own variables itself
    (``tracing.py``'s docstring lists them)."""

    model_config = ConfigDict(frozen=True)

    sdk_disabled: str = Field("", description="`true`: tracing off, whatever else is set")
    traces_exporter: str = Field(
        "",
        description="comma-separated: `otlp` (OTLP/HTTP), `console`, or `none` (off); "
        "unset: `otlp` when an endpoint is set",
    )
    exporter_otlp_traces_endpoint: str = Field(
        "", description="where spans go (OTLP/HTTP), as given; setting it switches tracing on"
    )
    exporter_otlp_endpoint: str = Field(
        "", description="the collector's OTLP/HTTP base URL (spans to `<it>/v1/traces`); switches tracing on"
    )
    exporter_otlp_traces_protocol: str = Field(
        "", description="`http/protobuf` only (the proxy's, and Triton's)"
    )
    exporter_otlp_protocol: str = Field("", description="`http/protobuf` only")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TracingSettings:
        """The settings ``environ`` holds (``OTEL_SDK_DISABLED`` for ``sdk_disabled``, ...), stripped."""
        return cls(
            **{
                name: environ[f"OTEL_{name.upper()}"].strip()
                for name in cls.model_fields
                if f"OTEL_{name.upper()}" in environ
            }
        )

    @property
    def exporters(self) -> list[str]:
        """The exporters asked for (``otlp`` when none is named)."""
        return [e.strip() for e in (self.traces_exporter or "otlp").split(",") if e.strip()]

    @property
    def enabled(self) -> bool:
        """Whether these settings switch tracing on (see ``tracing.py``'s docstring)."""
        if self.sdk_disabled.lower() == "true":
            return False
        if self.traces_exporter:
            return any(name not in ("", "none") for name in self.exporters)
        return bool(self.exporter_otlp_traces_endpoint or self.exporter_otlp_endpoint)

    @property
    def traces_url(self) -> str:
        """Where OTLP/HTTP spans go, as the SDK works it out: the traces endpoint as given, else
        the endpoint with ``/v1/traces``, else the OTLP default (also what Triton is pointed at)."""
        if self.exporter_otlp_traces_endpoint:
            return self.exporter_otlp_traces_endpoint
        base = self.exporter_otlp_endpoint or "http://localhost:4318"
        return base.rstrip("/") + "/v1/traces"


#: Settings whose values an error message never repeats.
_SECRETS = frozenset({"admin_token", "webhook_secret", "feature_store"})  # a URL may hold a password


def load_settings(**overrides: object) -> Settings:
    """``Settings()`` from the environment, with a ``ConfigError`` naming the variable on failure."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            got = "its value not shown" if field in _SECRETS else f"got {error.get('input')!r}"
            problems.append(f"PROXY_{field.upper()}: {error['msg']} ({got})")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None


def ensemble_service(settings: Settings, services: list[Service]) -> Service:
    """``PROXY_ENSEMBLE``, or ``iris_ensemble`` on the first service's Triton."""
    if settings.ensemble:
        return parse_service("ensemble", settings.ensemble, settings.protocol, "PROXY_ENSEMBLE")
    if services:
        return Service("ensemble", services[0].protocol, services[0].url, "iris_ensemble")
    url = f"{settings.triton_host}:{DEFAULT_PORTS[settings.protocol]}"
    return Service("ensemble", settings.protocol, url, "iris_ensemble")


def read_services_file(path: Path, settings: Settings) -> tuple[list[Service], list[dict[str, Any]]]:
    """The services the admin endpoints keep, and their changes, newest last:
    ``{"services": [{"name": ..., "target": ...}, ...], "changes": [...]}`` (or the list of
    services alone, as a hand-written file may be)."""
    try:
        document = json.loads(path.read_text())
        entries, changes = (
            (document["services"], list(document.get("changes", [])))
            if isinstance(document, dict)
            else (document, [])
        )
        found = [
            parse_service(e["name"], e["target"], settings.protocol, f"{path}: {e['name']}") for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"PROXY_SERVICES_FILE={path}: unreadable ({exc})") from None
    return sorted(found), changes


def save_services(path: Path, services: Sequence[Service], changes: Sequence[Mapping[str, Any]]) -> None:
    """Write the services file atomically (a crash leaves the old one or the new one)."""
    entries = [{"name": s.name, "target": s.describe()} for s in services]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"services": entries, "changes": list(changes)}, indent=2) + "\n")
    os.replace(tmp, path)


def initial_services(environ: Mapping[str, str], settings: Settings) -> list[Service]:
    """The services file when there is one, else ``SERVICE_*`` variables, else the defaults."""
    if settings.services_file is not None and settings.services_file.exists():
        return read_services_file(settings.services_file, settings)[0]
    return services_from_env(environ, settings)


def stored_changes(settings: Settings) -> list[dict[str, Any]]:
    """The admin endpoints' changes the services file keeps (none without one)."""
    if settings.services_file is not None and settings.services_file.exists():
        return read_services_file(settings.services_file, settings)[1]
    return []


def services_from_env(environ: Mapping[str, str], settings: Settings) -> list[Service]:
    """Services from ``SERVICE_<NAME>`` variables, sorted by name; the Iris defaults when none is set."""
    found = [
        parse_service(key[len(SERVICE_PREFIX) :].lower(), value, settings.protocol, key)
        for key, value in environ.items()
        if key.startswith(SERVICE_PREFIX) and len(key) > len(SERVICE_PREFIX)
    ]
    if found:
        return sorted(found)
    url = f"{settings.triton_host}:{DEFAULT_PORTS[settings.protocol]}"
    return [Service(name, settings.protocol, url, name) for name in DEFAULT_MODELS]
