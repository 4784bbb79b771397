"""``make bench``'s harness, end to end in smoke mode: it runs, and writes its report and plot.

No figure is asserted: performance is measured by ``make bench``, never by a unit test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

ROWS = [
    "Triton iris_ensemble, direct (HTTP)",
    "direct fan-out, async tritonclient (gRPC)",
    "proxy /predict/label over gRPC",
    "proxy /predict/label over HTTP",
    "proxy /predict/stream over gRPC",
    "proxy /predict/label?route=ensemble over gRPC",
    "seed design (FastAPI services, httpx client per request)",
]


def test_bench_smoke_writes_the_report_and_the_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (tmp_path / "latest.md").read_text()
    for row in ROWS:
        for concurrency in (1, 16):
            assert f"| {row} | {concurrency} |" in report, (row, concurrency)
    assert "## Targets" in report and "machine:" in report
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report in result.stdout  # printed as well as written
