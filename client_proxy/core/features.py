"""Inputs fetched by key: a request names entities, the proxy reads their features once.

The seed's first way of getting the input: the proxy collects the data once for all the models
(one read of the store per request, however many services), instead of every feature travelling
in the request body. A request sends ``{"keys": ["flower-17", "flower-42"]}``; the proxy reads
the keys' feature vectors from the store in one batched lookup, within the request's deadline,
and fans the rows out as if the body had carried them.

A store holds feature sets (``iris``, ``wine``), each a map from a key to a vector of numbers.
The stores themselves (SQLite, Redis, PostgreSQL) are in ``client_proxy.stores``; this module is
what every one of them is to the rest of the proxy, and the lookup's rules:

- every key distinct is asked once (a key named twice is two rows, one read);
- a key the store does not hold is missing: all of them missing is a 404 naming them; some, a
  partial answer naming them (``partial`` policy) or a 404 (``all_or_nothing``);
- a store that is down is a 503, one that does not answer within the deadline a 504, and a
  vector that is not a list of numbers (or not as wide as the others) a 503 naming the key.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from numpy.typing import NDArray

from client_proxy.core.services import TimeoutPolicy, time_left
from client_proxy.errors import FeatureStoreError, FeatureStoreTimeout, UnknownKeys

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # Triton 24.10's Python 3.10, where the by_key backend runs fetch_rows (redis needs it there)
    from async_timeout import timeout as _timeout
#: What a timed-out lookup raises: TimeoutError, which asyncio's was not before Python 3.11.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)

#: A key: what fits in a URL path segment, a Redis hash field and a SQL text column alike.
KEY = re.compile(r"^[A-Za-z0-9._:@/\-]{1,128}$")
#: A feature set's name (a table's rows, a Redis hash's suffix).
FEATURE_SET = re.compile(r"^[a-z0-9_]{1,64}$")
#: Most keys named in an error message, and listed in its ``keys`` (``count`` has them all).
_NAMED = 10
_LISTED = 100


class FeatureStore(typing.Protocol):
    """What the proxy needs of a feature store."""

    @property
    def url(self) -> str:
        """Where it is, for messages and metrics (never a password)."""
        ...

    @property
    def kind(self) -> str:
        """``sqlite``, ``redis`` or ``postgresql``."""
        ...

    async def fetch(self, feature_set: str, keys: Sequence[str]) -> Mapping[str, bytes | str]:
        """The vector (JSON text) of each key found, in one batched read; ``FeatureStoreError``
        when the store cannot be read."""
        ...

    async def write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        """Store (or replace) the vectors (loading; not on the request path)."""
        ...

    async def ready(self) -> bool:
        """The store answers now."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """The rows a request's keys stand for."""

    rows: NDArray[np.float64]
    """``[found, width]``, in the request's order (a key named twice is two rows)."""
    keys: list[str]
    """The key of each row."""
    missing: list[str] = field(default_factory=list)
    """The keys the store does not hold, each once, in the request's order."""
    seconds: float = 0.0
    """How long the lookup took."""

    def describe(self) -> dict[str, typing.Any]:
        """What a response says of the keys: ``keys`` (each row's), and ``missing_keys``."""
        found: dict[str, typing.Any] = {"keys": self.keys}
        if self.missing:
            found["missing_keys"] = self.missing
        return found


def _named(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_NAMED])
    return shown + (f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else "")


def _vector(raw: bytes | str, feature_set: str, key: str, store: FeatureStore) -> list[float]:
    try:
        vector = orjson.loads(raw)
    except orjson.JSONDecodeError:
        vector = None
    if (
        not isinstance(vector, list)
        or not vector
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in vector
        )
    ):
        raise FeatureStoreError(
            f"feature store {store.url}: feature set {feature_set!r}, key {key!r}: the value is not "
            "a list of finite numbers"
        )
    return vector


async def fetch_rows(
    store: FeatureStore, feature_set: str, keys: Sequence[str], deadline: float, policy: TimeoutPolicy
) -> Fetched:
    """The rows of ``keys`` from ``feature_set``, read in one lookup bounded by ``deadline``."""
    distinct = list(dict.fromkeys(keys))
    started = time.perf_counter()
    try:
        async with _timeout(time_left(deadline)):
            found = await store.fetch(feature_set, distinct)
    except _TIMEOUTS:
        raise FeatureStoreTimeout(
            f"feature store {store.url}: no answer within the request's deadline", store=store.kind
        ) from None
    seconds = time.perf_counter() - started
    missing = [k for k in distinct if k not in found]
    if len(missing) == len(distinct):
        raise UnknownKeys(
            f"feature set {feature_set!r} holds none of the keys: {_named(missing)}",
            keys=missing[:_LISTED],
            count=len(missing),
        )
    if missing and policy is TimeoutPolicy.ALL_OR_NOTHING:
        raise UnknownKeys(
            f"feature set {feature_set!r} does not hold {_named(missing)} (all_or_nothing)",
            keys=missing[:100],
        )
    vectors = {k: _vector(raw, feature_set, k, store) for k, raw in found.items() if k in distinct}
    widths = {len(v) for v in vectors.values()}
    if len(widths) != 1:
        raise FeatureStoreError(
            f"feature store {store.url}: feature set {feature_set!r} has vectors of different widths "
            f"{sorted(widths)} among the keys asked for"
        )
    present = [k for k in keys if k in vectors]
    rows = np.asarray([vectors[k] for k in present], dtype=np.float64)
    return Fetched(rows, present, missing, seconds)
