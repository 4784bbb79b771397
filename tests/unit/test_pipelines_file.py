"""The pipelines file: what it declares, and one line naming each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_proxy.core.pipelines_file import DEFAULT_FILE, PipelineError, configured_pipelines, load_pipelines
from client_proxy.core.services import Service
from training import CLASS_NAMES

from ..conftest import ROOT

IRIS = {n: Service(n, "grpc", "x:1", n) for n in CLASS_NAMES}


# -- pipeline files -----------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


GOOD_HEAD = "pipelines:\n  p:\n    steps:\n"


@pytest.mark.parametrize(
    ("steps", "line", "text"),
    [
        ("      - name: a\n        services: [setosa, nope]\n", 5, "unknown service 'nope'"),
        ("      - name: a\n        services: [setosa]\n        input: a.setosa\n", 6, "a cycle"),
        ("      - name: a\n        services: [setosa]\n        input: b.setosa\n"
         "      - name: b\n        services: [virginica]\n", 6, "a cycle"),
        ("      - name: a\n        services: [setosa]\n        stop_if: setosa => 0.9\n", 6, "stop_if"),
        ("      - name: a\n        services: [setosa]\n        stop_if: virginica > 0.9\n", 6, "service"),
        ("      - name: a\n        services: [setosa]\n        on_failure: retry\n", 6, "on_failure"),
        ("      - name: a\n        services: [setosa]\n        colour: blue\n", 4, "unknown key"),
        ("      - name: a\n        services: [setosa]\n        stop_if: class_1 > 0.9\n", 6,
         "'class_1' is not a service of step 'a', one of the classes, 'proba', 'max' or 'label'"),
        ("      - name: a\n        services: [setosa]\n        stop_if: setosa > 0.9 or class_1 > 0.9\n", 6,
         "'class_1' is not a service"),
        ("      - name: a\n        services: [setosa]\n        stop_if: label >= 0.9\n", 6,
         "label takes == or != and a name"),
    ],
)  # fmt: skip
def test_invalid_pipeline_files_name_the_line(tmp_path: Path, steps: str, line: int, text: str) -> None:
    path = _write(tmp_path, GOOD_HEAD + steps)
    with pytest.raises(PipelineError) as error:
        load_pipelines(path, IRIS, {})
    assert f"line {line}:" in str(error.value) and text in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    ("head", "line", "text"),
    [
        ("pipelines:\n  p:\n    aggregator: median\n    steps:\n", 3, "aggregator must be one of"),
        ("pipelines:\n  p:\n    classes: [a, a]\n    steps:\n", 3, "classes must be a list of distinct"),
        ("pipelines:\n  p:\n    aggregator: mean\n    classes: [x, y]\n    steps:\n", 8, "'class_1' is not"),
    ],
)
def test_a_pipelines_aggregator_and_classes_are_checked(
    tmp_path: Path, head: str, line: int, text: str
) -> None:
    steps = "      - name: a\n        services: [setosa]\n        stop_if: class_1 > 0.9\n"
    with pytest.raises(PipelineError) as error:
        load_pipelines(_write(tmp_path, head + steps), IRIS, {})
    assert f"line {line}:" in str(error.value) and text in str(error.value)


def test_a_class_operand_is_taken_when_the_classes_come_from_the_models(tmp_path: Path) -> None:
    head = "pipelines:\n  p:\n    aggregator: mean\n    steps:\n"
    steps = "      - name: a\n        services: [setosa]\n        stop_if: class_1 > 0.9\n"
    (pipeline,) = load_pipelines(_write(tmp_path, head + steps), IRIS, {}).values()
    assert pipeline.aggregator == "mean" and pipeline.steps[0].stop_if is not None


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="line 3"):
        load_pipelines(_write(tmp_path, "pipelines:\n  p:\n\tsteps: []\n"), IRIS, {})


def test_the_shipped_cascade_loads() -> None:
    (cascade,) = load_pipelines(DEFAULT_FILE, IRIS, {}).values()
    assert [s.services for s in cascade.steps] == [("setosa",), ("versicolor", "virginica")]


def test_the_shipped_file_steps_aside_when_the_services_differ(tmp_path: Path) -> None:
    only_setosa = {"setosa": IRIS["setosa"]}
    pipelines, source = configured_pipelines(None, only_setosa, {})
    assert pipelines == {} and "not served" in source and "versicolor" in source
    assert set(configured_pipelines(None, IRIS, {})[0]) == {"iris_cascade"}
    # A file the operator named is strict.
    with pytest.raises(PipelineError):
        configured_pipelines(DEFAULT_FILE, only_setosa, {})


def test_the_example_file_serves_the_shipped_cascade_unchanged() -> None:
    """examples/pipelines.yaml (make run, compose, k8s) repeats the shipped cascade: the same."""
    services = {**IRIS, **{n: Service(n, "grpc", "x:1", n) for n in ("wine_logreg", "wine_gbt", "wine_knn")}}
    example = load_pipelines(ROOT / "examples" / "pipelines.yaml", services, {})
    assert (
        example["iris_cascade"].describe()
        == load_pipelines(DEFAULT_FILE, IRIS, {})["iris_cascade"].describe()
    )


def test_a_pipeline_reads_its_key_mode_and_refuses_another(tmp_path: Path) -> None:
    steps = "    steps:\n      - name: a\n        services: [setosa]\n"
    forward = load_pipelines(_write(tmp_path, "pipelines:\n  p:\n    keys: forward\n" + steps), IRIS, {})
    assert forward["p"].keys == "forward" and forward["p"].describe()["keys"] == "forward"
    default = load_pipelines(_write(tmp_path, "pipelines:\n  p:\n" + steps), IRIS, {})
    assert default["p"].keys == "fetch"
    with pytest.raises(PipelineError, match=r"line 3: pipeline 'p': keys must be fetch .* or forward"):
        load_pipelines(_write(tmp_path, "pipelines:\n  p:\n    keys: sideways\n" + steps), IRIS, {})
