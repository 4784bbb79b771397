"""Several worker processes (``PROXY_WORKERS>1``) that act as one proxy: one ``/metrics``, one
configuration.

- **Metrics.** Each worker keeps its metrics in its own memory, as one worker does (the hot path
  pays nothing for the workers beside it), and answers its figures on a Unix socket in a
  directory only this user can open, which ``python -m client_proxy`` makes for the workers and
  removes after them (``WORKERS_DIR``). A scrape, whichever worker it reaches, asks every other
  worker and adds their figures to its own: counters and histograms are summed (each request
  counted once, by the worker that answered it), gauges merged as ``ProxyMetrics.ACROSS_WORKERS``
  says. A worker that stops leaves its counters and histograms in a file, so totals never go
  back when uvicorn replaces a worker (one killed outright takes its figures with it: Prometheus
  takes the drop for a counter reset). The experiments' comparisons (``GET /experiments``) are
  shared the same way: each is a ``Topic``.
- **Configuration.** SIGHUP to the supervisor (``Supervisor``, uvicorn's own with this one
  change) is handed to every worker, each of which reloads its files (``client_proxy.reloading``),
  instead of uvicorn's replacing of the workers. ``POST /admin/reload`` and the admin endpoints'
  changes, which reach one worker, go the same way: that worker writes the services file (it
  is how the workers share the services), sends its supervisor SIGHUP, and answers once its own
  reload is done. Each worker numbers its configurations (``proxy_config_generation``); one
  that starts after SIGHUPs (a worker replaced) starts at the supervisor's count of them
  (``GENERATION``), so the same files have the same number in every worker, and a SIGHUP that
  comes while a worker starts is kept until it can reload (``reloading.hold_sighup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("client_proxy.workers")

#: The variable ``python -m client_proxy`` names the workers' shared directory in.
WORKERS_DIR = "CLIENT_PROXY_WORKERS_DIR"
#: The variable the supervisor hands each worker it starts the generation of its files in
#: (1, and one more at each SIGHUP handed on).
GENERATION = "CLIENT_PROXY_GENERATION"
#: How long a scrape waits for another worker's figures.
ASK_TIMEOUT_S = 2.0
#: Families whose samples are added up (gauges are merged by name: ``merge``).
_SUMMED = ("counter", "histogram", "summary", "gaugehistogram")

Family = dict[str, Any]
"""A metric family as it crosses between workers: name, type, documentation, unit, samples."""


class Supervisor(Multiprocess):
    """uvicorn's supervisor of the worker processes, which on SIGHUP replaces every worker; this
    one hands SIGHUP to each worker instead, and each reloads its configuration in place."""

    # A worker is started with SIGHUP blocked, so that one sent before it can take it waits for it
    # (``reloading.hold_sighup`` unblocks it) instead of ending it, which is what it does by default.
    def init_processes(self) -> None:
        with _sighup_blocked():
            super().init_processes()

    def keep_subprocess_alive(self) -> None:
        with _sighup_blocked():
            super().keep_subprocess_alive()

    def handle_ttin(self) -> None:
        with _sighup_blocked():
            super().handle_ttin()

    def handle_hup(self) -> None:
        logger.info("SIGHUP: every worker reloads its configuration")
        # A worker started from now on reads the files as they are: it starts at their number.
        os.environ[GENERATION] = str(first_generation() + 1)
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


@contextlib.contextmanager
def _sighup_blocked() -> Iterator[None]:
    """SIGHUP held back in this thread (and in the processes it starts, which inherit the mask)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def first_generation() -> int:
    """The generation this worker's first configuration has (``GENERATION``; 1 alone)."""
    try:
        return max(int(os.environ.get(GENERATION, "1")), 1)
    except ValueError:
        return 1


