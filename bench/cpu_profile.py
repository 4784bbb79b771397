"""``make bench``'s profile section: where the proxy's CPU goes under load, from py-spy (a
sampling profiler that reads the process from outside: nothing in the proxy changes).

Each profile samples the proxy for a few seconds while a load generator keeps 16 requests in
flight, and reports the functions most often on the stack (inclusive, line numbers merged) and
most often at its top (self). py-spy needs to read the other process's memory (ptrace): where
it may not (a container without ``CAP_SYS_PTRACE``, ``kernel.yama.ptrace_scope`` = 2 or 3),
the section says so instead.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 250
TOP = 12
_LINE = re.compile(r":\d+\)$")
#: Frames every sample of the main thread or a helper thread has (the process's entry, the
#: event loop's run call): on the stack 100% of the time, so they say nothing.
_ENTRY = re.compile(
    r"<frozen runpy>|client_proxy/__main__\.py|uvicorn/(main|server|_compat)\.py"
    r"|\(asyncio/runners\.py\)|\(threading\.py\)"
)


@dataclass(frozen=True)
class Profile:
    samples: int
    inclusive: list[tuple[str, float]]  # function, share of samples on the stack
    self: list[tuple[str, float]]  # function, share of samples at the top


def binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, load: Callable[[], object]) -> Profile:
    """Samples ``pid`` for ``seconds`` while ``load()`` runs (it must last at least as long)."""
    executable = binary()
    if executable is None:
        raise FileNotFoundError("py-spy is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        command = [
            executable, "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1)),
            "--rate", str(RATE_HZ), "--format", "raw", "--nonblocking", "--output", str(raw),
        ]  # fmt: skip
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            load()
        finally:
            _, said = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy: exit {spy.returncode}: {said.strip()[-300:]}")
        return parse(raw.read_text())


def parse(text: str) -> Profile:
    """py-spy's raw format: one line per distinct stack, ``frame;frame;... count``, root first."""
    inclusive: collections.Counter[str] = collections.Counter()
    top: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        top[frames[-1]] += n
        for frame in set(frames):
            if not _ENTRY.search(frame):
                inclusive[frame] += n
    share = (lambda c: c / total) if total else (lambda c: 0.0)
    return Profile(
        total,
        [(f, share(c)) for f, c in inclusive.most_common(TOP)],
        [(f, share(c)) for f, c in top.most_common(TOP)],
    )


def render(title: str, profile: Profile) -> list[str]:
    lines = [
        f"#### {title} ({profile.samples:,} samples)",
        "",
        "| on the stack | | at the top | |",
        "| --- | ---: | --- | ---: |",
    ]
    for (inc, inc_share), (own, own_share) in zip(profile.inclusive, profile.self, strict=False):
        lines.append(f"| `{inc}` | {inc_share:.0%} | `{own}` | {own_share:.0%} |")
    return [*lines, ""]
