"""The ``experiments`` section of the compositions file (``experiments.py`` says what one is):
read and checked as far as it can be alone (``read_experiments``), then bound to the models the
whole configuration declares (``bind_experiments``), each mistake one line naming the file's line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client_proxy.core.experiments import DEFAULT_SAMPLE, MAX_SAMPLE, Experiment, Variant
from client_proxy.core.rules import read_webhook
from client_proxy.core.services import Service, valid_name
from client_proxy.core.yamlfile import Node

if TYPE_CHECKING:
    from client_proxy.core.served import Model

_KEYS = {"description", "primary", "candidates", "allow_pin", "sample", "shadow_deadline_ms", "webhook"}
_CANDIDATE_KEYS = {"target", "split", "shadow"}


@dataclass(frozen=True)
class CandidateSpec:
    name: str
    line: int
    target: Service | None
    split: float
    shadow: float
    split_line: int


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment as the file declares it, its models named (bound: ``bind_experiments``)."""

    name: str
    line: int
    description: str
    primary: str
    primary_line: int
    candidates: tuple[CandidateSpec, ...]
    allow_pin: bool
    sample: int
    shadow_deadline_ms: float | None
    webhook: str | None


def read_experiments(
    node: Node | None,
    fail: Callable[[Node, str], ValueError],
    make_service: Callable[[str, Node], Service],
    expand: Callable[[str], str | None],
) -> dict[str, ExperimentSpec]:
    """The file's ``experiments`` mapping, checked as far as it can be without the models;
    ``make_service(name, target node)``: a candidate's own Triton model; ``expand``: a webhook's
    ``${VAR}``."""
    if node is None:
        return {}
    if not isinstance(node.value, dict):
        raise fail(node, "experiments must be a mapping of experiment names")
    found = {}
    for name, entry in node.value.items():
        found[name] = _experiment(name, entry, fail, make_service, expand)
    return found


def _percent(node: Node, what: str, fail: Callable[[Node, str], ValueError]) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise fail(node, f"{what} must be a percentage from 0 to 100")
    return float(value)


def _experiment(
    name: str,
    node: Node,
    fail: Callable[[Node, str], ValueError],
    make_service: Callable[[str, Node], Service],
    expand: Callable[[str], str | None],
) -> ExperimentSpec:
    owner = f"experiment {name!r}"
    if not valid_name(name):
        raise fail(node, f"experiment name {name!r} must be lower-case letters, digits and '_'")
    if not isinstance(node.value, dict):
        raise fail(node, f"{owner} must be a mapping with 'candidates'")
    fields = node.value
    unknown = set(fields) - _KEYS
    if unknown:
        raise fail(node, f"{owner}: unknown key(s) {sorted(unknown)}")
    primary = fields.get("primary", Node(name, node.line))
    if not isinstance(primary.value, str) or not primary.value:
        raise fail(primary, f"{owner}: primary must name a composition, pipeline or service")
    listed = fields.get("candidates", Node(None, node.line))
    if not isinstance(listed.value, dict) or not listed.value:
        raise fail(listed, f"{owner} needs 'candidates': a mapping of variant names")
    candidates = []
    for candidate, entry in listed.value.items():
        where = f"{owner}, candidate {candidate!r}"
        values = entry.value if entry.value is not None else {}
        if not isinstance(values, dict):
            raise fail(entry, f"{where}: expected a mapping (or nothing)")
        unknown = set(values) - _CANDIDATE_KEYS
        if unknown:
            raise fail(entry, f"{where}: unknown key(s) {sorted(unknown)}")
        if candidate == primary.value:
            raise fail(entry, f"{where}: the primary cannot be a candidate too")
        target = make_service(candidate, values["target"]) if "target" in values else None
        split_node = values.get("split", Node(0, entry.line))
        split = _percent(split_node, f"{where}: split", fail)
        shadow = _percent(values.get("shadow", Node(0, entry.line)), f"{where}: shadow", fail)
        candidates.append(CandidateSpec(candidate, entry.line, target, split, shadow, split_node.line))
    if sum(c.split for c in candidates) > 100:
        raise fail(listed, f"{owner}: the candidates' splits add up to more than 100")
    allow_pin = fields.get("allow_pin", Node(False, node.line))
    if not isinstance(allow_pin.value, bool):
        raise fail(allow_pin, f"{owner}: allow_pin must be true or false")
    sample = fields.get("sample", Node(DEFAULT_SAMPLE, node.line))
    if (
        isinstance(sample.value, bool)
        or not isinstance(sample.value, int)
        or not 0 <= sample.value <= MAX_SAMPLE
    ):
        raise fail(sample, f"{owner}: sample must be a whole number from 0 to {MAX_SAMPLE}")
    deadline = fields.get("shadow_deadline_ms")
    if deadline is not None and (
        isinstance(deadline.value, bool)
        or not isinstance(deadline.value, int | float)
        or not 50 <= deadline.value <= 600_000
    ):
        raise fail(deadline, f"{owner}: shadow_deadline_ms must be a number from 50 to 600000")
    description = fields.get("description", Node("", node.line)).value
    return ExperimentSpec(
        name,
        node.line,
        str(description or ""),
        primary.value,
        primary.line,
        tuple(candidates),
        allow_pin.value,
        sample.value,
        float(deadline.value) if deadline is not None else None,
        read_webhook(fields.get("webhook"), owner, fail, expand),
    )


def bind_experiments(
    specs: Mapping[str, ExperimentSpec],
    find: Callable[[str], Model | None],
    fail: Callable[[int, str], ValueError],
) -> dict[str, Experiment]:
    """The experiments, their variants the models ``find`` knows (None: none of that name);
    ``fail(line, message)`` for one that cannot be."""
    found = {}
    for name, spec in specs.items():
        owner = f"experiment {name!r}"
        primary = find(spec.primary)
        if primary is None:
            raise fail(
                spec.primary_line, f"{owner}: primary {spec.primary!r} is no composition, pipeline or service"
            )
        same_name = find(name)
        if same_name is not None and name != spec.primary and name not in {c.name for c in spec.candidates}:
            raise fail(
                spec.line, f"{owner} would hide the {same_name.kind} {name!r}, which is none of its variants"
            )
        variants = [Variant(spec.primary, primary, 100 - sum(c.split for c in spec.candidates))]
        for candidate in spec.candidates:
            where = f"{owner}, candidate {candidate.name!r}"
            model = candidate.target if candidate.target is not None else find(candidate.name)
            if model is None:
                raise fail(
                    candidate.line,
                    f"{where}: no composition, pipeline or service of that name (or give it a 'target')",
                )
            if candidate.split > 0 and model.kind != primary.kind:
                raise fail(
                    candidate.split_line,
                    f"{where}: a variant that answers must be a {primary.kind} like {spec.primary!r}, "
                    f"not a {model.kind} (as a shadow it may be)",
                )
            if model.keys != primary.keys:
                raise fail(
                    candidate.line, f"{where}: keys: {model.keys}, where {spec.primary!r} has {primary.keys}"
                )
            variants.append(Variant(candidate.name, model, candidate.split, candidate.shadow))
        for variant in variants:
            if getattr(variant.model, "aggregator", None) == "none":
                raise fail(
                    spec.line,
                    f"{owner}: {variant.name!r} has no aggregator (aggregator: none): nothing to compare",
                )
        found[name] = Experiment(
            name,
            spec.description,
            tuple(variants),
            spec.allow_pin,
            spec.sample,
            spec.shadow_deadline_ms,
            spec.webhook,
        )
    return found
