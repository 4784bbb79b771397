"""The suite's own guard: a Triton that dies during a test fails that test (and is started again
for the tests after it). Run as an inner pytest session on the real embedded Triton."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT

pytest_plugins = ["pytester"]

INNER = """
import os
import signal
import time


def test_that_kills_its_triton(triton):
    os.kill(triton.pid, signal.SIGKILL)
    while triton.is_running():
        time.sleep(0.05)


def test_after_it(triton):
    assert triton.is_running()
"""


def test_a_triton_that_dies_during_a_test_fails_that_test_and_is_restarted(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    pytester.makeconftest("from tests.conftest import _session_tritons_stay_alive, triton  # noqa: F401\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_that_kills_its_triton*", "*died during this test*"]
    )
