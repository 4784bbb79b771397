"""The models the proxy serves over the Open Inference Protocol (KServe v2), transport-free.

Every composition (the default one also as ``iris_fanout``), every pipeline and every service
is a model a v2 client can ask for its metadata and configuration and call. What each looks
like:

- a composition with an aggregator: the inputs its services share (one ``input`` for the Iris
  fan-out, exactly as Triton's ``iris_ensemble``), and the outputs of ``iris_ensemble``:
  ``scores`` FP32 ``[N, classes]``, ``label`` INT64 ``[N, 1]`` (the class index), ``proba``
  FP32 ``[N, 1]`` and ``class_name`` BYTES ``[N, 1]``; with ``aggregator: none``, each service's
  output as a tensor named after the service;
- a pipeline: ``class_name``, ``proba`` and ``stopped_at`` (``[N, 1]`` each), ``scores`` when its
  aggregator gives them;
- a service: its model's own inputs and outputs, called through the proxy (deadline, request
  id, metrics).

How an answer becomes the protocol's tensors is ``client_proxy.api.oip.outputs_of``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from client_proxy.core.compositions import Composition
from client_proxy.core.contracts import Contract, ContractMismatch
from client_proxy.core.experiments import Experiment
from client_proxy.core.services import Service, TimeoutPolicy
from client_proxy.core.tensors import Inputs
from client_proxy.errors import (
    InvalidInput,
    ProxyError,
    UnknownComposition,
    UnknownPipeline,
    UpstreamError,
)

if TYPE_CHECKING:
    from client_proxy.core.dataplane import DataPlane, InferenceAnswer, InferenceRequest
    from client_proxy.core.declared import Configuration

#: Version every served model reports (the proxy's models have one).
VERSION = "1"
DEFAULT_ALIAS = "iris_fanout"

Kind = Literal["composition", "pipeline", "service", "ensemble"]


class Model(Protocol):
    """A model the proxy serves, whatever it is: a composition, a pipeline, a service (passed
    through), or Triton's own ensemble (``dataplane.Ensemble``). The dataplane asks each the
    same questions and runs each the same way, never asking which one it is."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> Kind: ...

    @property
    def description(self) -> str: ...

    @property
    def deadline_ms(self) -> float | None:
        """Its own deadline, shortening the request's; None: the request's."""

    @property
    def timeout_policy(self) -> TimeoutPolicy | None:
        """Its own policy, unless the client asked for one; None: ``PROXY_TIMEOUT_POLICY``."""

    @property
    def features(self) -> str | None:
        """The feature set a request by key reads; None: ``PROXY_FEATURE_SET``."""

    @property
    def keys(self) -> str:
        """``fetch`` (the proxy reads the keys' rows) or ``forward`` (its services get the keys)."""

    @property
    def min_answers(self) -> int:
        """How many of its services' models must be ready for it to be."""

    def inputs_go_to(self) -> Sequence[Service]:
        """The services a request's input goes to as it is (and is checked against)."""

    async def run(
        self, plane: DataPlane, answer: InferenceAnswer, x: Inputs, request: InferenceRequest, deadline: float
    ) -> None:
        """Answers ``x`` by ``deadline`` (the services called through ``plane``), into ``answer``."""


class UnknownModel(ProxyError):
    status_code = 404
    code = "unknown_model"


class Gateway(Protocol):
    """What the v2 models need of the Triton side (``TritonGateway``)."""

    def fits(self, services: Sequence[Service], x: Inputs) -> bool: ...

    async def ensure_fit(self, services: Sequence[Service], x: Inputs, timeout: float) -> None: ...

    async def class_names(self, service: Service, x: Inputs, timeout: float) -> tuple[str, ...]: ...

    async def contract(self, service: Service, timeout: float) -> Contract: ...

    def known_contracts(self, services: Sequence[Service]) -> list[Contract | None]: ...

    async def call(
        self, service: Service, x: Inputs, request_id: str, timeout: float, outputs: tuple[str, ...]
    ) -> dict[str, NDArray[Any]]: ...

    async def model_ready(self, service: Service, timeout: float) -> bool: ...


