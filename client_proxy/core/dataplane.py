"""The dataplane: one path for every inference request, whichever door it came by.

A door (the seed's JSON routes, ``/compositions/...``, ``/pipelines/...``, the Open Inference
Protocol over HTTP and over gRPC) converts what it received into an ``InferenceRequest``, calls
``DataPlane.infer`` (or ``stream``), and renders the ``InferenceAnswer`` it gets back. What
happens in between happens here, once, for every door:

1. the model is looked up by name (a composition, ``default`` and ``iris_fanout`` being the
   ``SERVICE_*`` one, a pipeline, or a service; 404 otherwise; a door that cannot read a
   request looks it up before saying so, so that an unknown model is a 404 whatever the body).
   Whichever it is, it is a ``served.Model``: the steps below ask each the same questions;
2. its deadline and timeout policy: the door's (the client's, within ``PROXY_DEADLINE_MS``),
   shortened by a composition's own ``deadline_ms``; the policy the client asked for, else the
   composition's, else ``PROXY_TIMEOUT_POLICY``;
3. the input: rows or named tensors as sent, the protocol's named tensors mapped onto the
   model's inputs, or keys read from the feature store (or forwarded as they are);
4. the input checked against the models' contracts (422 before any call);
5. the run, the model's own (``Model.run``): the fan-out and the aggregator (a composition), the
   steps (a pipeline), one call (a service), or Triton's own ensemble (``Ensemble``, the seed's
   ``?route=ensemble``); the rules' alerts;
6. the request log line and the metrics, by the ``Observer``.

An experiment (``experiments.py``) is found in step 1 like a model; the variant that answers is
chosen there (``Experiment.choose``) and is the model from then on. Once it has answered, copies
go to the experiment's shadows (``shadows.py``), off the request's path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from client_proxy.core.aggregators import Aggregated
from client_proxy.core.compositions import Composition
from client_proxy.core.experiments import Experiment, Variant
from client_proxy.core.fanout import FanOut
from client_proxy.core.features import FeatureStore, Fetched, fetch_rows
from client_proxy.core.outcomes import FanOutResult, Outcome
from client_proxy.core.pipelines import PipelineResult
from client_proxy.core.rules import Alert, AlertSink
from client_proxy.core.served import Gateway, Kind, Model, Served, ServedModels
from client_proxy.core.services import OwnNothing, Service, TimeoutPolicy, time_left
from client_proxy.core.shadows import ShadowJob, Shadows
from client_proxy.core.tensors import Inputs, row_count
from client_proxy.errors import (
    FeatureStoreError,
    FeatureStoreTimeout,
    InvalidInput,
    NoFeatureStore,
    ProxyError,
    UnknownKeys,
)


@dataclass(slots=True)
class InferenceRequest:
    """One inference request, as every door hands it to the dataplane (which does not change
    it). Not frozen: a frozen dataclass's ``__init__`` costs three times as much, per request."""

    model: str
    """A composition (``default``: the seed's routes), a pipeline or a service."""
    endpoint: str
    """The door's route (a template, ``/compositions/{name}/label``), as the log and metrics name it."""
    request_id: str
    started: float
    """``time.monotonic()`` when the request arrived."""
    deadline: float
    """The door's deadline (``time.monotonic()``): ``PROXY_DEADLINE_MS``, or less as the client asked."""
    policy: TimeoutPolicy | None = None
    """As the client asked; None: the composition's, else ``PROXY_TIMEOUT_POLICY``."""
    inputs: Inputs | None = None
    """Rows, or named tensors, to send as they are."""
    tensors: Mapping[str, NDArray[Any]] | None = None
    """The Open Inference Protocol's named tensors, mapped onto the model's inputs here."""
    keys: Sequence[str] | None = None
    """Keys whose rows the feature store holds (or which go to the models, ``keys: forward``)."""
    outputs: Sequence[str] | None = None
    """The outputs asked for (the Open Inference Protocol's); None: all."""
    ensemble: bool = False
    """Answer with one call to Triton's own ensemble rather than the default composition."""
    kind: Kind | None = None
    """Only a model of this kind (the door's path says it: ``/pipelines/...``); None: any."""
    target: Model | None = None
    """The model, when the door has it already (the compositions' label door reads its
    aggregator first); None: looked up here (404 for an unknown one)."""
    variant: str | None = None
    """The variant the client asked for (``X-Variant``), for an experiment that allows it."""
    variant_key: str | None = None
    """What keeps a caller on one variant of an experiment (``PROXY_VARIANT_HEADER``)."""


