"""Services: a name plus a Triton model (and optional version) on a Triton server, and the
timeout policies a request may ask for. Written as ``[grpc://|http://]host:port[/model[/version]]``
in ``SERVICE_*`` variables, the compositions file and the admin endpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Protocol = Literal["grpc", "http"]
"""How the proxy talks to a Triton server."""


class ConfigError(ValueError):
    """A setting or a ``SERVICE_*`` variable is invalid; the message names the variable."""


class TimeoutPolicy(StrEnum):
    """What a request gets when a service is late or fails (the seed's two timeout strategies)."""

    #: Any service late or failed: the whole request fails (504 when one was late, else 503).
    ALL_OR_NOTHING = "all_or_nothing"
    #: Answer with the services that answered in time; the others are reported with their reason.
    PARTIAL = "partial"


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
    output: str | None = None
    """The model output this service contributes; None: the model's only output."""

    @property
    def server(self) -> tuple[Protocol, str]:
        """Key of the shared client this service goes through."""
        return (self.protocol, self.url)

    def describe(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"{self.protocol}://{self.url}/{self.model}{version}"


_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def valid_name(name: str) -> bool:
    """A service or composition name: lower-case letters, digits and '_', not starting with '_'."""
    return _NAME.match(name) is not None


_TARGET = re.compile(
    r"^(?:(?P<scheme>grpc|http)://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(?P<port>\d{1,5})"
    r"(?:/(?P<model>[A-Za-z0-9_.\-]+)(?:/(?P<version>\d+))?)?/?$"
)


def parse_service(name: str, value: str, default_protocol: Protocol, variable: str | None = None) -> Service:
    """``[grpc://|http://]host:port[/model[/version]]`` -> ``Service``, or ``ConfigError``."""
    variable = variable or f"SERVICE_{name.upper()}"
    if not valid_name(name):
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
