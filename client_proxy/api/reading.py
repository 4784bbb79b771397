"""The proxy's JSON doors' way in: a request's options and body read (within its deadline) into
the dataplane's ``InferenceRequest`` (rows, named tensors, or keys whose rows the dataplane reads
from the feature store); and the keys said in the answer on the way out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from client_proxy.api.inputs import check_content_type, parse_keys, read_body
from client_proxy.api.options import CallOptions, call_options
from client_proxy.api.state import ProxyState
from client_proxy.core.dataplane import InferenceRequest
from client_proxy.core.features import Fetched
from client_proxy.core.served import Kind
from client_proxy.core.services import time_left
from client_proxy.core.tensors import Inputs


async def inference_request(
    request: Request,
    state: ProxyState,
    model: str,
    endpoint: str,
    parse: Callable[[bytes, int], Inputs],
    ensemble: bool = False,
    kind: Kind | None = None,
) -> InferenceRequest:
    """The request for ``model`` (looked up first: an unknown one is a 404 whatever the body):
    its policy and deadline (query or headers), and its body read within that deadline, given
    to ``parse`` unless it is ``{"keys": [...]}``."""
    settings = state.settings
    target = None if ensemble else state.plane.models.find(model, kind)[1]
    options = call_options(request, settings)
    check_content_type(request)
    body = await read_body(request, settings.max_body_bytes, time_left(options.deadline))
    keys = parse_keys(body, settings.max_rows)
    inputs = parse(body, settings.max_rows) if keys is None else None
    return with_options(
        options, model, endpoint, inputs=inputs, keys=keys, ensemble=ensemble, kind=kind, target=target
    )


def with_options(options: CallOptions, model: str, endpoint: str, **fields: Any) -> InferenceRequest:
    """The request for ``model`` with ``options``' id, start, deadline and policy, and ``fields``."""
    return InferenceRequest(
        model, endpoint, options.request_id, options.started, options.deadline, options.policy, **fields
    )


def with_keys(body: dict[str, Any], fetched: Fetched | None) -> dict[str, Any]:
    """``body`` with the key of each row (``keys``) and the keys not found (``missing_keys``,
    and ``partial``), for a request by key; as it was otherwise."""
    if fetched is not None:
        body.update(fetched.describe())
        if fetched.missing:
            body["partial"] = True
    return body
