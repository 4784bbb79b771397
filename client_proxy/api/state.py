"""What every request of one app shares, wired once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Depends, Request
from starlette.responses import JSONResponse

from client_proxy.api.admission import Admission
from client_proxy.config import Settings
from client_proxy.core.dataplane import DataPlane
from client_proxy.core.declared import Configuration
from client_proxy.core.fanout import FanOut
from client_proxy.core.features import FeatureStore
from client_proxy.core.rules import AlertSink
from client_proxy.core.services import Service
from client_proxy.core.shadows import Shadows
from client_proxy.observability import ProxyMetrics
from client_proxy.triton.gateway import TritonGateway

if TYPE_CHECKING:
    from client_proxy.reloading import Reloader
    from client_proxy.workers import Sharing


@dataclass
class ProxyState:
    settings: Settings
    gateway: TritonGateway
    fanout: FanOut
    metrics: ProxyMetrics
    ensemble: Service
    """Triton's own fan-out, for ``/predict/label?route=ensemble``."""
    draining: bool = False
    """A SIGTERM has started the shutdown: ``/health/ready`` answers 503 from then on."""
    admission: Admission = field(default_factory=lambda: Admission(0))
    """The bound on inference requests in flight (``PROXY_MAX_IN_FLIGHT``), both doors."""
    features: FeatureStore | None = None
    """The feature store requests by key read (``PROXY_FEATURE_STORE``); None: none."""
    alerts: AlertSink | None = None
    """Where the rules' alerts go (``client_proxy.alerts.Alerter``): counted, logged, posted."""
    sharing: Sharing | None = None
    """With several workers: this worker's side of the metrics they share (``client_proxy.workers``)."""
    shadows: Shadows | None = None
    """What runs the experiments' shadows, and keeps their disagreeing rows (``core/shadows.py``)."""
    plane: DataPlane = field(init=False)
    """Every inference request's one path (``client_proxy.core.dataplane``), whichever door."""

    reloader: Reloader = field(init=False)
    """What changes the configuration: reloads (SIGHUP, ``POST /admin/reload``,
    ``PROXY_WATCH_CONFIG``) and the admin endpoints' changes (``client_proxy.reloading``)."""

    @property
    def config(self) -> Configuration:
        """The configuration now (``declared.Configuration``): what the models are, whole; read it
        once per use, as a reload may put another in its place."""
        return self.plane.models.config


async def _state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


State = Annotated[ProxyState, Depends(_state)]


class JSON(JSONResponse):
    """JSON by orjson, numpy arrays included (float32 written as the shortest exact decimal).

    A ``JSONResponse`` so that FastAPI documents the routes' models as JSON."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
