"""The JSON doors' way in and out of the dataplane: a request's headers, its timeout policy and
deadline (query or headers), its body read within that deadline (size-limited while it arrives)
and parsed (``inputs.py``) into the dataplane's ``InferenceRequest`` (rows, named tensors, or
keys whose rows the dataplane reads from the feature store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from client_proxy.api.inputs import parse_body
from client_proxy.api.state import ProxyState
from client_proxy.config import Settings
from client_proxy.core.dataplane import InferenceRequest
from client_proxy.core.served import Kind
from client_proxy.core.services import TimeoutPolicy, time_left
from client_proxy.core.tensors import Inputs
from client_proxy.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UnsupportedMediaType,
)


@dataclass(frozen=True, slots=True)
class CallOptions:
    request_id: str
    policy: TimeoutPolicy | None
    """As the client asked; None: the model's own, else ``PROXY_TIMEOUT_POLICY`` (the dataplane's)."""
    started: float
    deadline: float
    """``time.monotonic()`` instant by which the answer must be sent (a composition's own
    ``deadline_ms`` may shorten it: the dataplane's)."""
    variant: str | None = None
    """``X-Variant``: the experiment's variant the client asks for."""
    variant_key: str | None = None
    """The ``PROXY_VARIANT_HEADER`` header: what keeps the caller on one variant."""


POLICIES = {p.value: p for p in TimeoutPolicy}

#: Where the front leaves a request's id and arrival (``time.monotonic()``) in its ASGI scope.
ARRIVAL = "client_proxy.arrival"


_NO_QUERY: dict[str, str] = {}


#: No answer can come back in less: a shorter deadline is refused as a bad request.
MIN_DEADLINE_MS = 50.0


def call_options(request: Request, settings: Settings) -> CallOptions:
    """Policy and deadline from ``?policy=`` / ``X-Timeout-Policy`` and ``?deadline_ms=`` / ``X-Deadline-Ms``.

    Read by hand rather than through FastAPI's dependency injection: these routes are the hot
    path, and the injection machinery cost more CPU per request than the fan-out itself.
    """
    query = request.query_params if request.scope["query_string"] else _NO_QUERY
    policy = None
    # The query parameter wins over the header; an invalid value is refused wherever it is.
    for where, raw_policy in (
        ("X-Timeout-Policy", header(request, "x-timeout-policy")),
        ("policy", query.get("policy")),
    ):
        if raw_policy is not None:
            if raw_policy not in POLICIES:
                raise InvalidInput(f"{where}: must be 'all_or_nothing' or 'partial', not {raw_policy[:40]!r}")
            policy = POLICIES[raw_policy]
    budget_ms = ceiling_ms = settings.deadline_ms
    for where, raw_deadline in (
        ("X-Deadline-Ms", header(request, "x-deadline-ms")),
        ("deadline_ms", query.get("deadline_ms")),
    ):
        if raw_deadline is not None:
            try:
                asked = float(raw_deadline)
            except ValueError:
                asked = float("nan")
            if not MIN_DEADLINE_MS <= asked < float("inf"):
                raise InvalidInput(
                    f"{where}: must be at least {MIN_DEADLINE_MS:g} milliseconds, not {raw_deadline[:40]!r}"
                )
            budget_ms = min(asked, ceiling_ms)
    request_id, started = request.scope.get(ARRIVAL) or ("", time.monotonic())
    return CallOptions(
        request_id,
        policy,
        started,
        started + budget_ms / 1000.0,
        header(request, "x-variant"),
        header(request, settings.variant_header),
    )


_HEADERS = "client_proxy.headers"


def header(request: Request, name: str) -> str | None:
    """The request's header ``name`` (lower case), the first when repeated, as Starlette's
    ``request.headers.get`` gives it. The inference routes read several headers per request:
    a dict made once per request answers each for a fraction of a linear scan's cost."""
    scope = request.scope
    headers: dict[str, str] | None = scope.get(_HEADERS)
    if headers is None:
        headers = scope[_HEADERS] = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in reversed(scope["headers"])
        }
    return headers.get(name)


def check_content_type(request: Request) -> None:
    encoding = (header(request, "content-encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the JSON uncompressed"
        )
    content_type = header(request, "content-type")
    if content_type is None:
        return  # curl -d without -H: try it as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported: send application/json")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than ``max_bytes`` and a body slower than ``timeout_s``."""
    declared = header(request, "content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest(f"Content-Length {declared!r} is not a number") from None
        if length > max_bytes:
            raise PayloadTooLarge(
                f"body of {length} bytes is over the {max_bytes}-byte limit", max_bytes=max_bytes
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"body is over the {max_bytes}-byte limit", max_bytes=max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s * 1000:.0f} ms") from None
    except ClientDisconnect:
        raise BadRequest("the client went away before sending the whole body") from None
    return b"".join(chunks)


async def options_and_body(
    request: Request, settings: Settings, json_only: bool = True
) -> tuple[CallOptions, bytes]:
    """The request's policy and deadline (``call_options``), and its body read within that
    deadline (``json_only``: refused unless JSON, by its ``Content-Type``)."""
    options = call_options(request, settings)
    if json_only:
        check_content_type(request)
    return options, await read_body(request, settings.max_body_bytes, time_left(options.deadline))


async def inference_request(
    request: Request,
    state: ProxyState,
    model: str,
    endpoint: str,
    parse: Callable[[bytes, int], Inputs],
    ensemble: bool = False,
    kind: Kind | None = None,
) -> InferenceRequest:
    """The request for ``model``: its policy and deadline (query or headers), and its body read
    within that deadline, given to ``parse`` unless it is ``{"keys": [...]}``. A request that
    cannot be read is refused with a 404 when the model is unknown (whatever the body, as Triton
    does), else with what was wrong with it; the dataplane looks the model up otherwise."""
    settings = state.settings
    try:
        options, body = await options_and_body(request, settings)
        keys, inputs = parse_body(body, settings.max_rows, parse)
    except ProxyError:
        if not ensemble:
            state.plane.models.find(model, kind)  # an unknown model is a 404 whatever the body
        raise
    return with_options(options, model, endpoint, inputs=inputs, keys=keys, ensemble=ensemble, kind=kind)


def with_options(options: CallOptions, model: str, endpoint: str, **fields: Any) -> InferenceRequest:
    """The request for ``model`` with ``options``' id, start, deadline and policy, and ``fields``."""
    return InferenceRequest(
        model,
        endpoint,
        options.request_id,
        options.started,
        options.deadline,
        options.policy,
        variant=options.variant,
        variant_key=options.variant_key,
        **fields,
    )
