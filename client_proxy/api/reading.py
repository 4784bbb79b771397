"""Reading a request's rows within its deadline: from its body, or, for ``{"keys": [...]}``,
from the feature store (``client_proxy.core.features``: one lookup, counted); and the keys said
in the answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from starlette.requests import Request

from client_proxy.api.inputs import check_content_type, parse_inputs, parse_keys, parse_rows, read_body
from client_proxy.api.options import CallOptions
from client_proxy.api.state import ProxyState
from client_proxy.core.features import Fetched, fetch_rows
from client_proxy.core.tensors import Inputs
from client_proxy.errors import FeatureStoreError, FeatureStoreTimeout, NoFeatureStore, UnknownKeys


async def lookup(state: ProxyState, feature_set: str, keys: list[str], options: CallOptions) -> Fetched:
    """The rows of ``keys`` in ``feature_set``, within the request's deadline, counted."""
    store = state.features
    if store is None:
        raise NoFeatureStore("this proxy has no feature store: set PROXY_FEATURE_STORE to send keys")
    metrics = state.metrics
    try:
        fetched = await fetch_rows(store, feature_set, keys, options.deadline, options.policy)
    except FeatureStoreTimeout:
        metrics.feature_lookups.inc((store.kind, "timeout"))
        raise
    except FeatureStoreError:
        metrics.feature_lookups.inc((store.kind, "unavailable"))
        raise
    except UnknownKeys as exc:
        metrics.feature_lookups.inc((store.kind, "ok"))
        metrics.feature_keys.inc(("missing",), exc.details.get("count", 0))
        raise
    metrics.feature_lookups.inc((store.kind, "ok"))
    metrics.feature_latency.observe((store.kind,), fetched.seconds)
    metrics.feature_keys.inc(("found",), len(set(fetched.keys)))
    if fetched.missing:
        metrics.feature_keys.inc(("missing",), len(fetched.missing))
    return fetched


async def read_rows(
    request: Request, state: ProxyState, options: CallOptions
) -> tuple[NDArray[np.float32], Fetched | None]:
    """The seed's rows (``[N, 4]`` float32) from the body, or from the store for ``{"keys"}``."""
    rows, fetched = await _rows_or_keys(request, state, options, None, parse_rows)
    return (rows, None) if fetched is None else (fetched.rows.astype(np.float32), fetched)


async def read_inputs(
    request: Request, state: ProxyState, options: CallOptions, feature_set: str | None, forward: bool = False
) -> tuple[Inputs, Fetched | None]:
    """Rows or named tensors from the body, or for ``{"keys"}`` rows from the store
    (``feature_set``, else ``PROXY_FEATURE_SET``) or, ``forward``, the keys themselves as rows of
    one string each, for services that read their own features."""
    return await _rows_or_keys(request, state, options, feature_set, parse_inputs, forward)


async def _rows_or_keys(
    request: Request,
    state: ProxyState,
    options: CallOptions,
    feature_set: str | None,
    parse: Callable[[bytes, int], Any],
    forward: bool = False,
) -> tuple[Any, Fetched | None]:
    """The body read within the deadline and given to ``parse``, or for ``{"keys"}`` the rows the
    store holds for them (``forward``: the keys as rows, ``[N, 1]`` strings)."""
    check_content_type(request)
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes, max(options.deadline - time.monotonic(), 0.001))
    keys = parse_keys(body, settings.max_rows)
    if keys is None:
        return parse(body, settings.max_rows), None
    if forward:
        rows = np.empty((len(keys), 1), dtype=np.object_)
        rows[:, 0] = keys
        return rows, Fetched(np.empty((0, 0)), keys)
    fetched = await lookup(state, feature_set or settings.feature_set, keys, options)
    return fetched.rows, fetched


def with_keys(body: dict[str, Any], fetched: Fetched | None) -> dict[str, Any]:
    """``body`` with the key of each row (``keys``) and the keys not found (``missing_keys``,
    and ``partial``), for a request by key; as it was otherwise."""
    if fetched is not None:
        body.update(fetched.describe())
        if fetched.missing:
            body["partial"] = True
    return body
