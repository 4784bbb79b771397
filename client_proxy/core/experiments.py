"""Experiments: a model served in several variants, its requests split between them (sticky per
caller), and candidates that get a copy of the others' requests off their path (shadows), their
answers compared row by row with the one the client got (``shadows.py`` runs them).

Declared in the compositions file, beside the compositions::

    experiments:
      iris:                        # the name clients call: /compositions/iris/label, model "iris"
        primary: iris              # optional: the model of the experiment's own name
        candidates:
          iris_v2:                 # a composition, pipeline or service the files declare...
            split: 10              # ...that answers 10 % of the requests (default 0)
            shadow: 100            # ...and gets a copy of 100 % of the others' (default 0)
          setosa_b: {target: "other-triton:8001/setosa", shadow: 10}   # or a Triton model
        allow_pin: true            # X-Variant: iris_v2 chooses (default: refused, 403)
        sample: 100                # disagreeing rows kept for GET /experiments/iris
        shadow_deadline_ms: 2000   # a shadow's own deadline (default: its request's budget)
        webhook: "${DISAGREEMENT_WEBHOOK_URL:-}"   # the disagreeing rows posted, as alerts are

Which variant answers a request (``Experiment.choose``): the one ``X-Variant`` names when the
experiment allows it; else the one the caller's key falls in (the ``PROXY_VARIANT_HEADER``
header, else the first key of a request by key), the same for a key whatever the worker or the
restart, a key staying where it is as a candidate's split grows; else one drawn by the splits.
The candidates take their split from the top of the range, in the file's order, the primary the
rest.

To the dataplane an experiment is its primary until a variant is chosen for a request; every
variant is then a model like any other. The variants that answer share the primary's kind (a
door renders their answers); every variant reads a request by key the same way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from client_proxy.core.rules import read_webhook
from client_proxy.core.services import Service, TimeoutPolicy, valid_name
from client_proxy.core.tensors import Inputs
from client_proxy.core.yamlfile import Node
from client_proxy.errors import InvalidInput, ProxyError

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest
    from client_proxy.core.served import Kind, Model

#: Disagreeing rows an experiment keeps (``sample``) by default, and at most.
DEFAULT_SAMPLE = 100
MAX_SAMPLE = 10_000
_KEYS = {"description", "primary", "candidates", "allow_pin", "sample", "shadow_deadline_ms", "webhook"}
_CANDIDATE_KEYS = {"target", "split", "shadow"}


class PinRefused(ProxyError):
    status_code = 403
    code = "variant_pin_refused"


@dataclass(frozen=True)
class Variant:
    """One way an experiment's requests may be answered."""

    name: str
    model: Model
    split: float = 0.0
    """Percent of the experiment's requests it answers (the primary's: what the candidates leave)."""
    shadow: float = 0.0
    """Percent of the requests another variant answers that it gets a copy of, off their path."""

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.name, "kind": self.model.kind, "split": self.split, "shadow": self.shadow}


@dataclass(frozen=True)
class Experiment:
    """A model's variants (the primary first) and how requests are shared between them."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    allow_pin: bool = False
    sample: int = DEFAULT_SAMPLE
    shadow_deadline_ms: float | None = None
    webhook: str | None = None
    """Where each shadow's disagreeing rows are posted (``client_proxy.alerts``); None: nowhere."""

    _ranges: tuple[tuple[float, Variant], ...] = field(init=False, repr=False, compare=False)
    _shadows: tuple[Variant, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranges, upper = [], 100.0
        for variant in self.variants[1:]:
            if variant.split > 0:
                upper -= variant.split
                ranges.append((upper, variant))
        object.__setattr__(self, "_ranges", tuple(ranges))
        object.__setattr__(self, "_shadows", tuple(v for v in self.variants if v.shadow > 0))

    # -- as a model, an experiment is its primary until a variant is chosen ------------------
    @property
    def primary(self) -> Variant:
        return self.variants[0]

    @property
    def kind(self) -> Kind:
        return self.primary.model.kind

    @property
    def deadline_ms(self) -> float | None:
        return self.primary.model.deadline_ms

    @property
    def timeout_policy(self) -> TimeoutPolicy | None:
        return self.primary.model.timeout_policy

    @property
    def features(self) -> str | None:
        return self.primary.model.features

    @property
    def keys(self) -> str:
        return self.primary.model.keys

    @property
    def min_answers(self) -> int:
        return self.primary.model.min_answers

    def inputs_go_to(self) -> Sequence[Service]:
        return self.primary.model.inputs_go_to()

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:  # pragma: no cover - the dataplane runs the variant it chose, never this
        await self.primary.model.run(plane, answer, x, request, deadline)

    # -- sharing the requests ----------------------------------------------------------------
    def choose(self, pin: str | None, key: str | None, draw: Callable[[], float] = random.random) -> Variant:
        """The variant that answers: ``pin`` (``X-Variant``), else by ``key``, else by ``draw()``
        (uniform in [0, 1)); see the module."""
        if pin is not None:
            if not self.allow_pin:
                raise PinRefused(f"experiment {self.name!r} does not allow X-Variant (allow_pin: true)")
            for variant in self.variants:
                if variant.name == pin:
                    if variant.model.kind != self.kind:  # a shadow of another kind: no door renders it
                        raise InvalidInput(
                            f"X-Variant: {pin!r} is a {variant.model.kind}, {self.name!r} a {self.kind}: "
                            "it only shadows"
                        )
                    return variant
            known = ", ".join(v.name for v in self.variants)
            raise InvalidInput(
                f"X-Variant: experiment {self.name!r} has no variant {pin[:60]!r} (known: {known})"
            )
        if not self._ranges:
            return self.primary
        point = key_point(self.name, key) if key is not None else draw() * 100
        for lower, variant in self._ranges:
            if point >= lower:
                return variant
        return self.primary

    def shadows_for(self, answered: Variant, draw: Callable[[], float] = random.random) -> list[Variant]:
        """The variants that get a copy of a request ``answered`` answered (each by its ``shadow``)."""
        return [v for v in self._shadows if v is not answered and draw() * 100 < v.shadow]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "primary": self.primary.name,
            "variants": {v.name: v.describe() for v in self.variants},
            "allow_pin": self.allow_pin,
            "sample": self.sample,
            "shadow_deadline_ms": self.shadow_deadline_ms,
            "webhook": self.webhook,
        }


