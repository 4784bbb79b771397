"""The compositions file: what it declares, and one line naming each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_proxy.core.compositions_file import CompositionError, load_compositions
from client_proxy.core.services import Service, TimeoutPolicy

KNOWN = {"wine_knn": Service("wine_knn", "grpc", "triton:8001", "wine_knn")}


VALID = """
compositions:
  wine:
    description: three wine classifiers, soft vote
    services:
      wine_logreg: {target: "grpc://triton:8001/wine_logreg", weight: 2}
      wine_gbt: {target: "http://triton:8000/wine_gbt/1", output: proba}
      wine_knn: {}
    aggregator: mean
    classes: [class_0, class_1, class_2]
    timeout_policy: all_or_nothing
    deadline_ms: 1500
    min_answers: 2
"""


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "compositions.yaml"
    path.write_text(text)
    return load_compositions(path, KNOWN, "grpc", {})


def test_a_composition_is_read_as_declared(tmp_path: Path) -> None:
    (wine,) = _load(tmp_path, VALID).values()
    assert wine.name == "wine" and wine.aggregator == "mean" and wine.min_answers == 2
    assert [s.name for s in wine.services] == ["wine_logreg", "wine_gbt", "wine_knn"]
    assert wine.weights == {"wine_logreg": 2.0, "wine_gbt": 1.0, "wine_knn": 1.0}
    assert wine.services[1] == Service("wine_gbt", "http", "triton:8000", "wine_gbt", "1", "proba")
    assert wine.services[2] is KNOWN["wine_knn"]  # from its SERVICE_ variable
    assert wine.classes == ("class_0", "class_1", "class_2")
    assert wine.timeout_policy is TimeoutPolicy.ALL_OR_NOTHING and wine.deadline_ms == 1500
    assert wine.describe()["services"]["wine_logreg"]["target"] == "grpc://triton:8001/wine_logreg"


def test_targets_read_environment_variables(tmp_path: Path) -> None:
    text = (
        "compositions:\n  c:\n    services:\n"
        '      m: {target: "${TRITON_AT:-fallback:8001}/model"}\n    aggregator: none\n'
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_compositions(path, {}, "grpc", environ={})["c"].services[0].url == "fallback:8001"
    assert load_compositions(path, {}, "grpc", environ={"TRITON_AT": "t:9"})["c"].services[0].url == "t:9"
    path.write_text(text.replace(":-fallback:8001", ""))
    with pytest.raises(CompositionError, match=r"line 4: .*names an environment variable that is not set"):
        load_compositions(path, {}, "grpc", environ={})


def test_defaults(tmp_path: Path) -> None:
    (c,) = _load(
        tmp_path, "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: none\n"
    ).values()
    assert (c.classes, c.timeout_policy, c.deadline_ms, c.min_answers) == ((), None, None, 1)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("compositions: []\n", 1, "expected a mapping with a 'compositions' mapping"),
        (
            "compositions:\n  Bad-Name:\n    services: {wine_knn: {}}\n    aggregator: mean\n",
            3,
            "composition name 'Bad-Name'",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: mean\n    colour: red\n",
            3,
            "unknown key(s) ['colour']",
        ),
        ("compositions:\n  c:\n    aggregator: mean\n", 3, "needs 'services'"),
        (
            "compositions:\n  c:\n    services: {ghost: {}}\n    aggregator: mean\n",
            3,
            "service 'ghost' has no 'target' and no SERVICE_ variable (known: wine_knn)",
        ),
        (
            "compositions:\n  c:\n    services:\n      a: {target: nowhere}\n    aggregator: mean\n",
            4,
            "expected [grpc://|http://]host:port",
        ),
        (
            "compositions:\n  c:\n    services:\n      wine_knn: {weight: 0}\n    aggregator: mean\n",
            4,
            "weight must be a positive number",
        ),
        (
            "compositions:\n  c:\n    services:\n      wine_knn: {colour: red}\n    aggregator: mean\n",
            4,
            "unknown key(s) ['colour']",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: median\n",
            4,
            "aggregator must be one of one_vs_rest, mean, vote, max, none, not 'median'",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: mean\n    classes: [a, a]\n",
            5,
            "classes must be a list of distinct names",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: mean\n"
            "    timeout_policy: sometimes\n",
            5,
            "timeout_policy must be",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: mean\n    deadline_ms: 10\n",
            5,
            "deadline_ms must be a number from 50 to 600000",
        ),
        (
            "compositions:\n  c:\n    services: {wine_knn: {}}\n    aggregator: mean\n    min_answers: 2\n",
            5,
            "min_answers must be a whole number from 1 to 1",
        ),
        ("compositions:\n  c: [\n", 3, "not valid YAML"),
    ],
)
def test_each_mistake_is_one_line_naming_the_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    with pytest.raises(CompositionError) as refused:
        _load(tmp_path, text)
    text_of_error = str(refused.value)
    assert text_of_error.startswith(f"{tmp_path / 'compositions.yaml'}: line {line}: "), text_of_error
    assert message in text_of_error and "\n" not in text_of_error


def test_class_names_that_differ_are_refused_naming_both() -> None:
    import asyncio
    import time

    from client_proxy.core.compositions import resolve_classes
    from client_proxy.errors import AggregationFailed

    a, b = Service("a", "grpc", "t:1", "a"), Service("b", "grpc", "t:1", "b")

    class Models:
        def __init__(self, **names: str) -> None:
            self.names = {k: tuple(v.split(",")) for k, v in names.items()}

        async def class_names(self, service: Service, x: object, timeout: float) -> tuple[str, ...]:
            return self.names[service.name]

    def classes(models: Models, declared: tuple[str, ...] = ()) -> tuple[str, ...]:
        deadline = time.monotonic() + 1
        return asyncio.run(
            resolve_classes("composition 'c'", declared, "mean", [a, b], models, lambda _: None, deadline)
        )  # type: ignore[arg-type]

    assert classes(Models(a="x,y", b="x,y")) == ("x", "y")
    with pytest.raises(AggregationFailed, match=r"class names differ \(x, y; y, x\)"):
        classes(Models(a="x,y", b="y,x"))
    assert classes(Models(a="x,y", b="y,x"), declared=("p", "q")) == ("p", "q")


def test_keys_say_who_reads_the_features(tmp_path: Path) -> None:
    text = 'compositions:\n  c:\n    KEYS\n    services:\n      m: {target: "t:1/m"}\n    aggregator: none\n'
    assert _load(tmp_path, text.replace("KEYS", "description: x"))["c"].keys == "fetch"
    forwarded = _load(tmp_path, text.replace("KEYS", "keys: forward"))["c"]
    assert forwarded.keys == "forward" and forwarded.describe()["keys"] == "forward"
    with pytest.raises(CompositionError, match=r"line 3: composition 'c': keys must be fetch .* or forward"):
        _load(tmp_path, text.replace("KEYS", "keys: models"))


def test_a_service_may_hedge_on_its_own_terms(tmp_path: Path) -> None:
    """``hedge:`` per service, as README's iris_replicated shows; one without it keeps PROXY_HEDGE
    (None here: the setting decides)."""
    text = """
compositions:
  iris_replicated:
    services:
      setosa: {target: "triton-a:8001/setosa,triton-b:8001/setosa", hedge: p95}
      versicolor: {target: "triton-a:8001/versicolor,triton-b:8001/versicolor", hedge: 20ms}
      virginica: {target: "triton-a:8001/virginica,triton-b:8001/virginica"}
    aggregator: one_vs_rest
"""
    (replicated,) = _load(tmp_path, text).values()
    hedges = {s.name: s.hedge for s in replicated.services}
    assert hedges["setosa"] is not None and hedges["setosa"].describe() == "p95"
    assert hedges["versicolor"] is not None and hedges["versicolor"].describe() == "20ms"
    assert hedges["virginica"] is None
    assert [len(s.targets) for s in replicated.services] == [2, 2, 2]
    with pytest.raises(CompositionError, match=r"line 5: .*service 'setosa': hedge"):
        _load(tmp_path, text.replace("hedge: p95", "hedge: sometimes"))
