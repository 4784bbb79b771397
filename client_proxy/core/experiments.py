"""Experiments: a model served in several variants, its requests split between them (sticky per
caller), and candidates that get a copy of the others' requests off their path (shadows), their
answers compared row by row with the one the client got (``shadows.py`` runs them).

Declared in the compositions file, beside the compositions (read by ``experiments_file.py``)::

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

from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs
from client_proxy.errors import InvalidInput, ProxyError

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest
    from client_proxy.core.served import Kind, Model

#: Disagreeing rows an experiment keeps (``sample``) by default, and at most.
DEFAULT_SAMPLE = 100
MAX_SAMPLE = 10_000


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
