"""``/admin/services``: add and remove services without a restart; ``/admin/reload``: read the
configuration's files again (``client_proxy.reloading``).

Registered only when ``PROXY_ADMIN_TOKEN`` is set; every call needs ``Authorization: Bearer
<token>`` (compared in constant time). A change applies to the next request at once, is kept
in ``PROXY_SERVICES_FILE`` when one is set (so a restart keeps it), is logged with the id of
the token that asked (a hash, never the token) and is listed in ``/metadata``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from client_proxy.api.state import JSON, ProxyState
from client_proxy.config import save_services
from client_proxy.core.compositions_file import CompositionError
from client_proxy.core.services import ConfigError, Service, parse_service
from client_proxy.errors import Conflict, InvalidInput, ProxyError, Unauthorized, UnknownService

logger = logging.getLogger("client_proxy.admin")
router = APIRouter(prefix="/admin", tags=["admin"])


class NewService(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "setosa_v2", "target": "triton:8001/setosa/1"}]},
    )
    name: str = Field(description="Lower-case letters, digits and '_'")
    target: str = Field(description="As a SERVICE_<NAME> value: [grpc://|http://]host:port[/model[/version]]")


class PersistFailed(ProxyError):
    status_code = 503
    code = "persist_failed"


class ConfigRefused(ProxyError):
    status_code = 422
    code = "config_refused"


def token_id(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


async def _admin(request: Request) -> str:
    """The caller's token id, or 401."""
    state: ProxyState = request.app.state.proxy
    assert state.settings.admin_token is not None
    expected = state.settings.admin_token.get_secret_value().encode()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <PROXY_ADMIN_TOKEN>'")
    return token_id(given.strip())


Admin = Annotated[str, Depends(_admin)]


def _listing(state: ProxyState) -> dict[str, Any]:
    return {
        "services": [{"name": s.name, "target": s.describe()} for s in state.config.services],
        "persisted_to": str(state.settings.services_file) if state.settings.services_file else None,
    }


async def _apply(state: ProxyState, services: list[Service], change: dict[str, Any]) -> None:
    """The change applied: kept in ``PROXY_SERVICES_FILE`` when set, then served (by every worker:
    through the file and a reload of each, ``client_proxy.workers``)."""
    change["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        changed = state.config.with_services(services, change)
    except CompositionError as exc:  # an experiment names the service: the file must change first
        raise Conflict(f"{exc.args[0].partition(': ')[2]}; change the compositions file first") from None
    if state.settings.services_file is not None:
        try:
            save_services(state.settings.services_file, changed.services, changed.changes)
        except OSError as exc:
            raise PersistFailed(
                f"could not write PROXY_SERVICES_FILE ({exc.strerror}); nothing changed"
            ) from None
    logger.warning(
        "admin by=%s %s service %s %s",
        change["by"],
        change["action"],
        change["service"],
        change.get("target", ""),
    )
    cause = f"admin {change['action']} {change['service']}"
    if state.reloader.several:
        done = await state.reloader.reload_everywhere(cause)
        if done.outcome == "refused":
            raise ConfigRefused(
                f"the change is in PROXY_SERVICES_FILE, but the workers kept configuration "
                f"{done.config.generation}: {done.error}",
                kept=done.config.describe(),
            )
        return
    # One assignment: each request sees the old configuration or the new one.
    state.reloader.put(changed, cause)
    state.reloader.files_written()


@router.get("/services", response_class=JSON, responses={401: {"description": "Missing or wrong token"}})
async def list_services(request: Request, by: Admin) -> JSON:
    """The services the fan-out calls now."""
    state: ProxyState = request.app.state.proxy
    return JSON({**_listing(state), "changes": list(state.config.changes)})


@router.post("/services", response_class=JSON, status_code=201, responses={401: {}, 409: {}, 422: {}})
async def add_service(request: Request, body: NewService, by: Admin) -> JSON:
    """Add a service; the fan-out calls it from the next request on."""
    state: ProxyState = request.app.state.proxy
    try:
        service = parse_service(body.name, body.target, state.settings.protocol, "service")
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from None
    if any(s.name == service.name for s in state.config.services):
        raise Conflict(f"service {service.name!r} exists: remove it first")
    await _apply(state, sorted([*state.config.services, service]), {"action": "add", "service": service.name,
                                                         "target": service.describe(), "by": by})  # fmt: skip
    return JSON({**_listing(state), "added": service.name}, status_code=201)


@router.delete("/services/{name}", response_class=JSON, responses={401: {}, 404: {}, 409: {}})
async def remove_service(request: Request, name: str, by: Admin) -> JSON:
    """Remove a service; the fan-out stops calling it from the next request on."""
    state: ProxyState = request.app.state.proxy
    config = state.config
    if not any(s.name == name for s in config.services):
        raise UnknownService(f"no service {name!r}")
    users = [p.name for p in config.pipelines.values() if name in p.service_names]
    if users:
        raise Conflict(f"service {name!r} is used by pipeline(s) {', '.join(users)}")
    remaining = [s for s in config.services if s.name != name]
    if not remaining:
        raise Conflict("cannot remove the last service")
    await _apply(state, remaining, {"action": "remove", "service": name, "by": by})
    return JSON({**_listing(state), "removed": name})


@router.post("/reload", response_class=JSON, responses={401: {}, 422: {"description": "Invalid files: kept"}})
async def reload(request: Request, by: Admin) -> JSON:
    """Read the compositions, pipelines and services files again and serve what they say; an
    invalid file keeps the configuration in place (422, naming the file and line)."""
    state: ProxyState = request.app.state.proxy
    logger.warning("admin by=%s reload", by)
    done = await state.reloader.reload_everywhere(f"POST /admin/reload by {by}")
    if done.outcome == "refused":
        raise ConfigRefused(
            f"configuration {done.config.generation} kept: {done.error}", kept=done.config.describe()
        )
    return JSON(done.describe())
