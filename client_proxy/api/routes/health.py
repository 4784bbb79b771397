"""``/health``, ``/health/live``, ``/health/ready``, ``/health/all``, ``/metadata`` and ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from client_proxy.api.inputs import N_FEATURES, SAMPLE_ROW
from client_proxy.api.schemas import Health, HealthAll, Live, Metadata, Ready
from client_proxy.api.state import JSON, State
from client_proxy.core.services import Service, Target
from client_proxy.errors import NotFound, UpstreamError
from client_proxy.workers import Registry, merge

router = APIRouter(tags=["operations"])


@router.get("/health", response_class=JSON, responses={200: {"model": Health}})
async def health() -> JSON:
    """The proxy itself is up (it does not ask Triton; see ``/health/all``)."""
    return JSON({"health": "ok"})


@router.get("/health/live", response_class=JSON, responses={200: {"model": Live}})
async def live() -> JSON:
    """Liveness: the process answers. For a platform's liveness probe (restart when it fails)."""
    return JSON({"status": "live"})


@router.get(
    "/health/ready",
    response_class=JSON,
    responses={200: {"model": Ready}, 503: {"model": Ready, "description": "not ready: see `reason`"}},
)
async def ready(state: State) -> JSON:
    """Readiness: a prediction can be answered now. For a platform's readiness probe (send traffic
    only while it passes).

    200 while at least one service of the default composition is ready in Triton; 503 when none
    is, and from the moment a SIGTERM starts the proxy's shutdown (``draining``)."""
    if state.draining:
        return JSON({"status": "draining", "reason": "shutting down"}, status_code=503)
    readiness = await _default_readiness(state)
    ready_names = [s.name for s, r in readiness if r["ready"]]
    if state.draining:
        return JSON({"status": "draining", "reason": "shutting down"}, status_code=503)
    if not ready_names:
        reasons = "; ".join(f"{s.name}: {r.get('reason', 'not ready')}" for s, r in readiness)
        return JSON(
            {"status": "unavailable", "reason": f"no service is ready ({reasons or 'no services'})"},
            status_code=503,
        )
    return JSON({"status": "ready", "ready_services": ready_names})


async def _default_readiness(state: State) -> list[tuple[Service, dict[str, Any]]]:
    """Each service of the default composition with its model's readiness (``_model_readiness``)."""
    services = list(state.config.services)
    results = await asyncio.gather(*(_model_readiness(state, s) for s in services))
    return list(zip(services, results, strict=True))


async def _readiness(state: State, service: Service) -> dict[str, Any]:
    """``_model_readiness``, and with replicas each replica's state and the hedging settings."""
    entry = await _model_readiness(state, service)
    if len(service.targets) > 1:
        entry["replicas"] = await _replicas(state, service)
        entry["hedging"] = state.gateway.hedging(service)
    return entry


async def _model_readiness(state: State, service: Service) -> dict[str, Any]:
    entry: dict[str, Any] = {"target": service.describe()}
    try:
        async with asyncio.timeout(state.settings.service_timeout_ms / 1000):
            ready = await state.gateway.model_ready(service, state.settings.service_timeout_ms / 1000)
    except TimeoutError:
        entry.update(health="unavailable", ready=False, reason="timeout")
    except UpstreamError as exc:
        entry.update(health="unavailable", ready=False, reason=exc.message)
    else:
        entry.update(health="ok" if ready else "unavailable", ready=ready)
        if not ready:
            entry["reason"] = f"model '{service.model}' is not ready"
    return entry


async def _replicas(state: State, service: Service) -> list[dict[str, Any]]:
    """Each replica: its model's readiness in its Triton, and the proxy's view (its state, why)."""
    timeout = state.settings.service_timeout_ms / 1000

    async def ready(target: Target) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(timeout):
                return await state.gateway.replica_ready(service, target, timeout), ""
        except TimeoutError:
            return False, "timeout"
        except UpstreamError as exc:
            return False, exc.message

    found = await asyncio.gather(*(ready(t) for t in service.targets))
    views = state.gateway.replicas(service).describe()
    out = []
    for (is_ready, why), view in zip(found, views, strict=True):
        entry = {**view, "ready": is_ready}
        if why:
            entry["not_ready"] = why
        out.append(entry)
    return out