@dataclass(frozen=True)
class Tensor:
    """A tensor's name, datatype and shape as the protocol shows them (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def config(self, batched: bool) -> dict[str, Any]:
        datatype = "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"
        return {
            "name": self.name,
            "data_type": datatype,
            "dims": list(self.shape[1:] if batched else self.shape),
        }


@dataclass(frozen=True)
class Served:
    """One model of the v2 door: what it is, and what it takes and gives."""

    name: str
    kind: Kind
    target: Model
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    services: Sequence[Service] = ()
    """The services its input goes to as it is (``Model.inputs_go_to``), as it was described."""

    @property
    def platform(self) -> str:
        return f"proxy_{self.kind}"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def config(self) -> dict[str, Any]:
        batched = self.max_batch_size > 0
        return {
            "name": self.name,
            "platform": self.platform,
            "backend": "",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.max_batch_size,
            "input": [t.config(batched) for t in self.inputs],
            "output": [t.config(batched) for t in self.outputs],
            "parameters": {"description": {"string_value": self.target.description}},
        }

    def input_of(self, tensors: Mapping[str, NDArray[Any]]) -> Inputs:
        """The protocol's named tensors as this model's input: rows for a model (or models) of one
        input, else the named tensors; a missing input is refused as Triton refuses it."""
        for tensor in self.inputs:
            if tensor.name not in tensors:
                raise InvalidInput(
                    f"expected {len(self.inputs)} inputs but got {len(tensors)} inputs for model "
                    f"'{self.name}': missing '{tensor.name}'"
                )
        if self.kind == "service" or len(self.inputs) != 1:
            return dict(tensors)
        return tensors[self.inputs[0].name]


# -- what each model looks like ------------------------------------------------------------------
def _batched_shape(spec_shape: tuple[int, ...], batched: bool) -> tuple[int, ...]:
    return (-1, *spec_shape) if batched else spec_shape


async def _contracts(gateway: Gateway, services: Sequence[Service], timeout: float) -> list[Contract | None]:
    """The services' contracts, read now where not known (None where Triton cannot say)."""
    known = gateway.known_contracts(services)
    if None not in known:
        return known  # the usual case: no task per service

    async def one(service: Service, contract: Contract | None) -> Contract | None:
        if contract is not None:
            return contract
        try:
            return await gateway.contract(service, timeout)
        except UpstreamError:
            return None

    return list(await asyncio.gather(*(one(s, c) for s, c in zip(services, known, strict=True))))


def _shared_inputs(contracts: Sequence[Contract | None]) -> tuple[tuple[Tensor, ...], int, bool]:
    """The inputs a set of models takes together, their max_batch_size, and whether the request
    is rows (every model has one input of one shape: one tensor, sent to each as rows)."""
    known = [c for c in contracts if c is not None]
    if not known:
        return (Tensor("input", "FP32", (-1, -1)),), 0, True
    batch = min((c.max_batch_size for c in known if c.batched), default=0)
    batched = all(c.batched for c in known)
    singles = all(len(c.inputs) == 1 for c in known)
    if singles and len({c.inputs[0].shape for c in known}) == 1:
        first = known[0].inputs[0]
        names = {c.inputs[0].name for c in known}
        name = first.name if len(names) == 1 else "input"
        return (Tensor(name, first.datatype, _batched_shape(first.shape, batched)),), batch, True
    tensors: dict[str, Tensor] = {}
    for contract in known:
        for spec in contract.inputs:
            tensors.setdefault(
                spec.name, Tensor(spec.name, spec.datatype, _batched_shape(spec.shape, batched))
            )
    return tuple(tensors.values()), batch, False


def _output_shape(contract: Contract | None, service: Service) -> tuple[int, ...] | None:
    if contract is None:
        return None
    try:
        return contract.output(service.name, service.output).shape
    except ContractMismatch:
        return None


def _class_count(composition: Composition, contracts: Sequence[Contract | None]) -> int:
    if composition.aggregator == "one_vs_rest":
        return len(composition.members)
    widths = {
        int(np.prod(shape))
        for s, c in zip(composition.services, contracts, strict=True)
        if (shape := _output_shape(c, s)) is not None and shape and min(shape) > 0
    }
    return widths.pop() if len(widths) == 1 else -1


def _label_outputs(classes: int) -> tuple[Tensor, ...]:
    return (
        Tensor("scores", "FP32", (-1, classes)),
        Tensor("label", "INT64", (-1, 1)),
        Tensor("proba", "FP32", (-1, 1)),
        Tensor("class_name", "BYTES", (-1, 1)),
    )


_PIPELINE_OUTPUTS = (
    Tensor("class_name", "BYTES", (-1, 1)),
    Tensor("proba", "FP32", (-1, 1)),
    Tensor("stopped_at", "BYTES", (-1, 1)),
)


