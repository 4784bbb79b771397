"""The walk of one request through the proxy's code: which rooms (modules) it stays in, in
order, and how often it climbs back up a layer before going down again.

``record(coroutine)`` runs one request's coroutine with a profiler hook on its own task and
keeps each call into and return out of ``client_proxy``'s modules; ``walk`` turns those events
into stays. The ruler, so that two versions of the code are measured alike:

- a **room** is a module of ``client_proxy``. The modules of values and their small functions
  that every layer uses (``HELPERS``: tensors, outcomes, services, errors) and the observers
  every layer reports to (``OBSERVERS``: metrics, logs, traces) are not rooms: a call to them
  is not a move;
- a **stay** is a run of events in one room; a coroutine suspended at an ``await`` and resumed
  later has not moved (its return-at-suspension and its resumption are dropped);
- the **layers**, top down: the front (``api/fastlane``, ``api/admission``), the doors (the
  rest of ``api/``), the core (``core/``), the Triton side (``triton/``). A **climb** is a move
  up a layer that is later followed by a move down again: the final way back up is not one.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import client_proxy

ROOT = str(Path(client_proxy.__file__).parent) + "/"
HELPERS = {"core/tensors", "core/outcomes", "core/services", "errors"}
OBSERVERS = {"observability", "logs", "tracing"}
FRONT = {"api/fastlane", "api/admission"}


@dataclass(frozen=True)
class Event:
    kind: str  # "call" (a new frame), "resume" (a suspended one going on) or "return"
    frame: int  # id() of the frame (unique while it lives: suspended frames live)
    room: str | None  # the module now running, None when outside client_proxy


@dataclass(frozen=True)
class Walk:
    stays: list[str]
    climbs: int

    @property
    def rooms(self) -> set[str]:
        return set(self.stays)


def room_of(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if not name.startswith(ROOT):
        return None
    module = name[len(ROOT) : -len(".py")]
    return module.removesuffix("/__init__")


def layer(room: str) -> int:
    if room in FRONT:
        return 0
    if room.startswith("api/"):
        return 1
    if room.startswith("core/"):
        return 2
    if room.startswith("triton/"):
        return 3
    return 2  # anything else on the path (e.g. stores) is the core's


def walk(events: list[Event]) -> Walk:
    """The stays and climbs of these events (see the module's docstring)."""
    resumed = {e.frame for e in events if e.kind == "resume"}
    stays: list[str] = []
    for index, event in enumerate(events):
        if event.kind == "resume":
            continue
        if event.kind == "return" and event.frame in resumed and _resumed_after(events, index):
            continue  # suspended at an await, not returned
        room = event.room
        if room is None or room in HELPERS or room in OBSERVERS:
            continue
        if not stays or stays[-1] != room:
            stays.append(room)
    layers = [layer(room) for room in stays]
    moves = list(itertools.pairwise(layers))
    last_descent = max((i for i, (a, b) in enumerate(moves) if b > a), default=-1)
    climbs = sum(1 for i, (a, b) in enumerate(moves) if b < a and i < last_descent)
    return Walk(stays, climbs)


def _resumed_after(events: list[Event], index: int) -> bool:
    frame = events[index].frame
    return any(e.kind == "resume" and e.frame == frame for e in events[index + 1 :])


async def record(request: Coroutine[Any, Any, Any]) -> tuple[Any, list[Event]]:
    """Runs ``request`` in a task of its own and returns its result and its events."""
    events: list[Event] = []
    # Each frame seen is kept alive until the end, so that an id names one frame: a "call" to a
    # frame already seen is a suspended coroutine going on.
    seen: dict[int, FrameType] = {}

    def hook(frame: FrameType, what: str, _: Any) -> None:
        if what not in ("call", "return"):
            return
        try:
            if asyncio.current_task() is not task:
                return
        except RuntimeError:
            return
        if what == "call":
            kind = "resume" if id(frame) in seen else "call"
            seen[id(frame)] = frame
            events.append(Event(kind, id(frame), room_of(frame)))
        else:
            events.append(Event("return", id(frame), room_of(frame.f_back)))

    async def traced() -> Any:
        sys.setprofile(hook)
        try:
            return await request
        finally:
            sys.setprofile(None)

    task = asyncio.create_task(traced())
    return await task, events
