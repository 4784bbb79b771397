"""A SIGHUP that reaches a worker while it starts (``reloading.hold_sighup``) neither stops the
process nor is lost; a worker started after SIGHUPs starts at their count (``workers``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from client_proxy.reloading import hold_sighup, sighup_held
from client_proxy.workers import GENERATION, Supervisor, _sighup_blocked, first_generation


@pytest.fixture
def restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


def test_a_sighup_while_starting_is_kept_for_the_app(restored: None) -> None:
    hold_sighup()
    assert not sighup_held()
    os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process
    assert sighup_held()
    assert not sighup_held()  # told once


def test_a_worker_started_after_sighups_starts_at_their_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GENERATION, "1")  # and unset again after the test
    assert first_generation() == 1
    supervisor = Supervisor.__new__(Supervisor)  # its handle_hup alone: no processes to start
    supervisor.processes = []
    supervisor.handle_hup()
    supervisor.handle_hup()
    assert first_generation() == 3
    monkeypatch.setenv(GENERATION, "not a number")
    assert first_generation() == 1


def _worker(go: Any, told: Any) -> None:
    go.wait(10)  # SIGHUP is sent meanwhile, before this process takes it
    hold_sighup()
    told.put(sighup_held())


def test_a_worker_started_by_the_supervisor_keeps_a_sighup_sent_before_it_takes_it() -> None:
    # Before it took SIGHUP, a SIGHUP would have ended the worker: it is started with it blocked.
    context = multiprocessing.get_context("spawn")  # as uvicorn starts its workers
    go, told = context.Event(), context.Queue()
    with _sighup_blocked():
        worker = context.Process(target=_worker, args=(go, told))
        worker.start()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # this process: as it was
    os.kill(worker.pid or 0, signal.SIGHUP)
    go.set()
    assert told.get(timeout=30) is True
    worker.join(30)
    assert worker.exitcode == 0
