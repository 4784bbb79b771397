"""What every request of one app shares, wired once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from starlette.responses import JSONResponse

from client_proxy.api.admission import Admission
from client_proxy.config import Settings
from client_proxy.core.compositions import Composition
from client_proxy.core.dataplane import DataPlane
from client_proxy.core.declared import service_map
from client_proxy.core.fanout import FanOut
from client_proxy.core.features import FeatureStore
from client_proxy.core.pipelines import Pipeline
from client_proxy.core.rules import AlertSink
from client_proxy.core.services import Service
from client_proxy.observability import ProxyMetrics
from client_proxy.triton.gateway import TritonGateway


@dataclass
class ProxyState:
    settings: Settings
    services: list[Service]
    gateway: TritonGateway
    fanout: FanOut
    metrics: ProxyMetrics
    pipelines: dict[str, Pipeline]
    pipelines_source: str
    ensemble: Service
    """Triton's own fan-out, for ``/predict/label?route=ensemble``."""
    changes: list[dict[str, Any]] = field(default_factory=list)
    """The admin endpoints' changes to the services, newest last (shown in ``/metadata``)."""
    draining: bool = False
    """A SIGTERM has started the shutdown: ``/health/ready`` answers 503 from then on."""
    compositions: dict[str, Composition] = field(default_factory=dict)
    """From ``PROXY_COMPOSITIONS_FILE``; ``default`` is added at request time unless it declares one."""
    compositions_source: str | None = None
    admission: Admission = field(default_factory=lambda: Admission(0))
    """The bound on inference requests in flight (``PROXY_MAX_IN_FLIGHT``), both doors."""
    features: FeatureStore | None = None
    """The feature store requests by key read (``PROXY_FEATURE_STORE``); None: none."""
    alerts: AlertSink | None = None
    """Where the rules' alerts go (``client_proxy.alerts.Alerter``): counted, logged, posted."""
    plane: DataPlane = field(init=False)
    """Every inference request's one path (``client_proxy.core.dataplane``), whichever door."""

    def service_map(self) -> dict[str, Service]:
        """The services pipelines name, as they are now (the admin endpoints may change them)."""
        return service_map(self.services, self.compositions.values())

    def default_composition(self) -> Composition:
        """The ``default`` composition (``ServedModels.default``)."""
        return self.plane.models.default()


async def _state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


State = Annotated[ProxyState, Depends(_state)]


class JSON(JSONResponse):
    """JSON by orjson, numpy arrays included (float32 written as the shortest exact decimal).

    A ``JSONResponse`` so that FastAPI documents the routes' models as JSON."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