@dataclass(slots=True)
class InferenceAnswer:
    """What the dataplane gives back, for each door to render."""

    target: Model
    policy: TimeoutPolicy
    rows: int
    one_row: bool = False
    """One row: the seed's shapes answer it with an object rather than a list of one."""
    result: FanOutResult | None = None
    """A composition's (or the ensemble's) service calls: each one's outcome."""
    aggregated: Aggregated | None = None
    """A composition's answer per row (None with ``aggregator: none``)."""
    classes: tuple[str, ...] = ()
    alerts: tuple[Alert, ...] = ()
    report: PipelineResult | None = None
    """A pipeline's answer, path and calls."""
    outputs: dict[str, NDArray[Any]] | None = None
    """A service's outputs, passed through."""
    fetched: Fetched | None = None
    """For a request by key: the keys of the rows, and those the store did not hold."""
    served: Served | None = None
    """For the Open Inference Protocol: the model as the protocol shows it."""
    error: ProxyError | None = None
    """A stream's last word when it could not be answered (``infer`` raises instead)."""
    outcomes: Collection[Outcome] = ()
    """Every service call's outcome, in order."""
    experiment: Experiment | None = None
    """The experiment the request named (``experiments.py``); None: it named no experiment."""
    variant: Variant | None = None
    """The experiment's variant that answered."""

    @property
    def partial(self) -> bool:
        return bool(self.result is not None and self.result.partial)


class Observer(Protocol):
    """Where the dataplane reports each request (``observability.RequestObserver``)."""

    def answered(self, request: InferenceRequest, answer: InferenceAnswer) -> None:
        """An answer given: the request log line, the partial-answer counter."""

    def keys_read(self, store: str, outcome: str, fetched: Fetched | None, missing: int) -> None:
        """A feature-store lookup: ``ok``, ``timeout`` or ``unavailable``; keys found and missing."""

    def variant_answered(self, experiment: str, variant: str, seconds: float) -> None:
        """An experiment's variant answered a request (its run took ``seconds``)."""


EnsembleCall = Callable[[Service, Inputs, str, float], Awaitable[NDArray[Any]]]


@dataclass(frozen=True, slots=True)
class Ensemble(OwnNothing):
    """Triton's own fan-out (the seed's ``?route=ensemble``): one call to its ensemble model,
    bounded and recorded like a service call, its rows ``[label, proba]`` the answer."""

    service: Service
    call: EnsembleCall
    kind: ClassVar[Literal["ensemble"]] = "ensemble"
    features: ClassVar[None] = None
    keys: ClassVar[str] = "fetch"

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def description(self) -> str:
        return f"Triton's ensemble {self.service.model}"

    def inputs_go_to(self) -> tuple[Service, ...]:
        return ()  # Triton checks the ensemble's input

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        service, call, request_id = self.service, self.call, request.request_id
        rows, outcome = await plane.fanout.call_alone(
            service, lambda budget: call(service, x, request_id, budget), deadline
        )
        answer.outcomes = (outcome,)
        answer.aggregated = Aggregated(rows[:, 0].tolist(), rows[:, 1].astype(np.float64))


