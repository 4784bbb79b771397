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

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_PREFIX = "SERVICE_"
DEFAULT_MODELS = ("setosa", "versicolor", "virginica")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}

Protocol = Literal["grpc", "http"]


class TimeoutPolicy(StrEnum):
    """What a request gets when a service is late or fails (the seed's two timeout strategies)."""

    #: Any service late or failed: the whole request fails (504 when one was late, else 503).
    ALL_OR_NOTHING = "all_or_nothing"
    #: Answer with the services that answered in time; the others are reported with their reason.
    PARTIAL = "partial"


class ConfigError(ValueError):
    """A setting or a ``SERVICE_*`` variable is invalid; the message names the variable."""


class Settings(BaseSettings):
    """The proxy's settings, read from ``PROXY_<FIELD>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PROXY_", extra="ignore", frozen=True)

    host: str = "0.0.0.0"
    """Address the proxy listens on."""
    port: int = Field(9000, ge=1, le=65535)
    """Port the proxy listens on."""
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
    max_rows: int = Field(1024, ge=1, le=1_000_000)
    """Most rows one request may send (Triton's max_batch_size for these models is 1024)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted, in bytes."""
    coalesce: bool = True
    """Merge concurrent calls to one service into shared, batched Triton calls under load."""
    in_flight_per_service: int = Field(2, ge=1, le=1024)
    """With ``coalesce``: Triton calls per service on the wire at once; later calls wait and batch."""
    max_connections: int = Field(256, ge=1)
    """Connections the HTTP client keeps per Triton server (fan-out width x concurrency)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the proxy's own loggers."""
    workers: int = Field(1, ge=1, le=64)
    """uvicorn worker processes (``python -m client_proxy``)."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """``Settings()`` from the environment, with a ``ConfigError`` naming the variable on failure."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"PROXY_{field.upper()}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None


@dataclass(frozen=True, order=True)
class Service:
    """One inference service: a model (and optional version) on a Triton server."""

    name: str
    protocol: Protocol
    url: str
    """``host:port``, as tritonclient takes it (no scheme)."""
    model: str
    version: str = ""
    """Empty: the version Triton's version policy serves."""

    @property
    def server(self) -> tuple[Protocol, str]:
        """Key of the shared client this service goes through."""
        return (self.protocol, self.url)

    def describe(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"{self.protocol}://{self.url}/{self.model}{version}"


_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_TARGET = re.compile(
    r"^(?:(?P<scheme>grpc|http)://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(?P<port>\d{1,5})"
    r"(?:/(?P<model>[A-Za-z0-9_.\-]+)(?:/(?P<version>\d+))?)?/?$"
)


def parse_service(name: str, value: str, default_protocol: Protocol, variable: str | None = None) -> Service:
    """``[grpc://|http://]host:port[/model[/version]]`` -> ``Service``, or ``ConfigError``."""
    variable = variable or f"{SERVICE_PREFIX}{name.upper()}"
    if not _NAME.match(name):
        raise ConfigError(f"{variable}: service name {name!r} must be lower-case letters, digits and '_'")
    match = _TARGET.match(value.strip())
    if match is None:
        raise ConfigError(
            f"{variable}={value!r}: expected [grpc://|http://]host:port[/model[/version]], e.g. triton:8001"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{variable}={value!r}: port {port} is out of range")
    protocol: Protocol = match["scheme"] or default_protocol  # type: ignore[assignment]
    return Service(
        name=name,
        protocol=protocol,
        url=f"{match['host']}:{port}",
        model=match["model"] or name,
        version=match["version"] or "",
    )


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
