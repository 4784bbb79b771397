"""``/docs`` and ``/redoc`` in a real browser (headless Chromium) that can reach nothing but the proxy.

FastAPI's default pages load Swagger UI and ReDoc from a public CDN, and are blank white pages
on an air-gapped machine. Here every host but 127.0.0.1 fails to resolve, so the pages must
come whole from the proxy, wherever the test runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_triton import TritonServer

from .helpers import running_proxy, services_on, settings

#: Debian's package (make tools installs it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[str]:
    with running_proxy(settings(), services_on(triton, "grpc")) as url:
        yield url


def render(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium with no network but loopback."""
    assert CHROMIUM, "chromium is not installed: make tools (or apt-get install chromium)"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}",
         # No network: every name but the proxy's address fails to resolve.
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_swagger_ui_shows_the_endpoints_with_no_network(proxy: str, tmp_path: Path) -> None:
    dom = render(f"{proxy}/docs", tmp_path)
    # Swagger UI's script drew one block per operation: only possible if it loaded.
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert {"/predict", "/predict/label", "/health/ready"} <= paths, dom[:2000]


def test_redoc_shows_the_endpoints_with_no_network(proxy: str, tmp_path: Path) -> None:
    dom = render(f"{proxy}/redoc", tmp_path)
    assert "Iris parallel fan-out proxy" in dom
    assert "/predict/label" in dom and "/health/ready" in dom, dom[:2000]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_load_nothing_from_another_host(proxy: str, page: str) -> None:
    html = httpx.get(f"{proxy}{page}").text
    for url in re.findall(r"""(?:src|href)=["']([^"']+)""", html):
        assert url.startswith("/"), url
        assert httpx.get(f"{proxy}{url}").status_code == 200, url
