"""The documentation site (``mkdocs.yml``, ``docs/``): built with ``--strict`` (a broken link, a
missing page or anchor fails), its lists generated from the code, the README one screenful that
links into it, and the site rendered with its theme by headless Chromium with no network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from client_proxy.config import Settings, TracingSettings
from client_proxy.observability import ProxyMetrics
from local_triton import free_ports

from .conftest import ROOT

DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Where each section of the README before the site (1,850 lines) went: heading -> page.
MOVED = {
    "Quick start": "getting-started",
    "Try it": "getting-started",
    "Configuration": "configuration",
    "The proxy": "endpoints",
    "Endpoints": "endpoints",
    "Deadlines and partial answers": "endpoints",
    "The ensemble route": "endpoints",
    "Bring your own models: compositions": "compositions",
    "Serial pipelines": "pipelines",
    "Rules and alerts": "rules",
    "Inputs fetched by key": "keys",
    "Models that read their own features": "keys",
    "The Open Inference Protocol (KServe v2): tritonclient and perf_analyzer": "oip",
    "gRPC without grpcio on the hot path": "oip",
    "Services at run time": "replicas",
    "Replicas: balancing, ejection, retry and hedging": "replicas",
    "Overload: shed early": "overload",
    "Request coalescing": "overload",
    "Bad input": "reliability",
    "Reliability": "reliability",
    "Security": "reliability",
    "Hostile and careless clients": "reliability",
    "What it leaves to the deployment": "reliability",
    "Probes and shutdown": "deployment",
    "Deployment": "deployment",
    "`make run`'s supervisor": "deployment",
    "Docker Compose": "deployment",
    "Kubernetes": "deployment",
    "Metrics (`GET /metrics`)": "observability",
    "Logs": "observability",
    "Tracing (OpenTelemetry)": "observability",
    "Performance": "performance",
    "Inputs by key: what each way costs": "performance",
    "Training": "training",
    "The embedded Triton server": "embedded-triton",
    "Installs and lock files": "development",
    "Layout, tests and lint": "development",  # the README's "Development" table
    "Troubleshooting": "troubleshooting",
}
#: The README's "Contents" list is the site's navigation now.


def build(site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = build(site)
    assert result.returncode == 0, result.stderr[-4000:]
    return site


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def _plain(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)).replace("&amp;", "&").replace("&#39;", "'")


def test_the_site_builds_with_strict_checks(site: Path) -> None:
    assert (site / "index.html").exists() and (site / "configuration" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """``--strict`` is what catches it: a copy of the site with one bad link does not build."""
    copy = tmp_path / "project"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "bench" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "results" / "latest.md", copy / "bench" / "results" / "latest.md")
    page = copy / "docs" / "keys.md"
    page.write_text(page.read_text() + "\nSee [nowhere](nowhere.md#at-all).\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nowhere.md" in result.stderr


def test_every_setting_has_a_description() -> None:
    for model in (Settings, TracingSettings):
        lacking = [
            name for name, field in model.model_fields.items() if not (field.description or "").strip()
        ]
        assert lacking == [], f"{model.__name__}: no description for {lacking}"


def test_the_configuration_page_lists_every_setting_from_the_code(site: Path) -> None:
    text = _plain(_page(site, "configuration"))
    for name, field in Settings.model_fields.items():
        assert f"PROXY_{name.upper()}" in text, name
        first_words = " ".join((field.description or "").replace("``", "").split()[:5])
        assert first_words in text, (name, first_words)
    for name in TracingSettings.model_fields:
        assert f"OTEL_{name.upper()}" in text, name


def test_the_metrics_table_lists_every_metric_the_proxy_exposes(site: Path) -> None:
    """The catalogue the table is made from holds every ``proxy_*`` family a scrape shows, and
    the page every entry of it."""
    metrics = ProxyMetrics()
    scraped = set(re.findall(r"^# TYPE (proxy_\w+) ", generate_latest(metrics.registry).decode(), re.M))
    catalogue = {m.name for m in metrics.catalogue()}
    assert scraped and scraped == catalogue
    text = _plain(_page(site, "observability"))
    for metric in metrics.catalogue():
        assert metric.name in text, metric.name


def test_the_performance_page_shows_the_latest_bench_report(site: Path) -> None:
    report = (ROOT / "bench" / "results" / "latest.md").read_text()
    started = re.search(r"^- started: (.+)$", report, re.M)
    assert started, "the report names when it ran"
    text = _plain(_page(site, "performance"))
    assert started[1] in text
    assert (site / "bench" / "latest.png").read_bytes() == (
        ROOT / "bench" / "results" / "latest.png"
    ).read_bytes()


def test_every_section_of_the_old_readme_is_in_the_site() -> None:
    for heading, page in MOVED.items():
        source = (DOCS / f"{page}.md").read_text()
        assert re.search(rf"^#+ {re.escape(heading)}$", source, re.M), (heading, page)


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from pages(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from pages(value)

    listed = set(pages(config["nav"]))
    assert listed == {p.name for p in DOCS.glob("*.md")}


def test_the_readme_is_one_screenful_that_links_into_the_site() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for what in ("make run", "make test", "docker compose up", "make docs"):
        assert what in readme, what
    assert "Triton Inference Server (:8000" in readme  # the picture
    requests = re.findall(r"^```(?:sh|python)\n(.*?)^```", readme, re.S | re.M)
    assert any("/predict/label" in r for r in requests)
    assert any("/compositions/" in r for r in requests)
    assert any("tritonclient" in r for r in requests)
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).exists(), link
    # Nothing dated: the figures live in bench/results/ and the site.
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", readme)


def test_the_readmes_requests_are_the_getting_started_pages() -> None:
    """The README's three requests are the getting-started page's, which a test runs."""
    readme = (ROOT / "README.md").read_text()
    page = (DOCS / "getting-started.md").read_text()
    for block in re.findall(r"^```(?:sh|python)\n(.*?)^```", readme, re.S | re.M):
        for line in block.splitlines():
            if line.startswith(("curl", "#", "client", "result", "print", "tensor")):
                assert line in page, line


# -- the site in a browser ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the site's server exited"
            try:
                if httpx.get(f"{url}/index.html", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the site's server did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def screenshot(url: str, picture: Path, profile: Path) -> None:
    """The page as headless Chromium draws it, with no network but loopback (no CDN, no fonts)."""
    assert CHROMIUM, "chromium is not installed: make tools (or apt-get install chromium)"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--window-size=1280,900", "--hide-scrollbars", f"--screenshot={picture}", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and picture.exists(), result.stderr[-2000:]


@pytest.mark.parametrize("page", ["", "configuration/"])
def test_the_site_renders_with_its_theme_offline(served: str, page: str, tmp_path: Path) -> None:
    """The header bar in the theme's colour and the navigation drawn: the stylesheet came from
    the build (an unstyled page is white at the top, and black text on white down the left)."""
    from PIL import Image

    picture = tmp_path / "page.png"
    screenshot(f"{served}/{page}", picture, tmp_path / "profile")
    with Image.open(picture) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1280, 900)
        header = rgb.getpixel((640, 10))
        body = rgb.getpixel((640, 600))
    assert header != body
    red, green, blue = header  # type: ignore[misc]
    assert blue > 150 and red < 100 and green < 120, header  # Material's indigo, (63, 81, 181)


def test_no_page_loads_anything_from_elsewhere(site: Path) -> None:
    """Stylesheets, scripts and fonts all come from the build (the site is read offline)."""
    for page in site.rglob("*.html"):
        html = page.read_text()
        outside = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"', html)
        assert outside == [], (page.relative_to(site), outside)
