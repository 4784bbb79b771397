"""Shadows: an experiment's candidate answering a copy of a request another variant answered, off
that request's path, and the two answers compared row by row (``experiments.py``).

The client's answer is sent before any shadow starts; a shadow never holds it, its deadline, or
its place in a coalesced batch:

- the copy goes to its shadow's queue, run by at most ``concurrency`` at once for that shadow;
  past ``queue`` copies waiting for it, a new one is dropped and counted
  (``proxy_shadow_requests_total{outcome="dropped"}``): a slow shadow takes no other's turn;
- a shadow has its own deadline (the experiment's ``shadow_deadline_ms``, else its request's
  budget), counted from when it starts, and its own timeout policy (the client's, else its
  model's, else the one the request was answered with);
- its Triton calls are coalesced with other shadows' only, never with the requests' (a
  dataplane of its own, with a coalescer of its own, whose rules raise no alerts);
- whatever it raises is its own failure, counted (``failed``), never the client's.

Each compared row is counted (``agree``, ``disagree``, or ``failed`` when the shadow gave no
answer), each class's score difference observed, and each disagreeing row kept in the
experiment's sample (the newest ``sample`` of them): ``GET /experiments/<name>``; with a
``webhook``, posted there too, as the rules' alerts are (queued, retried, signed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from client_proxy.core.experiments import Experiment, Variant, Verdict, compare, verdict_of
from client_proxy.core.services import time_left
from client_proxy.core.tensors import Inputs
from client_proxy.errors import ProxyError

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest

logger = logging.getLogger("client_proxy.shadows")


class ShadowObserver(Protocol):
    """Where the shadows' figures go (``observability.ProxyMetrics``)."""

    def variant_latency(self, experiment: str, variant: str, role: str, seconds: float) -> None:
        """A variant's run: ``answered`` (the client's answer) or ``shadow``."""

    def shadow_request(self, experiment: str, shadow: str, outcome: str) -> None:
        """A copy ``answered``, ``failed`` or ``dropped``."""

    def rows_compared(self, experiment: str, variant: str, shadow: str, outcome: str, rows: int) -> None:
        """Rows compared: ``agree``, ``disagree``, or ``failed``."""

    def score_deltas(self, experiment: str, variant: str, shadow: str, deltas: Mapping[str, Any]) -> None:
        """Per class, the rows' ``|shadow - answered|``."""


@dataclass(slots=True)
class ShadowJob:
    experiment: Experiment
    answered: Variant
    shadow: Variant
    x: Inputs
    answer: InferenceAnswer
    """The answered variant's (not changed once the dataplane gave it back)."""
    request: InferenceRequest


@dataclass
class _Lane:
    """One shadow's copies: those running and those waiting."""

    running: set[asyncio.Task[None]] = field(default_factory=set)
    waiting: deque[ShadowJob] = field(default_factory=deque)


