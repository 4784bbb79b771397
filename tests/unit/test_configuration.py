"""The configuration as one value (``core/declared.py``) and its swap (``ServedModels.swap``): a
model found before a swap keeps everything it calls; the next lookup gets the new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from client_proxy.core.compositions import Composition
from client_proxy.core.declared import Configuration
from client_proxy.core.pipelines import Pipeline
from client_proxy.core.pipelines_file import load_pipelines
from client_proxy.core.served import ServedModels
from client_proxy.core.services import Service
from client_proxy.errors import UnknownPipeline

IRIS = ("setosa", "versicolor", "virginica")


def _services(server: str) -> list[Service]:
    return [Service(n, "grpc", server, n) for n in IRIS]


def _cascade(tmp_path: Path, services: list[Service]) -> dict[str, Pipeline]:
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        "pipelines:\n  cascade:\n    steps:\n"
        "      - {name: first, services: [setosa], stop_if: 'setosa >= 0.9'}\n"
        "      - {name: rest, services: [versicolor, virginica]}\n"
    )
    return load_pipelines(path, {s.name: s for s in services}, {})


def test_a_pipeline_holds_the_services_its_steps_name(tmp_path: Path) -> None:
    services = _services("one:8001")
    (cascade,) = _cascade(tmp_path, services).values()
    assert cascade.services == tuple(services)
    assert cascade.inputs_go_to() == services
    elsewhere = cascade.bind({s.name: s for s in _services("two:8001")})
    assert [s.url for s in elsewhere.inputs_go_to()] == ["two:8001"] * 3
    assert elsewhere != cascade
    with pytest.raises(KeyError):
        cascade.bind({"setosa": services[0]})


def test_the_default_composition_is_made_once_from_the_services() -> None:
    config = Configuration(tuple(_services("one:8001")), {}, {})
    assert config.default is config.default
    assert config.default.services == config.services
    declared = Composition("default", "", (), "mean")
    assert Configuration(tuple(_services("one:8001")), {"default": declared}, {}).default is declared


def test_an_admin_change_is_a_new_configuration_whose_pipelines_call_the_new_services(tmp_path: Path) -> None:
    old = _services("one:8001")
    config = Configuration(tuple(old), {}, _cascade(tmp_path, old), generation=4)
    moved = [Service("setosa", "grpc", "two:8001", "setosa"), *old[1:]]
    changed = config.with_services(moved, {"action": "add", "service": "setosa"})
    assert changed.generation == 5 and changed.changes == ({"action": "add", "service": "setosa"},)
    assert changed.pipelines["cascade"].by_name["setosa"].url == "two:8001"
    assert config.pipelines["cascade"].by_name["setosa"].url == "one:8001"  # the old one is untouched
    assert changed.default.services[0].url == "two:8001"


class _Gateway:
    def known_contracts(self, services: Any) -> list[None]:
        return [None for _ in services]


def test_a_model_found_before_a_swap_keeps_what_it_calls(tmp_path: Path) -> None:
    first = _services("one:8001")
    models = ServedModels(_Gateway(), Configuration(tuple(first), {}, _cascade(tmp_path, first)))  # type: ignore[arg-type]
    running = models.find("cascade")
    default = models.find("iris_fanout")
    second = _services("two:8001")
    old = models.swap(Configuration(tuple(second), {}, {}, generation=2))
    assert old.generation == 1 and models.config.generation == 2
    # What a request already running holds is the first configuration, whole.
    assert [s.url for s in running.inputs_go_to()] == ["one:8001"] * 3
    assert [s.url for s in default.inputs_go_to()] == ["one:8001"] * 3
    # The next lookups see the second.
    assert [s.url for s in models.find("iris_fanout").inputs_go_to()] == ["two:8001"] * 3
    with pytest.raises(UnknownPipeline):
        models.find("cascade", "pipeline")
    assert "cascade" not in models.names()