class ServedModels:
    """Every model the proxy serves, looked up by name in the configuration now in place
    (``declared.Configuration``: a reload or an admin change swaps it whole), and how each looks
    over the Open Inference Protocol."""

    def __init__(self, gateway: Gateway, config: Configuration) -> None:
        self._gateway = gateway
        self.config = config
        """The configuration now: read once per lookup; replaced, never changed (``swap``)."""
        self._described: dict[tuple[str, str], tuple[Any, Served]] = {}
        """By the name asked for and the model that answers it (an experiment's variants each)."""

    def swap(self, config: Configuration) -> Configuration:
        """Puts ``config`` in place for the next lookups (requests already running keep the
        models they found); the one it replaces is returned."""
        old, self.config = self.config, config
        served = {DEFAULT_ALIAS, "default", *config.compositions, *config.pipelines, *config.by_name}
        served.update(config.experiments)
        for key in [k for k in self._described if k[0] not in served]:
            del self._described[key]
        return old

    def find(self, name: str, kind: Kind | None = None) -> Model:
        """The model ``name``: a composition (``default``, and ``iris_fanout`` to the protocol: the
        default one), a pipeline or a service, in that order, or only of ``kind``; 404 otherwise
        (``UnknownComposition`` and ``UnknownPipeline`` naming the known ones, for their doors)."""
        config = self.config
        if config.experiments:
            experiment = config.experiments.get("default" if name == DEFAULT_ALIAS and kind is None else name)
            if experiment is not None and kind in (None, experiment.kind):
                return experiment
        if kind in (None, "composition"):
            if name in config.compositions:
                return config.compositions[name]
            if name == "default" or (name == DEFAULT_ALIAS and kind is None):
                return config.default
        if kind in (None, "pipeline") and name in config.pipelines:
            return config.pipelines[name]
        if kind in (None, "service") and name in config.by_name:
            return config.by_name[name]
        if kind == "composition":
            known = ", ".join(sorted({*config.compositions, "default"}))
            raise UnknownComposition(f"no composition {name!r} (known: {known})")
        if kind == "pipeline":
            known = ", ".join(sorted(config.pipelines)) or "none"
            raise UnknownPipeline(f"no pipeline {name!r} (known: {known})")
        raise UnknownModel(f"Request for unknown model: '{name}' is not found")

    def names(self) -> list[str]:
        config = self.config
        names = [DEFAULT_ALIAS, *config.compositions, *config.pipelines, *config.by_name]
        return list(dict.fromkeys([*names, *config.experiments]))

    async def read_tensors(
        self,
        name: str,
        target: Model,
        tensors: Mapping[str, NDArray[Any]],
        outputs: Sequence[str] | None,
        timeout: float,
    ) -> tuple[Served, Inputs]:
        """The model as the protocol shows it, and the request's named ``tensors`` mapped onto its
        inputs; 400 for an output it does not give."""
        served = await self.describe(name, timeout, target)
        if outputs is not None:
            known = {t.name for t in served.outputs}
            unknown = [o for o in outputs if o not in known]
            if unknown:
                raise InvalidInput(f"unexpected inference output '{unknown[0]}' for model '{name}'")
        return served, served.input_of(tensors)

    async def describe(self, name: str, timeout: float, target: Model | None = None) -> Served:
        """What the model takes and gives, from its services' contracts (kept while they are);
        ``target``: the model, already looked up (``find``)."""
        if target is None:
            target = self.find(name)
        if isinstance(target, Experiment):  # shown as its primary; each variant as itself
            target = target.primary.model
        kind = target.kind
        services = target.inputs_go_to()
        contracts = await _contracts(self._gateway, services, timeout)
        key = (target, tuple(map(id, services)), tuple(map(id, contracts)))
        cached = self._described.get((name, target.name))
        if cached is not None and cached[0] == key:
            return cached[1]
        if isinstance(target, Service):
            contract = contracts[0]
            if contract is None:
                contract = await self._gateway.contract(target, timeout)  # raises, naming the service
            batched = contract.batched
            inputs = tuple(
                Tensor(t.name, t.datatype, _batched_shape(t.shape, batched)) for t in contract.inputs
            )
            outputs = tuple(
                Tensor(t.name, t.datatype, _batched_shape(t.shape, batched)) for t in contract.outputs
            )
            served = Served(name, kind, target, inputs, outputs, contract.max_batch_size, services)
        elif isinstance(target, Composition):
            inputs, batch, _ = _shared_inputs(contracts)
            if target.aggregator == "none":
                outputs = tuple(
                    Tensor(s.name, "FP32", (-1, *(_output_shape(c, s) or (-1,))))
                    for s, c in zip(services, contracts, strict=True)
                )
            else:
                outputs = _label_outputs(len(target.classes) or _class_count(target, contracts))
            served = Served(name, kind, target, inputs, outputs, batch, services)
        else:
            inputs, batch, _ = _shared_inputs(contracts)
            served = Served(name, kind, target, inputs, _PIPELINE_OUTPUTS, batch, services)
        self._described[(name, target.name)] = (key, served)
        return served

    async def ready(self, name: str, timeout: float) -> bool:
        """Ready when enough of its services' models are (a composition: ``min_answers``)."""
        target = self.find(name)
        services = target.inputs_go_to()

        async def one(service: Service) -> bool:
            try:
                return await self._gateway.model_ready(service, timeout)
            except UpstreamError:
                return False

        ready = sum(await asyncio.gather(*(one(s) for s in services)))
        return ready >= max(target.min_answers, 1)
