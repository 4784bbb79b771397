"""MkDocs hooks: the lists the code holds, written into the pages from the code at build time,
so that the documentation cannot drift from it (one source for each fact).

A page asks for a list with a marker on a line of its own:

- ``<!-- generated: settings -->``: every ``PROXY_*`` setting (``config.Settings``: its type,
  default and field description);
- ``<!-- generated: tracing-settings -->``: the ``OTEL_*`` variables the proxy reads
  (``config.TracingSettings``);
- ``<!-- generated: metrics -->``: every metric the proxy registers (``ProxyMetrics.catalogue``);
- ``<!-- generated: bench -->``: the latest ``make bench`` report, ``bench/results/latest.md``.

The report's picture, ``bench/results/latest.png``, is added to the site as ``bench/latest.png``.
"""

from __future__ import annotations

import enum
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `mkdocs build` from anywhere: the project's own package
    sys.path.insert(0, str(ROOT))

from mkdocs.structure.files import File, Files  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from client_proxy.config import Settings, TracingSettings  # noqa: E402
from client_proxy.observability import ProxyMetrics  # noqa: E402

BENCH = ROOT / "bench" / "results"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _text(description: str | None) -> str:
    """A field description as one Markdown table cell (reST's ``code`` as Markdown's)."""
    text = " ".join((description or "").split()).replace("``", "`")
    # A pipe splits a table cell, except inside a code span (Python-Markdown's tables).
    parts = text.split("`")
    return "`".join(part if n % 2 else part.replace("|", "\\|") for n, part in enumerate(parts))


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(kinds)
    if typing.get_origin(annotation) is list:
        return "JSON list"
    if annotation is Path:
        return "path"
    return {bool: "`true` or `false`", int: "integer", float: "number", str: "text"}.get(
        annotation, str(annotation)
    )


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, list):
        return f"`{value!r}`".replace("'", '"')
    return f"`{value}`"


def settings_table() -> str:
    rows = [
        f"| `PROXY_{name.upper()}` | {_type(f.annotation)} | {_default(f)} | {_text(f.description)} |"
        for name, f in Settings.model_fields.items()
    ]
    return "\n".join(["| variable | value | default | what it does |", "| --- | --- | --- | --- |", *rows])


def tracing_table() -> str:
    rows = [
        f"| `OTEL_{name.upper()}` | {_text(field.description)} |"
        for name, field in TracingSettings.model_fields.items()
    ]
    return "\n".join(["| variable | what it does |", "| --- | --- |", *rows])


def metrics_table() -> str:
    rows = []
    for m in ProxyMetrics().catalogue():
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {_text(m.help)} | {m.across_workers} |")
    header = "| metric | type | labels | what it counts | across workers |"
    return "\n".join([header, "| --- | --- | --- | --- | --- |", *rows])


def bench_report() -> str:
    """The latest report, its title dropped and its headings one level down (under the page's)."""
    report = (BENCH / "latest.md").read_text()
    lines = report.split("\n")
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    fence = False
    out = []
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            line = "#" + line
        out.append(line)
    return "\n".join(out).strip()


GENERATORS = {
    "settings": settings_table,
    "tracing-settings": tracing_table,
    "metrics": metrics_table,
    "bench": bench_report,
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(
                f"{page.file.src_uri}: no generated list {name!r} (known: {', '.join(GENERATORS)})"
            )
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


def on_files(files: Files, config: Any) -> Files:
    picture = BENCH / "latest.png"
    if picture.exists():
        files.append(File.generated(config, "bench/latest.png", abs_src_path=str(picture)))
    return files