class Shadows:
    """Runs the shadows (see the module) and keeps each experiment's disagreeing rows."""

    def __init__(
        self,
        plane: DataPlane,
        observer: ShadowObserver,
        concurrency: int,
        queue: int,
        post: Callable[[str, str, dict[str, Any]], object] | None = None,
    ) -> None:
        """``plane``: the shadows' own (see the module); ``concurrency`` and ``queue``: each
        shadow's (a slow one takes none of another's); ``post(url, source, payload)``: where an
        experiment's ``webhook`` gets its disagreeing rows (``client_proxy.alerts``)."""
        self._post = post
        self._plane = plane
        self._observer = observer
        self._concurrency = max(concurrency, 1)
        self._queue = queue
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._samples: dict[str, deque[dict[str, Any]]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        """Per experiment, rows compared by outcome (and copies ``dropped``), since the start."""

    # -- taking copies -----------------------------------------------------------------------
    def offer(self, job: ShadowJob) -> None:
        """Runs ``job`` soon, or drops it (counted) when too many of its shadow's wait already."""
        key = (job.experiment.name, job.shadow.name)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if len(lane.running) < self._concurrency:
            self._start(lane, job)
        elif len(lane.waiting) < self._queue:
            lane.waiting.append(job)
        else:
            self._observer.shadow_request(job.experiment.name, job.shadow.name, "dropped")
            self._count(job.experiment.name, "dropped", 1)

    def _start(self, lane: _Lane, job: ShadowJob) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job))
        lane.running.add(task)
        task.add_done_callback(lambda done: self._finished(lane, done))

    def _finished(self, lane: _Lane, task: asyncio.Task[None]) -> None:
        lane.running.discard(task)
        if lane.waiting and not task.cancelled():
            self._start(lane, lane.waiting.popleft())

    @property
    def busy(self) -> int:
        """Copies running and waiting."""
        return sum(len(lane.running) + len(lane.waiting) for lane in self._lanes.values())

    async def aclose(self) -> None:
        """Every shadow stopped (at shutdown: the clients they use are about to close)."""
        tasks: list[asyncio.Task[None]] = []
        for lane in self._lanes.values():
            lane.waiting.clear()
            tasks.extend(lane.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one shadow --------------------------------------------------------------------------
    async def _run(self, job: ShadowJob) -> None:
        experiment, shadow, answered = job.experiment, job.shadow, job.answered
        try:
            ours = verdict_of(job.answer)
        except ValueError:  # pragma: no cover - an answered variant always has one
            return
        theirs = await self._answer(job)
        name = experiment.name
        self._observer.shadow_request(name, shadow.name, "answered" if theirs is not None else "failed")
        rows = len(ours.labels)
        if theirs is None:
            self._observer.rows_compared(name, answered.name, shadow.name, "failed", rows)
            self._count(name, "failed", rows)
            return
        try:
            comparison = compare(ours, theirs)
        except ValueError as exc:
            logger.warning("experiment %s: shadow %s: %s", name, shadow.name, exc)
            self._observer.rows_compared(name, answered.name, shadow.name, "failed", rows)
            self._count(name, "failed", rows)
            return
        disagreeing = comparison.disagreeing
        self._observer.rows_compared(name, answered.name, shadow.name, "agree", rows - len(disagreeing))
        self._observer.rows_compared(name, answered.name, shadow.name, "disagree", len(disagreeing))
        self._observer.score_deltas(name, answered.name, shadow.name, comparison.deltas)
        self._count(name, "agree", rows - len(disagreeing))
        self._count(name, "disagree", len(disagreeing))
        if disagreeing and (experiment.sample > 0 or experiment.webhook is not None):
            found = self._rows(job, ours, theirs, disagreeing)
            if experiment.sample > 0:
                self._keep(experiment, found)
            if experiment.webhook is not None and self._post is not None:
                payload = {"type": "disagreement", "experiment": name, "request_id": job.request.request_id,
                           "time": found[0]["at"], "rows": found}  # fmt: skip
                self._post(experiment.webhook, f"experiment/{name}", payload)

    async def _answer(self, job: ShadowJob) -> Verdict | None:
        """The shadow's answer to the copy, or None when it gave none (logged at DEBUG)."""
        from client_proxy.core.dataplane import InferenceAnswer

        plane, shadow, request = self._plane, job.shadow, job.request
        model = shadow.model
        started = time.monotonic()
        budget_ms = job.experiment.shadow_deadline_ms
        deadline = started + (
            budget_ms / 1000 if budget_ms is not None else request.deadline - request.started
        )
        if model.deadline_ms is not None:
            deadline = min(deadline, started + model.deadline_ms / 1000)
        policy = request.policy or model.timeout_policy or job.answer.policy
        answer = InferenceAnswer(model, policy, job.answer.rows, job.answer.one_row)
        try:
            if model.kind == "service":
                answer.served = await plane.models.describe(request.model, time_left(deadline), model)
            services = model.inputs_go_to()
            if not plane.gateway.fits(services, job.x):
                await plane.gateway.ensure_fit(services, job.x, time_left(deadline))
            await model.run(plane, answer, job.x, request, deadline)
            verdict = verdict_of(answer)
        except (ProxyError, ValueError) as exc:
            logger.debug("experiment %s: shadow %s failed: %s", job.experiment.name, shadow.name, exc)
            return None
        finally:
            self._observer.variant_latency(
                job.experiment.name, shadow.name, "shadow", time.monotonic() - started
            )
        return verdict

    # -- what an operator reads --------------------------------------------------------------
    def _count(self, experiment: str, outcome: str, rows: int) -> None:
        counts = self.counts.setdefault(experiment, {"agree": 0, "disagree": 0, "failed": 0, "dropped": 0})
        counts[outcome] += rows

    def _rows(
        self, job: ShadowJob, ours: Verdict, theirs: Verdict, disagreeing: list[int]
    ) -> list[dict[str, Any]]:
        """The disagreeing rows as an operator reads them: request id, row, both answers."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fetched = job.answer.fetched
        return [
            {
                "at": at,
                "request_id": job.request.request_id,
                "row": i,
                **({"key": fetched.keys[i]} if fetched is not None else {}),
                "answered": {"variant": job.answered.name, **ours.row(i)},
                "shadow": {"variant": job.shadow.name, **theirs.row(i)},
            }
            for i in disagreeing
        ]

    def _keep(self, experiment: Experiment, rows: list[dict[str, Any]]) -> None:
        sample = self._samples.get(experiment.name)
        if sample is None or sample.maxlen != experiment.sample:  # new, or resized by a reload
            sample = self._samples[experiment.name] = deque(sample or (), maxlen=experiment.sample)
        sample.extend(rows)

    def sample(self, experiment: str) -> list[dict[str, Any]]:
        """The experiment's disagreeing rows kept, the oldest first."""
        return list(self._samples.get(experiment, ()))

    def now(self) -> dict[str, Any]:
        """Every experiment's counts and rows kept, as plain data (what one worker shows the
        others: ``merged``)."""
        return {"counts": self.counts, "samples": {name: list(rows) for name, rows in self._samples.items()}}


def merged(snapshots: list[dict[str, Any]], experiment: str, keep: int) -> tuple[dict[str, int], list[Any]]:
    """One experiment's counts and disagreeing rows over several workers' ``Shadows.now()``:
    the counts added up, the newest ``keep`` rows (the oldest first)."""
    counts: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for snapshot in snapshots:
        for outcome, n in snapshot.get("counts", {}).get(experiment, {}).items():
            counts[outcome] = counts.get(outcome, 0) + n
        rows += snapshot.get("samples", {}).get(experiment, [])
    rows.sort(key=lambda row: row["at"])  # stable: a worker's own order within a second
    return counts, rows[-keep:] if keep > 0 else []
