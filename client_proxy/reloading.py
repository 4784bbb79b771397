"""Changing the configuration while serving: SIGHUP, ``POST /admin/reload``, ``PROXY_WATCH_CONFIG``,
and the admin endpoints' changes to the services.

What a reload reads again: the compositions file (its compositions, services, replica lists,
hedging and rules), the pipelines file (its pipelines and rules), and ``PROXY_SERVICES_FILE``
when it exists. The ``SERVICE_*`` variables and the ``PROXY_*`` settings are the process's
environment: they change with a restart (the services stay as they are, admin changes included,
when there is no services file).

How: the files are read and checked whole, off the event loop. A mistake keeps the configuration
in place, is logged in one line naming the file and line, and counted
(``proxy_config_reloads_total{outcome="refused"}``, ``proxy_config_last_reload_successful`` 0).
A valid configuration has the clients of its new servers opened and is put in place with one
assignment (``ServedModels.swap``): requests that already found their model finish on the
configuration they started with, the next ones get the new one, and none waits or is refused.
Reloads run one at a time. Clients of servers no longer named are kept (they cost a connection
pool each) until the proxy stops.

With ``PROXY_WATCH_CONFIG=true`` the files are read every ``PROXY_WATCH_INTERVAL_MS`` and a
reload follows a change of their content (not of their time stamps: a Kubernetes ConfigMap's
files change by a symbolic link swapped, which this follows).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from client_proxy.config import Settings, read_services_file
from client_proxy.core.compositions_file import CompositionError
from client_proxy.core.declared import Configuration, load_configuration
from client_proxy.core.pipelines_file import PipelineError
from client_proxy.core.served import ServedModels
from client_proxy.core.services import ConfigError, Service
from client_proxy.errors import ProxyError
from client_proxy.observability import ProxyMetrics

logger = logging.getLogger("client_proxy.reload")
#: How long a reload asked of every worker may take to reach this one.
EVERYWHERE_TIMEOUT_S = 30.0


_held: list[int] = []


def hold_sighup() -> None:
    """Until the app's lifespan takes SIGHUP (``sighup_held``), one that arrives is kept rather
    than stopping the process: with several workers, the supervisor hands each worker the
    SIGHUP of an admin change, which may come while a worker starts (after it read the files,
    or before). Only in a process's main thread (elsewhere: nothing to do)."""
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: _held.append(signum))
        # A worker starts with SIGHUP blocked (client_proxy.workers): one already sent arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def sighup_held() -> bool:
    """Whether a SIGHUP came while held (``hold_sighup``); it is forgotten once asked."""
    held = bool(_held)
    _held.clear()
    return held


class WorkersLate(ProxyError):
    status_code = 503
    code = "workers_late"


@dataclass(frozen=True)
class Reload:
    """What a reload did: ``applied`` (``config`` is served now) or ``refused`` (``error`` says
    why, in one line; ``config`` is the one kept)."""

    outcome: Literal["applied", "refused"]
    config: Configuration
    cause: str
    error: str | None = None

    def describe(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "cause": self.cause,
            "error": self.error,
            "config": self.config.describe(),
        }