def families_of(registry: CollectorRegistry) -> list[Family]:
    """The registry's metric families now, as plain data (``_created`` samples left out: a sum of
    creation times means nothing)."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "documentation": metric.documentation,
            "unit": metric.unit,
            "samples": [
                [s.name, s.labels, s.value] for s in metric.samples if not s.name.endswith("_created")
            ],
        }
        for metric in registry.collect()
    ]


def merge(per_worker: Iterable[list[Family]], gauges: Mapping[str, str]) -> list[Metric]:
    """The families of several workers as one proxy's, the first worker's (the one answering the
    scrape) first. Counters and histograms: summed. Gauges, by ``gauges[name]``: ``sum``
    (the default), ``min``, ``max``, or ``self`` (the answering worker's value alone)."""
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for index, families in enumerate(per_worker):
        for family in families:
            name = family["name"]
            if name not in merged:
                merged[name] = (family, {})
            values = merged[name][1]
            mode = "sum" if family["type"] in _SUMMED else gauges.get(name, "sum")
            if family["type"] in ("info", "stateset"):
                mode = "self"
            for sample, labels, value in family["samples"]:
                key = (sample, tuple(sorted(labels.items())))
                if key not in values:
                    if mode != "self" or index == 0:
                        values[key] = value
                elif mode == "sum":
                    values[key] += value
                elif mode == "min":
                    values[key] = min(values[key], value)
                elif mode == "max":
                    values[key] = max(values[key], value)
    found = []
    for family, values in merged.values():
        metric = Metric(family["name"], family["documentation"], family["type"], family["unit"])
        for (sample, labels), value in values.items():
            metric.add_sample(sample, dict(labels), value)
        found.append(metric)
    return found


class Registry:
    """What ``generate_latest`` reads: families already merged."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


@dataclass(frozen=True)
class Topic:
    """Something every worker keeps for itself and one answer shows for all: ``now()``, this
    worker's as plain data; ``left()``, what it leaves for the others when it stops (None:
    nothing)."""

    now: Callable[[], Any]
    left: Callable[[], Any] | None = None


def metrics_topic(registry: CollectorRegistry) -> Topic:
    """The metrics: a stopped worker leaves its counters and histograms."""
    return Topic(
        lambda: families_of(registry),
        lambda: [f for f in families_of(registry) if f["type"] in _SUMMED],
    )


class Sharing:
    """One worker's side (see the module): its topics on a socket while it runs and in a file
    when it stops, and every worker's of a topic gathered for one answer."""

    def __init__(self, directory: Path, topics: Mapping[str, Topic]) -> None:
        self._directory = directory
        self._topics = topics
        self._pid = os.getpid()
        self._socket = directory / f"{self._pid}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._answer, path=str(self._socket))

    async def aclose(self) -> None:
        """Stops answering, and leaves what its topics leave for the others."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self._socket.unlink()
        kept = {name: topic.left() for name, topic in self._topics.items() if topic.left is not None}
        tmp = self._directory / f".{self._pid}.gone.tmp"
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, self._directory / f"{self._pid}.gone")

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One question (a topic's name on a line), one answer (its JSON; ``null`` for a topic
        this worker does not have), then the connection closes."""
        try:
            asked = await asyncio.wait_for(reader.readline(), ASK_TIMEOUT_S)
            topic = self._topics.get(asked.decode(errors="replace").strip())
            writer.write(json.dumps(topic.now() if topic is not None else None).encode())
            await writer.drain()
        except (ConnectionError, OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    async def gather(self, name: str) -> list[Any]:
        """Every worker's ``name``, this worker's first, then the running workers', then what
        stopped workers left."""
        others = [p for p in self._directory.glob("*.sock") if p != self._socket]
        asked = await asyncio.gather(*(self._ask(p, name) for p in others))
        gone = []
        for path in self._directory.glob("*.gone"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                left = json.loads(path.read_text()).get(name)
                if left is not None:
                    gone.append(left)
        return [self._topics[name].now(), *(a for a in asked if a is not None), *gone]

    async def _ask(self, path: Path, name: str) -> Any:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), ASK_TIMEOUT_S)
        except (OSError, TimeoutError):
            if not _alive(path.stem):
                with contextlib.suppress(OSError):
                    path.unlink()  # a worker killed outright: its figures went with it
                return None
            logger.warning("workers: worker %s does not answer; its %s are left out", path.stem, name)
            return None
        try:
            writer.write(f"{name}\n".encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), ASK_TIMEOUT_S)
            return json.loads(data)
        except (OSError, ValueError, TimeoutError):
            logger.warning("workers: worker %s answered badly; its %s are left out", path.stem, name)
            return None
        finally:
            writer.close()


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def sharing_directory(environ: Mapping[str, str]) -> Path | None:
    """The workers' directory when this process is one of several workers; None otherwise."""
    value = environ.get(WORKERS_DIR)
    return Path(value) if value else None
