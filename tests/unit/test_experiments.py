"""Experiments as the compositions file declares them (one line naming each mistake), how a
request's variant is chosen, and how two answers are compared row by row (pure logic; the real
thing against Triton is tests/test_experiments.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client_proxy.config import Settings
from client_proxy.core.aggregators import Aggregated
from client_proxy.core.compositions_file import CompositionError
from client_proxy.core.dataplane import InferenceAnswer
from client_proxy.core.declared import Configuration, load_configuration
from client_proxy.core.experiments import PinRefused, compare, key_point, verdict_of
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.core.shadows import merged
from client_proxy.errors import InvalidInput

SERVICES = [Service(n, "grpc", "triton:8001", n) for n in ("setosa", "versicolor", "virginica")]


def _composition(name: str, versicolor: str = "versicolor") -> str:
    return (
        f"  {name}:\n    services:\n      setosa: {{}}\n"
        f"      versicolor: {{target: 'triton:8001/{versicolor}'}}\n      virginica: {{}}\n"
        "    aggregator: one_vs_rest\n"
    )


def _configuration(tmp_path: Path, experiments: str) -> Configuration:
    path = tmp_path / "compositions.yaml"
    path.write_text(
        "compositions:\n"
        + _composition("iris")
        + _composition("iris_v2", "versicolor_v2")
        + "  raw:\n    services: {setosa: {}}\n    aggregator: none\n"
        + f"experiments:\n{experiments}"
    )
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text("pipelines: {}\n")
    settings = Settings(compositions_file=path, pipelines_file=pipelines)
    return load_configuration(settings, SERVICES, {}, warn=False)


def test_an_experiment_is_read_as_declared_and_served_under_its_name(tmp_path: Path) -> None:
    config = _configuration(
        tmp_path,
        "  iris:\n    description: a canary\n    candidates:\n"
        "      iris_v2: {split: 10, shadow: 50}\n      setosa_b: {target: 'other:8001/setosa', shadow: 5}\n"
        "    allow_pin: true\n    sample: 20\n    shadow_deadline_ms: 800\n",
    )
    experiment = config.experiments["iris"]
    assert [v.name for v in experiment.variants] == ["iris", "iris_v2", "setosa_b"]
    assert [v.split for v in experiment.variants] == [90, 10, 0]
    assert [v.shadow for v in experiment.variants] == [0, 50, 5]
    assert experiment.primary.model is config.compositions["iris"]
    assert experiment.variants[2].model.kind == "service"  # a Triton model of its own
    assert experiment.kind == "composition" and experiment.allow_pin and experiment.sample == 20
    assert experiment.shadow_deadline_ms == 800
    assert any(s.url == "other:8001" for s in config.every_service())  # its client is opened
    assert config.describe()["experiments"] == ["iris"]


@pytest.mark.parametrize(
    ("experiments", "line", "message"),
    [
        ("  iris:\n    candidates: {}\n", 19, "needs 'candidates'"),
        ("  iris:\n    candidates:\n      iris_v2: {}\n    color: red\n", 19, "unknown key(s) ['color']"),
        ("  iris:\n    candidates:\n      nope: {shadow: 10}\n", 20, "no composition, pipeline or service"),
        ("  iris:\n    candidates:\n      iris_v2: {split: 101}\n", 20, "split must be a percentage"),
        (
            "  iris:\n    candidates:\n      iris_v2: {split: 60}\n      setosa: {split: 50}\n",
            20,
            "add up to",
        ),
        ("  iris:\n    primary: nope\n    candidates:\n      iris_v2: {}\n", 19, "primary 'nope'"),
        ("  iris:\n    candidates:\n      iris: {}\n", 20, "cannot be a candidate"),
        ("  iris:\n    candidates:\n      setosa: {split: 5}\n", 20, "must be a composition like 'iris'"),
        ("  iris_v2:\n    primary: iris\n    candidates:\n      raw: {}\n", 19, "would hide the composition"),
        ("  x:\n    primary: iris\n    candidates:\n      raw: {shadow: 5}\n", 19, "no aggregator"),
        ("  x:\n    primary: iris\n    candidates:\n      iris_v2: {}\n    sample: -1\n", 22, "sample"),
        (
            "  x:\n    primary: iris\n    candidates:\n      iris_v2: {}\n    allow_pin: maybe\n",
            22,
            "allow_pin",
        ),
    ],
)
def test_a_mistake_is_named_with_its_line(tmp_path: Path, experiments: str, line: int, message: str) -> None:
    with pytest.raises(CompositionError) as raised:
        _configuration(tmp_path, experiments)
    assert f"compositions.yaml: line {line}: " in str(raised.value)
    assert message in str(raised.value)


def test_a_service_experiment_may_answer_with_a_service_of_its_own(tmp_path: Path) -> None:
    config = _configuration(
        tmp_path,
        "  versicolor:\n    candidates:\n      versicolor_b: {target: 'b:8001/versicolor', split: 30}\n",
    )
    experiment = config.experiments["versicolor"]
    assert experiment.kind == "service" and experiment.variants[1].model.kind == "service"


def test_the_variant_follows_the_pin_then_the_key_then_the_draw(tmp_path: Path) -> None:
    config = _configuration(tmp_path, "  iris:\n    candidates:\n      iris_v2: {split: 10}\n")
    experiment = config.experiments["iris"]
    assert experiment.choose(None, None, draw=lambda: 0.95).name == "iris_v2"
    assert experiment.choose(None, None, draw=lambda: 0.85).name == "iris"
    keys = [f"k{i}" for i in range(1000)]
    chosen = {k: experiment.choose(None, k, draw=lambda: 0.0).name for k in keys}  # the draw unused
    assert all((v == "iris_v2") == (key_point("iris", k) >= 90) for k, v in chosen.items())
    with pytest.raises(PinRefused):
        experiment.choose("iris_v2", None)
    pinned = _configuration(tmp_path, "  iris:\n    candidates:\n      iris_v2: {}\n    allow_pin: true\n")
    assert pinned.experiments["iris"].choose("iris_v2", "k1").name == "iris_v2"  # the pin wins
    with pytest.raises(InvalidInput, match=r"known: iris, iris_v2"):
        pinned.experiments["iris"].choose("v3", None)
    shadowed = _configuration(
        tmp_path, "  iris:\n    candidates:\n      setosa: {shadow: 5}\n    allow_pin: true\n"
    )
    with pytest.raises(InvalidInput, match=r"'setosa' is a service, 'iris' a composition: it only shadows"):
        shadowed.experiments["iris"].choose("setosa", None)


def test_a_key_stays_where_it_is_as_a_candidates_split_grows(tmp_path: Path) -> None:
    keys = [f"user-{i}" for i in range(2000)]
    before = {}
    for split in (1, 5, 10, 25, 50, 100):
        config = _configuration(tmp_path, f"  iris:\n    candidates:\n      iris_v2: {{split: {split}}}\n")
        now = {k: config.experiments["iris"].choose(None, k).name for k in keys}
        assert all(now[k] == "iris_v2" for k, v in before.items() if v == "iris_v2")  # none goes back
        before = now
    assert set(before.values()) == {"iris_v2"}


def test_a_key_falls_where_it_fell_on_every_machine() -> None:
    # blake2b of "<experiment>\0<key>": not Python's hash (seeded anew in each process). Changing
    # the scheme would move every caller to another variant: this pins it.
    assert key_point("iris", "user-1") == pytest.approx(77.33264643517484, abs=1e-9)
    assert key_point("other", "user-1") != key_point("iris", "user-1")


def test_two_answers_are_compared_row_by_row_by_class_name() -> None:
    ours = Aggregated(
        ["a", "b", "c"], np.array([0.9, 0.6, 0.5]), np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    )
    theirs = Aggregated(
        ["a", "a", "c"], np.array([0.8, 0.7, 0.5]), np.array([[0.3, 0.6], [0.2, 0.8], [0.5, 0.5]])
    )
    first = InferenceAnswer(SERVICES[0], TimeoutPolicy.PARTIAL, 3, aggregated=ours, classes=("x", "y"))
    second = InferenceAnswer(SERVICES[0], TimeoutPolicy.PARTIAL, 3, aggregated=theirs, classes=("y", "x"))
    comparison = compare(verdict_of(first), verdict_of(second))
    assert comparison.disagreeing == [1]
    np.testing.assert_allclose(comparison.deltas["x"], [0.3, 0.4, 0.0])  # their x is their 2nd column
    np.testing.assert_allclose(comparison.deltas["y"], [0.2, 0.4, 0.0])


def test_a_services_output_is_labelled_by_its_argmax_or_at_one_half() -> None:
    service = SERVICES[0]
    wide = InferenceAnswer(
        service, TimeoutPolicy.PARTIAL, 2, outputs={"p": np.array([[0.2, 0.8], [0.7, 0.3]])}
    )
    assert verdict_of(wide).labels == ["1", "0"]
    one = InferenceAnswer(service, TimeoutPolicy.PARTIAL, 2, outputs={"p": np.array([[0.2], [0.7]])})
    assert verdict_of(one).labels == ["0", "1"]


def test_several_workers_counts_add_up_and_their_newest_rows_are_kept() -> None:
    def row(at: str, request_id: str) -> dict[str, object]:
        return {"at": at, "request_id": request_id, "row": 0}

    first = {
        "counts": {"iris": {"agree": 10, "disagree": 2, "failed": 0, "dropped": 1}},
        "samples": {"iris": [row("2026-01-01T00:00:01Z", "a"), row("2026-01-01T00:00:03Z", "c")]},
    }
    second = {
        "counts": {"iris": {"agree": 5, "disagree": 1, "failed": 2, "dropped": 0}, "other": {"agree": 9}},
        "samples": {"iris": [row("2026-01-01T00:00:02Z", "b")]},
    }
    idle: dict[str, object] = {"counts": {}, "samples": {}}  # a worker that compared nothing yet
    counts, rows = merged([first, second, idle], "iris", keep=2)
    assert counts == {"agree": 15, "disagree": 3, "failed": 2, "dropped": 1}
    assert [r["request_id"] for r in rows] == ["b", "c"]  # the newest two, the oldest first
    assert merged([first, second], "iris", keep=0)[1] == []
    assert merged([first], "nope", keep=5) == ({}, [])
