"""perf_analyzer (the 2.50.0 wheel's, unmodified; ``make perf-analyzer``) measures the proxy's
``iris_fanout`` over HTTP and gRPC as it measures Triton's ``iris_ensemble``: it reads each
model's metadata and configuration, then sends inferences, and reports no error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import perf_analyzer
from local_triton import TritonServer, free_ports

from .helpers import running_proxy, services_on, settings


@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[tuple[str, str]]:
    (grpc_port,) = free_ports(1)
    with running_proxy(settings(grpc_port=grpc_port), services_on(triton, "grpc")) as url:
        yield url.removeprefix("http://"), f"127.0.0.1:{grpc_port}"


def test_perf_analyzer_is_installed() -> None:
    assert perf_analyzer.binary() is not None, "make perf-analyzer (make test runs it) unpacks it"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_the_fan_out_as_it_measures_the_ensemble(
    proxy: tuple[str, str], triton: TritonServer, protocol: str
) -> None:
    http, grpc = proxy
    # A loose stability criterion (100%): this checks that it works, on a machine busy with
    # other tests; perf_analyzer's default (10%) can take more windows than a test should wait.
    ours = perf_analyzer.run(http if protocol == "http" else grpc, "iris_fanout", protocol, 4, 1000, 100)
    direct = triton.http_url if protocol == "http" else triton.grpc_url
    theirs = perf_analyzer.run(direct, "iris_ensemble", protocol, 4, 1000, 100)
    # No figure is asserted (that is make bench's job): both ran, measured and reported.
    assert ours.throughput > 0 and theirs.throughput > 0
    assert "Throughput" in ours.output and "error" not in ours.output.lower()
