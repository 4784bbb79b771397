"""The feature stores behind ``PROXY_FEATURE_STORE``: SQLite, Redis and PostgreSQL, one small
class each, the same behaviour on all three (``client_proxy.core.features.FeatureStore``).

Where the vectors live, as JSON text (a list of numbers), so that any client can read and write
them (``python -m client_proxy.features load`` writes them):

- SQLite and PostgreSQL: a table ``features(feature_set, key, vector)``, primary key
  ``(feature_set, key)``; a lookup is one ``SELECT ... WHERE feature_set = ? AND key IN (...)``;
- Redis: a hash per feature set, ``features:<set>``, field the key; a lookup is one ``HMGET``.

Connections are pooled (``PROXY_FEATURE_STORE_POOL``): SQLite reads in that many threads, each
with its own read-only connection; Redis and PostgreSQL through their clients' asyncio pools.
Any failure to read (no server, a refused login, no such table) is a ``FeatureStoreError``
naming the store, never a driver's exception.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from client_proxy.core.features import FeatureStore
from client_proxy.errors import FeatureStoreError

SCHEMES = ("sqlite", "redis", "postgresql")
_SQL_TABLE = (
    "CREATE TABLE IF NOT EXISTS features "
    "(feature_set TEXT NOT NULL, key TEXT NOT NULL, vector TEXT NOT NULL, PRIMARY KEY (feature_set, key))"
)


def shown_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _json(vector: Sequence[float]) -> str:
    return orjson.dumps([float(v) for v in vector]).decode()


def check_url(url: str) -> str:
    """``url`` when it names a store this proxy can read; ``ValueError`` saying what it takes."""
    parts = urlsplit(url)
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(
            "must be sqlite:///path/to/features.db, redis://host:6379/0 or postgresql://user@host:5432/db"
        )
    if scheme == "sqlite" and not parts.path.strip("/"):
        raise ValueError("sqlite:// needs a file: sqlite:///absolute/path.db or sqlite:///./relative.db")
    if scheme != "sqlite" and not parts.hostname:
        raise ValueError(f"{scheme}:// needs a host")
    return url


def open_store(url: str, pool: int = 4) -> FeatureStore:
    """The store ``url`` names (connections are made when first needed, never at start)."""
    scheme = urlsplit(check_url(url)).scheme
    if scheme == "sqlite":
        return SqliteStore(url, pool)
    if scheme == "redis":
        return RedisStore(url, pool)
    return PostgresStore(url, pool)


class SqliteStore:
    """A SQLite file, read in a pool of threads (the ``sqlite3`` module blocks)."""

    kind = "sqlite"

    def __init__(self, url: str, pool: int = 4) -> None:
        path = urlsplit(url).path
        # sqlite:///abs.db -> /abs.db; sqlite:///./rel.db -> ./rel.db (relative to the working dir)
        self.path = Path(path[1:] if path.startswith("/./") else path)
        self.url = f"sqlite:///{self.path}" if not self.path.is_absolute() else f"sqlite://{self.path}"
        self._executor = ThreadPoolExecutor(pool, thread_name_prefix="sqlite-features")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            uri = f"file:{self.path.resolve()}?mode=ro"
            connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _select(self, feature_set: str, keys: Sequence[str]) -> dict[str, str]:
        marks = ",".join("?" * len(keys))
        query = f"SELECT key, vector FROM features WHERE feature_set = ? AND key IN ({marks})"
        return dict(self._connection().execute(query, [feature_set, *keys]).fetchall())

    async def fetch(self, feature_set: str, keys: Sequence[str]) -> Mapping[str, bytes | str]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._select, feature_set, keys)
        except sqlite3.Error as exc:
            raise FeatureStoreError(f"feature store {self.url}: {exc}", store=self.kind) from None

    def _write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.path) as connection:
            connection.execute(_SQL_TABLE)
            connection.executemany(
                "INSERT OR REPLACE INTO features (feature_set, key, vector) VALUES (?, ?, ?)",
                [(feature_set, key, _json(v)) for key, v in vectors.items()],
            )
        connection.close()

    async def write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, feature_set, vectors)

    async def ready(self) -> bool:
        try:
            await self.fetch("", ["-"])
        except FeatureStoreError:
            return False
        return True

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class RedisStore:
    """Redis (or a server that speaks its protocol): a hash per feature set, read with HMGET."""

    kind = "redis"

    def __init__(self, url: str, pool: int = 4) -> None:
        import redis.asyncio as redis

        self.url = shown_url(url)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._pool = redis.BlockingConnectionPool.from_url(url, max_connections=pool, timeout=None)
        self._client = redis.Redis(connection_pool=self._pool)

    async def fetch(self, feature_set: str, keys: Sequence[str]) -> Mapping[str, bytes | str]:
        try:
            values = await self._client.hmget(f"features:{feature_set}", list(keys))
        except self._errors as exc:
            raise FeatureStoreError(f"feature store {self.url}: {exc}", store=self.kind) from None
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

    async def write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        mapping = {key: _json(v) for key, v in vectors.items()}
        try:
            await self._client.hset(f"features:{feature_set}", mapping=mapping)  # type: ignore[arg-type]
        except self._errors as exc:
            raise FeatureStoreError(f"feature store {self.url}: {exc}", store=self.kind) from None

    async def ready(self) -> bool:
        try:
            return bool(await self._client.ping())
        except self._errors:
            return False

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._pool.aclose()


class PostgresStore:
    """PostgreSQL through asyncpg's pool, made at the first lookup (a server down at start is a
    503 for the requests by key, not a proxy that does not start)."""

    kind = "postgresql"

    def __init__(self, url: str, pool: int = 4) -> None:
        import asyncpg

        self.url = shown_url(url)
        self._dsn = url.replace("postgres://", "postgresql://", 1)
        self._size = pool
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._errors: tuple[type[Exception], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

    async def _connections(self) -> Any:
        if self._pool is None:
            import asyncpg

            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=self._size)
        return self._pool

    async def fetch(self, feature_set: str, keys: Sequence[str]) -> Mapping[str, bytes | str]:
        try:
            pool = await self._connections()
            rows = await pool.fetch(
                "SELECT key, vector FROM features WHERE feature_set = $1 AND key = ANY($2::text[])",
                feature_set,
                list(keys),
            )
        except self._errors as exc:
            raise FeatureStoreError(f"feature store {self.url}: {exc}", store=self.kind) from None
        return {row[0]: row[1] for row in rows}

    async def write(self, feature_set: str, vectors: Mapping[str, Sequence[float]]) -> None:
        try:
            pool = await self._connections()
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(_SQL_TABLE)
                await connection.executemany(
                    "INSERT INTO features (feature_set, key, vector) VALUES ($1, $2, $3) "
                    "ON CONFLICT (feature_set, key) DO UPDATE SET vector = EXCLUDED.vector",
                    [(feature_set, key, _json(v)) for key, v in vectors.items()],
                )
        except self._errors as exc:
            raise FeatureStoreError(f"feature store {self.url}: {exc}", store=self.kind) from None

    async def ready(self) -> bool:
        try:
            pool = await self._connections()
            return bool(await pool.fetchval("SELECT 1") == 1)
        except self._errors:
            return False

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
