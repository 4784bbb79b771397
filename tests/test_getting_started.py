"""Every curl and Python example of the getting-started page, run as written against the real
stack ``make run`` starts (``python -m local_triton.stack``: the embedded Triton with every
model, the proxy, the example compositions and the feature store), only its ports moved to free
ones, and answered as the page shows.

The page's answers are the comment lines under each command (or the comment at its end). How
one is compared with the real answer:

- JSON (one document, or one per line for a stream): the same keys and values, numbers within a
  relative 1e-4 (another CPU's onnxruntime may round the last digits otherwise), a stream's
  lines in any order but the last, ``latency_ms`` any number;
- JSON with ``...`` (the page leaves part out): each shown piece appears in the answer, numbers
  within the same bounds;
- Prometheus lines: the same series, any value (they count what ran before);
- a comment in words (``# each service's readiness``): the command answers JSON.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT
from .helpers import Stack

PAGE = ROOT / "docs" / "getting-started.md"
NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


@dataclass
class Example:
    language: str  # "sh" or "python"
    code: str
    expected: str  # the answer the page shows ("" when it shows none)
    line: int


def examples(page: str) -> list[Example]:
    """The page's curl commands (with their answers) and Python blocks (with the answer of their
    last line's ``print``)."""
    found: list[Example] = []
    blocks = re.finditer(r"^```(sh|python)\n(.*?)^```", page, re.S | re.M)
    for block in blocks:
        language, body = block.group(1), block.group(2)
        start = page[: block.start()].count("\n") + 2
        lines = body.splitlines()
        if language == "python":
            expected = lines[-1].split("  # ", 1)[1] if "  # " in lines[-1] else ""
            found.append(Example("python", body, expected, start))
            continue
        i = 0
        while i < len(lines):
            if not lines[i].startswith("curl "):
                i += 1
                continue
            first = i
            command = [lines[i]]
            while command[-1].endswith("\\") or sum(c.split("  # ")[0].count("'") for c in command) % 2:
                i += 1
                command.append(lines[i])
            text = "\n".join(command)
            inline = ""
            if "  # " in command[-1]:
                text, inline = text.rsplit("  # ", 1)
            answer = [inline] if inline else []
            i += 1
            while i < len(lines) and lines[i].startswith("#"):
                answer.append(lines[i][1:].strip())
                i += 1
            found.append(Example("sh", text, "\n".join(answer), start + first))
    return found


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def _same(shown: Any, real: Any, where: str = "") -> None:
    if isinstance(shown, dict):
        assert isinstance(real, dict) and set(shown) == set(real), (where, shown, real)
        for key in shown:
            if key != "latency_ms":
                _same(shown[key], real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list) and len(shown) == len(real), (where, shown, real)
        for n, (a, b) in enumerate(zip(shown, real, strict=True)):
            _same(a, b, f"{where}[{n}]")
    elif isinstance(shown, float | int) and not isinstance(shown, bool):
        assert isinstance(real, float | int) and _close(shown, real), (where, shown, real)
    else:
        assert shown == real, (where, shown, real)


def _pieces_appear(shown: str, real: str) -> None:
    """Each piece between ``...`` appears in ``real``, its numbers within bounds."""
    compact = "".join(real.split())
    for piece in shown.split("..."):
        piece = "".join(piece.split())
        if not piece:
            continue
        pattern = "".join(
            f"({NUMBER})" if part and re.fullmatch(NUMBER, part) else re.escape(part)
            for part in re.split(f"({NUMBER})", piece)
        )
        match = re.search(pattern, compact)
        assert match, f"{piece!r} is not in the answer {real[:2000]!r}"
        numbers = [float(n) for n in re.findall(f"(?<![\\w.]){NUMBER}", piece)]
        got = [float(g) for g in match.groups()]
        if len(numbers) == len(got):
            assert all(_close(a, b) for a, b in zip(numbers, got, strict=True)), (piece, match.group(0))


def check(example: Example, output: str) -> None:
    shown = re.sub(r"\s{2,}\([^)]*\)$", "", example.expected.strip(), flags=re.M)  # a remark after it
    if not shown:
        return
    if example.language == "python":  # what it prints: numpy's arrays
        _pieces_appear(shown, output)
        return
    if shown[0] not in '{[".' and not re.match(r"\w+\{", shown):
        json.loads(output)  # a comment in words: the answer is JSON
        return
    if re.match(r"\w+\{", shown):  # Prometheus series: the same ones, any value
        for series in shown.splitlines():
            name = series.rsplit(" ", 1)[0]
            assert name in output, f"{name} is not in {output[:2000]!r}"
        return
    if "..." in shown:
        _pieces_appear(shown, output)
        return
    try:
        document = json.loads(shown)
    except json.JSONDecodeError:
        lines = [json.loads(line) for line in shown.splitlines()]
        real = [json.loads(line) for line in output.splitlines() if line.strip()]
        assert len(real) == len(lines), (lines, real)
        _same(lines[-1], real[-1], "last line")
        key = lambda d: json.dumps({k: v for k, v in d.items() if k not in ("latency_ms", "prediction")})  # noqa: E731
        for line in lines[:-1]:
            partner = next(r for r in real[:-1] if key(r) == key(line))
            _same(line, partner, line.get("service", ""))
        return
    _same(document, json.loads(output))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("getting_started"), whole=True)
    try:
        stack.wait_serving(timeout=180)
        yield stack
    finally:
        assert stack.stop() == 0, stack.err.read_text()[-3000:]
        stack.assert_nothing_left()


def _moved(code: str, stack: Stack) -> str:
    """The example pointed at the stack's ports instead of make run's."""
    proxy, http, grpc, metrics, proxy_grpc = stack.ports
    ports = {"9000": proxy, "9001": proxy_grpc, "8000": http, "8001": grpc, "8002": metrics}
    return re.sub(r"localhost:(\d+)", lambda m: f"127.0.0.1:{ports.get(m[1], m[1])}", code)


def test_the_page_has_the_examples_it_promises() -> None:
    """The parser finds the page's requests (so that the next test cannot pass on an empty list)."""
    found = examples(PAGE.read_text())
    commands = " ".join(e.code for e in found)
    for route in ("/predict", "/predict/label", "/predict/stream", "/compositions/wine/label", "/v2/models/"):
        assert route in commands, route
    assert any(e.language == "python" and "tritonclient" in e.code for e in found)
    assert sum(1 for e in found if e.expected) >= 8


def test_every_example_answers_as_the_page_shows(stack: Stack, tmp_path: Path) -> None:
    for example in examples(PAGE.read_text()):
        code = _moved(example.code, stack)
        if example.language == "python":
            script = tmp_path / "example.py"
            script.write_text(code)
            run = [sys.executable, str(script)]
        else:
            run = ["bash", "-c", code]
        result = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, (example.line, code, result.stderr[-2000:])
        try:
            check(example, result.stdout)
        except AssertionError as exc:
            raise AssertionError(f"getting-started.md line {example.line}: {code}\n{exc}") from None
