"""Rules on results: the condition language, the rules in the files, and which rows meet them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from client_proxy.core import conditions
from client_proxy.core.aggregators import Aggregated
from client_proxy.core.compositions_file import CompositionError, load_compositions
from client_proxy.core.conditions import ConditionSyntaxError
from client_proxy.core.pipelines_file import PipelineError, load_pipelines
from client_proxy.core.rules import Alert, Result, check
from client_proxy.core.services import Service

IRIS = {n: Service(n, "grpc", "localhost:8001", n) for n in ("setosa", "versicolor", "virginica")}


def _answer(labels: list[str], proba: list[float], scores: list[list[float]] | None = None) -> Aggregated:
    return Aggregated(
        labels, np.asarray(proba), np.asarray(scores, dtype=np.float64) if scores is not None else None
    )


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("proba >= 0.9", [True, False, True]),
        ("label == b", [False, True, True]),
        ("label != b", [True, False, False]),
        ("x > 0.5 or y > 0.5", [True, True, False]),
        ("x > 0.5 and y > 0.5", [False, True, False]),
        # 'and' binds tighter: (x > 0.5 and proba < 0.5) or label == b
        ("x > 0.5 and proba < 0.5 or label == b", [False, True, True]),
        ("max >= 0.7", [True, True, False]),
        ("c1 >= 0.5", [False, True, True]),
        ("proba < 1e-3", [False, False, False]),
    ],
)
def test_a_condition_holds_for_the_rows_it_describes(text: str, rows: list[bool]) -> None:
    answer = _answer(["a", "b", "b"], [0.95, 0.4, 0.9], [[0.95, 0.05], [0.4, 0.6], [0.1, 0.9]])
    scores = {"x": np.asarray([0.8, 0.6, 0.2]), "y": np.asarray([0.1, 0.7, 0.3])}
    held = conditions.parse(text).rows(scores, answer, ["c0", "c1"], "here")
    assert held.tolist() == rows


def test_a_service_that_did_not_answer_meets_no_clause() -> None:
    answer = _answer(["a", "b"], [0.9, 0.9])
    scores = {"x": np.asarray([np.nan, 0.9]), "y": np.asarray([np.nan, np.nan])}
    assert conditions.parse("x >= 0.5").rows(scores, answer, [], "").tolist() == [False, True]
    assert conditions.parse("x < 0.5").rows(scores, answer, [], "").tolist() == [False, False]
    assert conditions.parse("max >= 0.5").rows(scores, answer, [], "").tolist() == [False, True]
    assert conditions.parse("y >= 0 or proba > 0.5").rows(scores, answer, [], "").tolist() == [True, True]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("setosa => 0.9", "expected '<operand> <op> <number>'"),
        ("proba >= high", "expected"),
        ("proba == 0.9", "expected"),
        ("label >= 0.5", "label takes == or != and a name"),
        ("proba > 0.5 or", "expected"),
        ("x > 0.5 and and y > 0.5", "expected"),
        ("", "expected"),
    ],
)
def test_a_condition_that_does_not_parse_says_what_was_expected(text: str, says: str) -> None:
    with pytest.raises(ConditionSyntaxError, match=says):
        conditions.parse(text)


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Alert, ...], str]] = []

    def raised(self, source: str, alerts: tuple[Alert, ...], request_id: str, result: Result) -> None:
        self.calls.append((source, tuple(alerts), request_id))


def _rules(tmp_path: Path, rules: str, aggregator: str = "one_vs_rest", classes: str = "") -> Path:
    path = tmp_path / "compositions.yaml"
    path.write_text(
        "compositions:\n"
        "  iris:\n"
        "    services: {setosa: {}, versicolor: {}, virginica: {}}\n"
        f"    aggregator: {aggregator}\n"
        f"{classes}"
        "    rules:\n" + rules
    )
    return path


def test_rules_are_read_with_their_severity_and_webhook(tmp_path: Path) -> None:
    path = _rules(
        tmp_path,
        "      - name: virginica_sure\n        when: virginica >= 0.9\n        severity: critical\n"
        "        webhook: ${HOOK}/alerts\n"
        "      - name: unsure\n        when: proba < 0.6\n        webhook: ${NO_HOOK:-}\n",
    )
    (composition,) = load_compositions(path, IRIS, "grpc", {"HOOK": "http://alerts.example:8088"}).values()
    sure, unsure = composition.rules
    assert (sure.name, sure.severity, sure.webhook) == (
        "virginica_sure",
        "critical",
        "http://alerts.example:8088/alerts",
    )
    assert (unsure.severity, unsure.webhook) == ("warning", None)
    assert composition.describe()["rules"][0]["when"] == "virginica >= 0.9"


@pytest.mark.parametrize(
    ("rules", "line", "says"),
    [
        ("      - name: a\n        when: petal >= 0.9\n", 7, "'petal' is not a service, one of the classes"),
        ("      - name: a\n        when: virginica => 0.9\n", 7, "when 'virginica => 0.9': expected"),
        ("      - name: a\n", 6, "needs 'when'"),
        ("      - name: A b\n        when: proba > 0.5\n", 6, "a rule needs a 'name'"),
        ("      - {name: a, when: proba > 0.5}\n      - {name: a, when: proba > 0.6}\n", 7, "used twice"),
        ("      - name: a\n        when: proba > 0.5\n        colour: red\n", 6, "unknown key(s) ['colour']"),
        ("      - name: a\n        when: proba > 0.5\n        webhook: ftp://x/y\n", 8, "not an http://"),
        ("      - name: a\n        when: proba > 0.5\n        webhook: ${UNSET_HOOK}\n", 8, "not set"),
        ("      - name: a\n        when: proba > 0.5\n        severity: [x]\n", 8, "severity must be a word"),
    ],
)  # fmt: skip
def test_an_invalid_rule_stops_the_start_naming_the_file_and_line(
    tmp_path: Path, rules: str, line: int, says: str
) -> None:
    path = _rules(tmp_path, rules)
    with pytest.raises(CompositionError) as error:
        load_compositions(path, IRIS, "grpc", {})
    assert str(error.value).startswith(f"{path}: line {line}: ") and says in str(error.value)


def test_with_no_aggregator_a_rule_reads_only_the_services(tmp_path: Path) -> None:
    path = _rules(tmp_path, "      - name: a\n        when: proba > 0.5\n", aggregator="none")
    with pytest.raises(CompositionError, match="with no aggregator a rule reads only the services"):
        load_compositions(path, IRIS, "grpc", {})
    path = _rules(tmp_path, "      - name: a\n        when: setosa > 0.5 or max > 0.99\n", aggregator="none")
    assert load_compositions(path, IRIS, "grpc", {})["iris"].rules[0].name == "a"


def test_declared_classes_are_checked_when_the_rules_are_read(tmp_path: Path) -> None:
    classes = "    classes: [c0, c1]\n"
    path = _rules(tmp_path, "      - name: a\n        when: c2 > 0.5\n", aggregator="mean", classes=classes)
    with pytest.raises(CompositionError, match="'c2' is not"):
        load_compositions(path, IRIS, "grpc", {})


def test_a_pipeline_declares_rules_too(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    text = (
        "pipelines:\n  p:\n    steps:\n      - name: one\n        services: [setosa]\n"
        "    rules:\n      - name: late_virginica\n        when: virginica >= 0.9\n"
    )
    path.write_text(text)
    with pytest.raises(PipelineError, match=r"line 8: pipeline 'p', rule 'late_virginica': when"):
        load_pipelines(path, IRIS, {})  # virginica is no service of the pipeline
    path.write_text(text.replace("[setosa]", "[setosa, virginica]"))
    (pipeline,) = load_pipelines(path, IRIS, {}).values()
    assert pipeline.rules[0].when.text == "virginica >= 0.9"


def test_check_names_each_rule_met_and_its_rows_and_hands_them_to_the_sink(tmp_path: Path) -> None:
    path = _rules(
        tmp_path,
        "      - {name: high, when: proba >= 0.9}\n"
        "      - {name: never, when: proba > 2}\n"
        "      - {name: virginica, when: label == virginica}\n",
    )
    rules = load_compositions(path, IRIS, "grpc", {})["iris"].rules
    result = Result(
        _answer(["setosa", "virginica", "virginica"], [0.95, 0.5, 0.91]), ["setosa", "virginica"], {}
    )
    sink = Sink()
    alerts = check(rules, "composition/iris", result, "rid-1", sink)
    assert [(a.rule.name, a.rows) for a in alerts] == [("high", (0, 2)), ("virginica", (1, 2))]
    assert sink.calls == [("composition/iris", alerts, "rid-1")]
    assert alerts[0].describe() == {"rule": "high", "severity": "warning", "rows": [0, 2]}
    # No rule met: nothing for the sink.
    assert check(rules, "composition/iris", Result(_answer(["setosa"], [0.5]), [], {}), "rid-2", sink) == ()
    assert len(sink.calls) == 1


def test_a_rule_on_a_class_the_models_do_not_have_is_never_met_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _rules(tmp_path, "      - {name: odd, when: class_9 > 0.5}\n", aggregator="mean")
    rules = load_compositions(path, IRIS, "grpc", {})["iris"].rules  # classes come from the models
    result = Result(_answer(["c0"], [0.9], [[0.9, 0.1]]), ["c0", "c1"], {})
    with caplog.at_level(logging.WARNING, logger="client_proxy.alerts"):
        for _ in range(3):
            assert check(rules, "composition/x", result, "rid", None) == ()
    messages = [r.getMessage() for r in caplog.records if "never met" in r.getMessage()]
    assert len(messages) == 1 and "'class_9' is not one of the classes (c0, c1)" in messages[0]


def test_an_alerts_row_reports_the_answer_and_every_services_score() -> None:
    result = Result(
        _answer(["c1"], [0.7], [[0.3, 0.7]]),
        ["c0", "c1"],
        {"x": np.asarray([0.7]), "y": np.asarray([np.nan])},
    )
    assert result.row(0) == {
        "label": "c1",
        "proba": 0.7,
        "scores": {"c0": 0.3, "c1": 0.7},
        "services": {"x": 0.7, "y": None},
    }