@router.get("/health/all", response_class=JSON, responses={200: {"model": HealthAll}})
async def health_all(state: State) -> JSON:
    """Each service's readiness (Triton's per-model ready endpoint), checked concurrently.

    ``status`` is ``ok`` when every service is ready, ``degraded`` otherwise; always HTTP 200.
    """
    services = list(state.config.services)
    results = await asyncio.gather(*(_readiness(state, s) for s in services))
    by_name = {s.name: r for s, r in zip(services, results, strict=True)}
    status = "ok" if all(r["ready"] for r in results) else "degraded"
    body: dict[str, Any] = {"status": status, "services": by_name}
    store = state.features
    if store is not None:
        try:
            async with asyncio.timeout(state.settings.service_timeout_ms / 1000):
                store_ready = await store.ready()
        except TimeoutError:
            store_ready = False
        body["feature_store"] = {"url": store.url, "kind": store.kind, "ready": store_ready}
        if not store_ready:
            body["status"] = "degraded"
    return JSON(body)


def _tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # gRPC's JSON renders int64 dims as strings: give both protocols' answers the same ints.
    return [
        {"name": e.get("name"), "datatype": e.get("datatype"), "shape": [int(d) for d in e.get("shape", [])]}
        for e in entries
    ]


async def _describe(state: State, service: Service) -> dict[str, Any]:
    entry: dict[str, Any] = {"target": service.describe(), "model": service.model, "version": service.version}
    if len(service.targets) > 1:
        entry["replicas"] = state.gateway.replicas(service).describe()
        entry["hedging"] = state.gateway.hedging(service)
    try:
        async with asyncio.timeout(state.settings.service_timeout_ms / 1000):
            described = await state.gateway.model_description(
                service, state.settings.service_timeout_ms / 1000
            )
    except TimeoutError:
        entry.update(available=False, error="timeout")
        return entry
    except UpstreamError as exc:
        entry.update(available=False, error=exc.message)
        return entry
    metadata, config = described["metadata"], described["config"]
    entry.update(
        available=True,
        versions=metadata.get("versions", []),
        platform=metadata.get("platform"),
        backend=config.get("backend") or None,
        max_batch_size=int(config.get("max_batch_size", 0)),
        inputs=_tensors(metadata.get("inputs", [])),
        outputs=_tensors(metadata.get("outputs", [])),
    )
    return entry


_TYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT64": "int64", "INT32": "int32"}


def _rows_of(described: list[dict[str, Any]]) -> tuple[str, int]:
    """The seed's rows as the services' models take them (their one input ``[N, width]``): the
    value type and width; the Iris example's when no model could be described."""
    for entry in described:
        inputs = entry.get("inputs") or []
        if len(inputs) == 1 and len(inputs[0]["shape"]) == 2 and inputs[0]["shape"][1] > 0:
            return _TYPES.get(inputs[0]["datatype"], str(inputs[0]["datatype"]).lower()), inputs[0]["shape"][
                1
            ]
    return "float32", N_FEATURES


@router.get("/metadata", response_class=JSON, responses={200: {"model": Metadata}})
async def metadata(state: State) -> JSON:
    """The request and response formats, and each service's model as Triton describes it."""
    config = state.config
    services = list(config.services)
    described = await asyncio.gather(*(_describe(state, s) for s in services))
    settings = state.settings
    data_type, width = _rows_of(described)
    return JSON(
        {
            "data_type": data_type,
            "data_structure": f"(N,{width})",
            "data_sample": [SAMPLE_ROW if width == N_FEATURES else [0.0] * width],
            "prediction_type": "float32",
            "prediction_structure": "(N,2)",
            "prediction_meaning": (
                "[P(class), P(other)] per row, per service; label: the service with the highest P(class)"
            ),
            "max_rows": settings.max_rows,
            "timeout_policy": settings.timeout_policy.value,
            "deadline_ms": settings.deadline_ms,
            "service_timeout_ms": settings.service_timeout_ms,
            "services": {s.name: d for s, d in zip(services, described, strict=True)},
            "service_changes": list(config.changes),
            "pipelines": sorted(config.pipelines),
            "configuration": config.describe(),
            "label_route": settings.label_route,
            "ensemble": state.ensemble.describe(),
        }
    )


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """The proxy's Prometheus metrics (Triton's own are on its port 8002). The readiness gauges
    are measured now, as ``/health/ready`` would answer (each model asked with the service
    timeout). 404 with ``PROXY_METRICS=false``."""
    if not state.settings.metrics:
        raise NotFound("/metrics is off (PROXY_METRICS=false)")
    readiness = await _default_readiness(state)
    for service, result in readiness:
        state.metrics.service_ready.labels(service.name).set(1 if result["ready"] else 0)
    state.metrics.ready.set(1 if any(r["ready"] for _, r in readiness) and not state.draining else 0)
    # With several workers, every worker's figures (client_proxy.workers).
    registry = (
        Registry(merge(await state.sharing.gather("metrics"), state.metrics.ACROSS_WORKERS))
        if state.sharing is not None
        else state.metrics.registry
    )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