class DataPlane:
    """Runs every inference request: see the module's docstring for the steps. What a model's
    run calls the services through: ``fanout``, ``gateway``, ``sink`` (the rules' alerts)."""

    def __init__(
        self,
        models: ServedModels,
        gateway: Gateway,
        fanout: FanOut,
        observer: Observer,
        default_policy: TimeoutPolicy,
        feature_set: str,
        store: FeatureStore | None = None,
        sink: AlertSink | None = None,
        ensemble: Ensemble | None = None,
        shadows: Shadows | None = None,
    ) -> None:
        """``ensemble``: Triton's own ensemble, answering the seed's ``?route=ensemble``;
        ``shadows``: what runs the experiments' shadows (None: a shadow's plane, which has none)."""
        self.models = models
        self.gateway = gateway
        self.fanout = fanout
        self._observer = observer
        self._default_policy = default_policy
        self._feature_set = feature_set
        self.store = store
        self.sink = sink
        self._ensemble = ensemble
        self.shadows = shadows

    # -- one request -------------------------------------------------------------------------
    async def infer(self, request: InferenceRequest) -> InferenceAnswer:
        """The answer to ``request``; a ``ProxyError`` (4xx/5xx) when it cannot be given."""
        model, answer, x, deadline = await self._prepare(request)
        if answer.experiment is None:
            await model.run(self, answer, x, request, deadline)
            self._observer.answered(request, answer)
            return answer
        started = time.monotonic()
        await model.run(self, answer, x, request, deadline)
        self._observer.answered(request, answer)
        self._experimented(request, answer, x, started)
        return answer

    def _experimented(
        self, request: InferenceRequest, answer: InferenceAnswer, x: Inputs, started: float
    ) -> None:
        """An experiment's variant answered: counted, and copies to the shadows it has."""
        experiment, variant = answer.experiment, answer.variant
        assert experiment is not None and variant is not None
        self._observer.variant_answered(experiment.name, variant.name, time.monotonic() - started)
        shadows = self.shadows
        if shadows is not None:
            for shadow in experiment.shadows_for(variant):
                shadows.offer(ShadowJob(experiment, variant, shadow, x, answer, request))

    async def stream(self, request: InferenceRequest) -> tuple[InferenceAnswer, AsyncIterator[Outcome]]:
        """A composition's answer, to be filled, and its services' outcomes the moment each
        arrives; once they are all read the answer is complete (its ``error`` set when it cannot
        be given). Under ``all_or_nothing`` the first failure ends them."""
        model, answer, x, deadline = await self._prepare(request)
        if not isinstance(model, Composition):
            raise InvalidInput(f"{request.model!r} is a {model.kind}: only a composition streams")
        return answer, self._stream(request, model, answer, x, deadline, time.monotonic())

    async def _stream(
        self,
        request: InferenceRequest,
        composition: Composition,
        answer: InferenceAnswer,
        x: Inputs,
        deadline: float,
        started: float,
    ) -> AsyncIterator[Outcome]:
        arrived: dict[str, Outcome] = {}
        fail_fast = answer.policy is TimeoutPolicy.ALL_OR_NOTHING
        services = composition.services
        async with aclosing(self.fanout.stream(services, x, request.request_id, deadline)) as outcomes:
            async for outcome in outcomes:
                arrived[outcome.service] = outcome
                yield outcome
                if fail_fast and not outcome.ok:
                    break
        result = FanOutResult.of({s.name: arrived[s.name] for s in services if s.name in arrived})
        try:
            await composition.answer_from(result, self, answer, x, request.request_id, deadline)
        except ProxyError as exc:
            answer.error = exc
        else:
            self._observer.answered(request, answer)
            if answer.experiment is not None:
                self._experimented(request, answer, x, started)

    # -- the steps ---------------------------------------------------------------------------
    async def _prepare(self, request: InferenceRequest) -> tuple[Model, InferenceAnswer, Inputs, float]:
        """The model, its answer to fill, its input (checked against its contracts) and deadline."""
        model: Model
        if request.ensemble:
            if self._ensemble is None:
                raise InvalidInput("no ensemble is configured (PROXY_ENSEMBLE)")
            model = self._ensemble
        else:
            model = request.target or self.models.find(request.model, request.kind)
        experiment = variant = None
        if isinstance(model, Experiment):
            experiment = model
            key = request.variant_key
            if key is None and request.keys:
                key = request.keys[0]
            variant = experiment.choose(request.variant, key)
            model = variant.model
        elif request.variant is not None:
            raise InvalidInput(f"X-Variant: {request.model!r} is not an experiment: it has no variants")
        deadline = request.deadline
        if model.deadline_ms is not None:
            deadline = min(deadline, request.started + model.deadline_ms / 1000)
        policy = request.policy or model.timeout_policy or self._default_policy
        answer = InferenceAnswer(model, policy, 0, experiment=experiment, variant=variant)
        x = (
            request.inputs
            if request.inputs is not None
            else await self._input(request, model, answer, deadline)
        )
        answer.rows = row_count(x)
        answer.one_row = answer.rows == 1
        served = answer.served  # described (named tensors): its services known
        services = served.services if served is not None else model.inputs_go_to()
        if not self.gateway.fits(services, x):
            await self.gateway.ensure_fit(services, x, time_left(deadline))
        return model, answer, x, deadline

    async def _input(
        self, request: InferenceRequest, model: Model, answer: InferenceAnswer, deadline: float
    ) -> Inputs:
        if request.keys is not None:
            keys = list(request.keys)
            if model.keys == "forward":
                rows = np.empty((len(keys), 1), dtype=np.object_)
                rows[:, 0] = keys
                answer.fetched = Fetched(np.empty((0, 0)), keys)
                return rows
            feature_set = model.features or self._feature_set
            answer.fetched = await self._lookup(feature_set, keys, deadline, answer.policy)
            return answer.fetched.rows
        if request.tensors is None:
            raise InvalidInput("the request has no inputs")
        answer.served, x = await self.models.read_tensors(
            request.model, model, request.tensors, request.outputs, time_left(deadline)
        )
        return x

    async def _lookup(
        self, feature_set: str, keys: list[str], deadline: float, policy: TimeoutPolicy
    ) -> Fetched:
        """The rows of ``keys`` in ``feature_set``, within the deadline, reported."""
        store = self.store
        if store is None:
            raise NoFeatureStore("this proxy has no feature store: set PROXY_FEATURE_STORE to send keys")
        observer = self._observer
        try:
            fetched = await fetch_rows(store, feature_set, keys, deadline, policy)
        except FeatureStoreTimeout:
            observer.keys_read(store.kind, "timeout", None, 0)
            raise
        except FeatureStoreError:
            observer.keys_read(store.kind, "unavailable", None, 0)
            raise
        except UnknownKeys as exc:
            observer.keys_read(store.kind, "ok", None, exc.details.get("count", 0))
            raise
        observer.keys_read(store.kind, "ok", fetched, len(fetched.missing))
        return fetched