def key_point(experiment: str, key: str) -> float:
    """Where ``key`` falls in [0, 100) for ``experiment``: the same on every machine and run
    (not Python's ``hash``, which each process seeds anew); another experiment, another point."""
    digest = hashlib.blake2b(f"{experiment}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


# -- comparing two variants' answers, row by row -------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """A variant's answer, as two variants' are compared: a label and class scores per row."""

    labels: Sequence[str]
    scores: NDArray[np.float64] | None
    """Per row and class (``classes``); None when the answer has none."""
    classes: tuple[str, ...] = ()

    def row(self, i: int) -> dict[str, Any]:
        found: dict[str, Any] = {"label": self.labels[i]}
        if self.scores is not None:
            found["scores"] = dict(
                zip(self.classes, (round(float(v), 6) for v in self.scores[i]), strict=True)
            )
        return found


def verdict_of(answer: InferenceAnswer) -> Verdict:
    """The answer's label and scores per row, whatever model gave it: a composition's aggregate
    (for ``one_vs_rest`` the services' P(class) are the scores), a pipeline's, or a service's
    output (the label is the argmax's index, or ``1``/``0`` for one column at 0.5)."""
    if answer.aggregated is not None:
        aggregated, classes = answer.aggregated, tuple(answer.classes)
        scores = aggregated.scores
        result = answer.result
        if scores is None and result is not None and classes:
            columns = [result.outcomes[c].probabilities for c in classes if c in result.outcomes]
            if len(columns) == len(classes) and all(c is not None for c in columns):
                scores = np.stack([np.asarray(c)[:, 0] for c in columns if c is not None], axis=1)
        return Verdict(list(aggregated.labels), None if scores is None else np.asarray(scores), classes)
    if answer.report is not None:
        report = answer.report
        return Verdict(
            list(report.labels), report.scores, tuple(report.classes) if report.scores is not None else ()
        )
    if answer.outputs:
        target = answer.target
        wanted = target.output if isinstance(target, Service) else None
        array = answer.outputs.get(wanted) if wanted is not None else None
        if array is None:
            array = next(iter(answer.outputs.values()))
        values = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
        if values.shape[1] == 1:
            labels = ["1" if v >= 0.5 else "0" for v in values[:, 0]]
        else:
            labels = [str(i) for i in values.argmax(axis=1)]
        return Verdict(labels, values, tuple(str(i) for i in range(values.shape[1])))
    raise ValueError("the answer has neither labels nor outputs to compare")


@dataclass(frozen=True)
class Comparison:
    """Two verdicts on the same rows: which rows' labels agree, and the score differences."""

    agree: NDArray[np.bool_]
    deltas: Mapping[str, NDArray[np.float64]]
    """Per class both answers score: ``|theirs - ours|`` per row."""

    @property
    def disagreeing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.agree)]


def compare(ours: Verdict, theirs: Verdict) -> Comparison:
    """Row by row (the same rows, in the same order)."""
    if len(ours.labels) != len(theirs.labels):
        raise ValueError(f"{len(ours.labels)} rows answered, {len(theirs.labels)} by the shadow")
    agree = np.fromiter(
        (a == b for a, b in zip(ours.labels, theirs.labels, strict=True)), bool, len(ours.labels)
    )
    deltas: dict[str, NDArray[np.float64]] = {}
    if ours.scores is not None and theirs.scores is not None:
        where = {c: i for i, c in enumerate(theirs.classes)}
        for i, name in enumerate(ours.classes):
            j = where.get(name)
            if j is not None:
                deltas[name] = np.abs(theirs.scores[:, j] - ours.scores[:, i])
    return Comparison(agree, deltas)


# -- the experiments section of the compositions file -------------------------------------------
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
