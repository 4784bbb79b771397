"""The dataplane runs any ``served.Model`` the same way, asking it only what the protocol asks:
a kind it has never heard of is run without a word changed in it (a pure unit test: the models
and the Triton side are stand-ins; the real ones are run by the integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest
from client_proxy.core.served import Kind
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs


class Echo:
    """A model of a kind the dataplane does not know: its answer is its input."""

    name = "echo"
    kind: ClassVar[Kind] = "service"
    description = "answers with its input"
    deadline_ms = 50.0
    timeout_policy = TimeoutPolicy.PARTIAL
    features = None
    keys = "fetch"
    min_answers = 1

    def __init__(self) -> None:
        self.runs: list[tuple[Inputs, float, TimeoutPolicy]] = []

    def inputs_go_to(self) -> Sequence[Service]:
        return ()

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        self.runs.append((x, deadline, answer.policy))
        answer.outputs = {"echo": np.asarray(x)}


class Fits:
    def fits(self, services: Sequence[Service], x: Inputs) -> bool:
        return True


class Observer:
    def __init__(self) -> None:
        self.answered_: list[tuple[InferenceRequest, InferenceAnswer]] = []

    def answered(self, request: InferenceRequest, answer: InferenceAnswer) -> None:
        self.answered_.append((request, answer))

    def keys_read(self, *args: Any) -> None:
        raise AssertionError("no keys were sent")


def _plane(observer: Observer) -> DataPlane:
    models: Any = SimpleNamespace(services=dict)
    fanout: Any = None  # Echo calls no service
    gateway: Any = Fits()
    return DataPlane(models, gateway, fanout, observer, TimeoutPolicy.ALL_OR_NOTHING, "iris")


def test_a_model_of_any_kind_is_run_with_its_own_deadline_and_policy_and_reported_once() -> None:
    observer, model = Observer(), Echo()
    rows = np.ones((3, 2), dtype=np.float32)
    request = InferenceRequest(
        "echo",
        "/test",
        "id-1",
        started=100.0,
        deadline=101.0,
        inputs=rows,
        target=model,
    )
    answer = asyncio.run(_plane(observer).infer(request))
    ((x, deadline, policy),) = model.runs
    assert x is rows and deadline == 100.05  # its own 50 ms, shorter than the request's second
    assert policy is TimeoutPolicy.PARTIAL  # its own, the client having asked for none
    assert answer.target is model
    assert answer.rows == 3 and not answer.one_row
    assert answer.outputs is not None and answer.outputs["echo"].shape == (3, 2)
    assert observer.answered_ == [(request, answer)]


def test_the_clients_policy_and_shorter_deadline_win_over_the_models() -> None:
    observer, model = Observer(), Echo()
    request = InferenceRequest(
        "echo", "/test", "id-2", started=100.0, deadline=100.01, policy=TimeoutPolicy.ALL_OR_NOTHING,
        inputs=np.ones((1, 2), dtype=np.float32), target=model,
    )  # fmt: skip
    answer = asyncio.run(_plane(observer).infer(request))
    ((_, deadline, policy),) = model.runs
    assert deadline == 100.01 and policy is TimeoutPolicy.ALL_OR_NOTHING and answer.one_row
