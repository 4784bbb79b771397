"""Process trees, read from ``/proc`` (Linux), and ending one whole. Standard library only: the
Ray Serve driver (``bench/peers/ray_serve.py``, in Ray's own venv) uses it too."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Triton's python backend stubs, uvicorn workers, Ray's
    cluster)."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue += _children(current)
    return tree


def session_members(session: int) -> list[int]:
    """Every process of the session ``session`` (a process that leaves its parent's tree, as
    some of Ray's do, stays in its session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def end_leftovers(pids: Iterable[int], grace: float) -> None:
    """Waits up to ``grace`` seconds for ``pids`` to end on their own, then kills those still
    running and waits (up to 10 s) until they are gone: a killed process is gone a moment later,
    not at once."""
    deadline = time.monotonic() + grace
    while (left := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
