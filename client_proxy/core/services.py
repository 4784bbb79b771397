"""Services: a name plus a Triton model (and optional version) on a Triton server, and the
timeout policies a request may ask for. Written as ``[grpc://|http://]host:port[/model[/version]]``
in ``SERVICE_*`` variables, the compositions file and the admin endpoints.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Triton 24.10's Python, where the by_key backend reads the feature store with this code
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


if TYPE_CHECKING:
    from numpy.typing import NDArray

    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest
    from client_proxy.core.tensors import Inputs

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


#: The least time a call is given: a deadline already passed still bounds the call by this.
MIN_BUDGET_S = 0.001


def time_left(deadline: float) -> float:
    """Seconds from now to ``deadline`` (``time.monotonic()``), at least ``MIN_BUDGET_S``."""
    return max(deadline - time.monotonic(), MIN_BUDGET_S)


@dataclass(frozen=True, order=True)
class Hedge:
    """When to send a second copy of a call that has not answered to another replica: after a
    fixed delay, or after a percentile of the service's recent latencies; neither: never."""

    delay_ms: float = 0.0
    percentile: float = 0.0

    @property
    def on(self) -> bool:
        return bool(self.delay_ms or self.percentile)

    def describe(self) -> str:
        if self.delay_ms:
            return f"{self.delay_ms:g}ms"
        return f"p{self.percentile:g}" if self.percentile else "off"


HEDGE_OFF = Hedge()


def parse_hedge(value: str, variable: str) -> Hedge:
    """``off``, a fixed delay (``20ms``, or ``20``: milliseconds) or a percentile of the service's
    recent latencies (``p95``, ``p99.9``) -> ``Hedge``, or ``ConfigError`` naming ``variable``."""
    text = value.strip().lower()
    if text in ("off", "", "0", "none", "false"):
        return HEDGE_OFF
    try:
        if text.startswith("p"):
            percentile = float(text[1:])
            if 0 < percentile < 100:
                return Hedge(percentile=percentile)
        else:
            delay = float(text.removesuffix("ms"))
            if 0 < delay <= 600_000:
                return Hedge(delay_ms=delay)
    except ValueError:
        pass
    raise ConfigError(
        f"{variable}={value!r}: expected off, a delay in milliseconds (e.g. 20ms) or a percentile "
        "of recent latencies (e.g. p95, between p0 and p100)"
    )


@dataclass(frozen=True, order=True)
class Target:
    """A model (and optional version) on one Triton server: one replica of a service."""

    protocol: Protocol
    url: str
    """``host:port``, as tritonclient takes it (no scheme)."""
    model: str
    version: str = ""

    @property
    def server(self) -> tuple[Protocol, str]:
        """Key of the shared client calls to this target go through."""
        return (self.protocol, self.url)

    def describe(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"{self.protocol}://{self.url}/{self.model}{version}"


class OwnNothing:
    """What a model the proxy serves (``served.Model``) answers when it has no deadline or
    timeout policy of its own, and is ready when one of its models is: a service passed
    through, Triton's ensemble, a pipeline (whose steps have their own ``on_failure``)."""

    deadline_ms: ClassVar[None] = None
    timeout_policy: ClassVar[None] = None
    min_answers: ClassVar[int] = 1


@dataclass(frozen=True, order=True)
class Service(OwnNothing):
    """One inference service: a model (and optional version) on a Triton server, and the
    replicas that serve the same model elsewhere (``more``)."""

    name: str
    protocol: Protocol
    url: str
    """``host:port``, as tritonclient takes it (no scheme)."""
    model: str
    version: str = ""
    """Empty: the version Triton's version policy serves."""
    output: str | None = None
    """The model output this service contributes; None: the model's only output."""
    more: tuple[Target, ...] = ()
    """Further replicas of the same model, on other servers (``SERVICE_X=a:8001,b:8001``)."""
    hedge: Hedge | None = None
    """When a slow call is sent to another replica too; None: ``PROXY_HEDGE``."""

    # A service is also a model the proxy serves (``served.Model``): passed through, its model's
    # own inputs and outputs, with no feature set of its own.
    kind: ClassVar[Literal["service"]] = "service"
    features: ClassVar[None] = None
    keys: ClassVar[str] = "fetch"

    @property
    def server(self) -> tuple[Protocol, str]:
        """Key of the shared client the first replica goes through."""
        return (self.protocol, self.url)

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every replica, the first one first."""
        return (Target(self.protocol, self.url, self.model, self.version), *self.more)

    def describe(self) -> str:
        return ",".join(t.describe() for t in self.targets)

    @property
    def description(self) -> str:
        return f"the service {self.name}: {self.describe()}"

    def inputs_go_to(self) -> tuple[Service, ...]:
        return (self,)

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        """One call to its model, the outputs asked for (all by default) passed through."""
        served = answer.served
        assert served is not None  # a service is reached by its named tensors
        asked = request.outputs
        wanted = tuple(asked) if asked is not None else tuple(t.name for t in served.outputs)
        gateway, request_id = plane.gateway, request.request_id

        def call(budget: float) -> Awaitable[dict[str, NDArray[Any]]]:
            return gateway.call(self, x, request_id, budget, wanted)

        outputs, outcome = await plane.fanout.call_alone(self, call, deadline)
        answer.outputs, answer.outcomes = dict(outputs), (outcome,)


_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def valid_name(name: str) -> bool:
    """A service or composition name: lower-case letters, digits and '_', not starting with '_'."""
    return _NAME.match(name) is not None


_TARGET = re.compile(
    r"^(?:(?P<scheme>grpc|http)://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(?P<port>\d{1,5})"
    r"(?:/(?P<model>[A-Za-z0-9_.\-]+)(?:/(?P<version>\d+))?)?/?$"
)


def parse_service(name: str, value: str, default_protocol: Protocol, variable: str | None = None) -> Service:
    """``[grpc://|http://]host:port[/model[/version]]``, or several of those separated by commas
    (replicas of the same model), -> ``Service``, or ``ConfigError``."""
    variable = variable or f"SERVICE_{name.upper()}"
    if not valid_name(name):
        raise ConfigError(f"{variable}: service name {name!r} must be lower-case letters, digits and '_'")
    targets = [_target(name, part, value, default_protocol, variable) for part in value.split(",")]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{variable}={value!r}: a replica is named twice")
    first = targets[0]
    return Service(name, first.protocol, first.url, first.model, first.version, more=tuple(targets[1:]))


def _target(name: str, text: str, value: str, default_protocol: Protocol, variable: str) -> Target:
    match = _TARGET.match(text.strip())
    if match is None:
        raise ConfigError(
            f"{variable}={value!r}: expected [grpc://|http://]host:port[/model[/version]] (several: "
            "separated by commas), e.g. triton:8001"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{variable}={value!r}: port {port} is out of range")
    protocol: Protocol = match["scheme"] or default_protocol  # type: ignore[assignment]
    return Target(protocol, f"{match['host']}:{port}", match["model"] or name, match["version"] or "")
