"""The package's shape: the core knows nothing of HTTP, tritonclient or the environment, and no
module does more than one job."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import ROOT

#: Every module of the core, read from the package: a new one is covered without a word here.
CORE = sorted(p.stem for p in (ROOT / "client_proxy" / "core").glob("*.py") if p.stem != "__init__")
TRANSPORTS = ("fastapi", "starlette", "uvicorn", "tritonclient", "grpc", "aiohttp", "httpx")


def test_the_core_imports_no_web_framework_and_no_triton_client() -> None:
    imports = "; ".join(f"import client_proxy.core.{module}" for module in CORE)
    loaded = "{m.split('.')[0] for m in sys.modules}"
    check = f"import sys; {imports}; print(sorted({loaded} & {set(TRANSPORTS)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_root_still_gives_the_app_and_the_settings() -> None:
    import client_proxy

    assert client_proxy.create_app.__module__ == "client_proxy.api.app"
    assert client_proxy.Service.__module__ == "client_proxy.core.services"
    assert set(client_proxy.__all__) >= {"create_app", "Settings", "Service", "TimeoutPolicy"}


def test_the_core_reads_no_environment_variable() -> None:
    """Settings and the files' ``${VAR}`` are handed to the core, never read inside it."""
    for module in CORE:
        text = (ROOT / "client_proxy" / "core" / f"{module}.py").read_text()
        assert "os.environ" not in text and "getenv(" not in text, module


#: A module longer than this does more than one job: split it by job.
MAX_MODULE_LINES = 450


def test_no_module_is_longer_than_one_job() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "client_proxy").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