class Reloader:
    """The one way the configuration served changes (see the module)."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        models: ServedModels,
        open_clients: Callable[[list[Service]], None],
        metrics: ProxyMetrics,
        on_config: Callable[[Configuration], None] = lambda config: None,
        supervisor: int | None = None,
    ) -> None:
        """``environ``: what the files' ``${VAR}`` are read from; ``open_clients``: the gateway's
        ``open``; ``on_config``: told of each configuration before it is served; ``supervisor``:
        with several workers, the process that hands SIGHUP to each (``client_proxy.workers``)."""
        self._settings = settings
        self._environ = dict(environ)
        self._models = models
        self._open_clients = open_clients
        self._metrics = metrics
        self._on_config = on_config
        self._lock = asyncio.Lock()
        self._seen = self._digest()
        self._tasks: set[asyncio.Task[object]] = set()
        self._supervisor = supervisor
        self._waiting: list[asyncio.Future[Reload]] = []
        self.last: Reload | None = None
        """The last reload (None: none since the start)."""

    @property
    def files(self) -> list[Path]:
        """The files a reload reads (those the settings name)."""
        s = self._settings
        return [p for p in (s.compositions_file, s.pipelines_file, s.services_file) if p is not None]

    def put(self, config: Configuration, cause: str) -> None:
        """Serves ``config`` from the next request on (its new servers' clients opened first)."""
        self._open_clients(config.every_service())
        self._on_config(config)
        self._models.swap(config)
        self._metrics.config_generation.set(config.generation)
        logger.info("configuration %d in place (%s)", config.generation, cause)

    async def reload(self, cause: str) -> Reload:
        """Reads the files again and serves what they say, or keeps what is served when they are
        invalid (see the module)."""
        async with self._lock:
            waiting, self._waiting = self._waiting, []
            done = await self._reload(cause)
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(done)
            return done

    async def _reload(self, cause: str) -> Reload:
        while True:
            current = self._models.config
            try:
                digest, config = await asyncio.to_thread(self._load, current)
            except (ConfigError, CompositionError, PipelineError) as exc:
                self._metrics.config_reloaded("refused")
                logger.error("reload (%s) refused, configuration %d kept: %s", cause, current.generation, exc)
                self.last = Reload("refused", current, cause, str(exc))
                return self.last
            if self._models.config is current:
                break
            # An admin change came while the files were read: read them again over it.
        self._seen = digest
        self.put(config, cause)
        self._metrics.config_reloaded("applied")
        self.last = Reload("applied", config, cause)
        return self.last

    @property
    def several(self) -> bool:
        """Whether this is one of several workers (a change must reach the others too)."""
        return self._supervisor is not None

    async def reload_everywhere(self, cause: str) -> Reload:
        """``reload`` in every worker: here, when this process is the only one; else by SIGHUP to
        the supervisor, which hands it to each worker, this one's reload awaited and returned."""
        if self._supervisor is None:
            return await self.reload(cause)
        waiter: asyncio.Future[Reload] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        logger.info("%s: every worker reloads (SIGHUP to the supervisor, pid %d)", cause, self._supervisor)
        os.kill(self._supervisor, signal.SIGHUP)
        try:
            return await asyncio.wait_for(waiter, EVERYWHERE_TIMEOUT_S)
        except TimeoutError:
            raise WorkersLate(
                f"the workers did not reload within {EVERYWHERE_TIMEOUT_S:.0f} s (is the supervisor "
                "python -m client_proxy?)"
            ) from None

    def reload_soon(self, cause: str) -> None:
        """``reload`` in a task of its own (a signal handler's way)."""
        task = asyncio.get_running_loop().create_task(self.reload(cause))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def files_written(self) -> None:
        """The proxy itself wrote the files (the admin endpoints, ``PROXY_SERVICES_FILE``): not a
        change to reload for."""
        self._seen = self._digest()

    async def watch(self, interval_s: float) -> None:
        """Reloads whenever the files' content changes, looking every ``interval_s``; until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                digest = await asyncio.to_thread(self._digest)
            except OSError:  # pragma: no cover - _digest reads what it can
                continue
            if digest != self._seen:
                self._seen = digest
                await self.reload("files changed")

    def _load(self, current: Configuration) -> tuple[str, Configuration]:
        digest = self._digest()
        settings = self._settings
        if settings.services_file is not None and settings.services_file.exists():
            services, changes = read_services_file(settings.services_file, settings)
        else:
            services, changes = list(current.services), [dict(c) for c in current.changes]
        config = load_configuration(
            settings, services, self._environ, generation=current.generation + 1, changes=changes
        )
        return digest, config

    def _digest(self) -> str:
        """The files' content, as one hash (a missing or unreadable file hashes as such)."""
        digest = hashlib.sha256()
        for path in self.files:
            try:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError as exc:
                digest.update(f"unreadable:{exc.errno}".encode())
        return digest.hexdigest()
