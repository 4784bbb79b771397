"""Configuration files in YAML whose every value knows its line, so an error can name it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Node:
    value: Any
    line: int


def _plain(node: yaml.Node) -> Node:
    """A YAML node as Python values, every mapping and sequence item wrapped with its line."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        return Node({str(k.value): _plain(v) for k, v in node.value}, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_plain(item) for item in node.value], line)
    return Node(yaml.safe_load(yaml.serialize(node)), line)


def read(path: Path, what: str, error: type[ValueError]) -> Node:
    """The document in ``path``; ``error`` naming the file (and line) when it cannot be read."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"{where}: cannot read the {what} ({exc.strerror})") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise error(f"{where}: {line}not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if root is None:
        raise error(f"{where}: the file is empty")
    return _plain(root)
