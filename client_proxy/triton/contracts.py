"""What each service's model takes and gives, as the Triton side keeps it: its ``Contract``
(read from Triton's metadata and config the first time the service is called, shared by the
requests of a cold start's burst, and read again after the model was unavailable or refused a
call, since it may come back as another version with other tensors), the plan of a call worked
out from it, whether an input fits, and the class names its output scores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_proxy.core.contracts import NUMPY_DTYPES, Contract, ContractMismatch
from client_proxy.core.services import Service, Target
from client_proxy.core.tensors import Inputs, row_count, signature, take_rows
from client_proxy.errors import CallCancelled, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from client_proxy.triton.clients import Client
from client_proxy.triton.errors import translate
from client_proxy.triton.routing import Routing

#: The pre-call check asks again for a contract it could not read (model unknown, Triton down)
#: after this long; the service's own call still tries every time.
CONTRACT_RETRY_S = 1.0

Describe = Callable[[Service, float], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Plan:
    """How to call one service's model, worked out once from its contract."""

    inputs: tuple[tuple[str, str, Any], ...]
    """Per model input: its name, datatype and numpy dtype (None: sent as given)."""
    output_name: str
    """The output the service contributes; empty when the model does not say (see ``problem``)."""
    problem: str = ""


class ContractBook:
    """The contracts, plans, fits and class names of every service's model."""

    def __init__(self, describe: Describe, routing: Routing) -> None:
        """``describe(service, timeout)``: Triton's ``{"metadata", "config"}`` for the model."""
        self._describe = describe
        self._routing = routing
        self._contracts: dict[Service, Contract] = {}
        self._plans: dict[Service, Plan] = {}
        #: When each contract was read.
        self._read_at: dict[Service, float] = {}
        #: Contracts being read: the requests of a cold start's burst share one read per service
        #: instead of each asking Triton (a 1,024-connection burst timed out hundreds of them).
        self._reading: dict[Service, asyncio.Future[Contract]] = {}
        #: Class names read from label files (``class_names``).
        self._labels: dict[Service, tuple[str, ...]] = {}
        #: When the pre-call check last failed to read a service's contract.
        self._unreadable: dict[Service, float] = {}
        #: (service, input signature) that fitted its model -> the model's max_batch_size (0: any).
        self._fits: dict[tuple[Service, Hashable], int] = {}

    async def contract(self, service: Service, timeout: float) -> Contract:
        """What ``service``'s model takes and gives, read from Triton once and then kept."""
        contract = self._contracts.get(service)
        if contract is not None:
            return contract
        reading = self._reading.get(service)
        if reading is None:
            reading = self._reading[service] = asyncio.ensure_future(self._read_contract(service, timeout))
            reading.add_done_callback(lambda done: self._read(service, done))
        return await asyncio.shield(reading)  # a caller that gives up leaves the read to the others

    async def _read_contract(self, service: Service, timeout: float) -> Contract:
        described = await self._describe(service, timeout)
        contract = Contract.from_triton(described["metadata"], described["config"])
        self._contracts[service] = contract
        self._read_at[service] = time.monotonic()
        return contract

    def _read(self, service: Service, done: asyncio.Future[Contract]) -> None:
        self._reading.pop(service, None)
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have given up already

    def known(self, services: Sequence[Service]) -> list[Contract | None]:
        """The contracts already read, None where not (no call to Triton)."""
        contracts = self._contracts
        return [contracts.get(service) for service in services]

    async def class_names(self, service: Service, x: Inputs, timeout: float) -> tuple[str, ...]:
        """The classes the service's output scores, in column order: its config's ``class_names``
        parameter, else its output's label file, read once with Triton's classification
        extension on one row of ``x`` (an input that fits the model); empty when it has neither."""
        contract = self._contracts.get(service) or await self.contract(service, timeout)
        if contract.class_names:
            return contract.class_names
        known = self._labels.get(service)
        if known is not None:
            return known
        output = contract.output(service.name, service.output)
        if not output.label_filename:
            return ()
        count = int(np.prod(output.shape)) if output.shape and min(output.shape) > 0 else 0
        if count == 0:
            return ()
        try:
            plan = self.planned(service) or await self.plan(service, timeout)
            tensors = self.tensors(service, plan, take_rows(x, np.arange(1)))
        except Exception as exc:
            raise translate(exc, service) from exc

        async def classify(client: Client, target: Target, budget: float) -> dict[str, Any]:
            return await client.infer(target, tensors, "", budget, (plan.output_name,), class_count=count)

        result = await self._routing.call(service, timeout, classify, "classify")
        labels = {}
        for entry in np.asarray(result[plan.output_name]).reshape(-1):
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            parts = text.split(":", 2)  # "score:index:label"
            if len(parts) == 3 and parts[1].isdigit() and parts[2]:
                labels[int(parts[1])] = parts[2]
        names = tuple(labels.get(i, "") for i in range(count))
        if not all(names):
            return ()  # a label file shorter than the output: no names rather than wrong ones
        self._labels[service] = names
        return names

    def forget(self, service: Service) -> None:
        """The contract may be stale: read it again before the next call."""
        self._contracts.pop(service, None)
        self._read_at.pop(service, None)
        self._labels.pop(service, None)
        self._plans.pop(service, None)
        self._fits = {fit: limit for fit, limit in self._fits.items() if fit[0] != service}

    def after_failure(self, service: Service, error: UpstreamError) -> None:
        """Unloaded, or Triton gone: the model may come back as another version, so its contract
        is read again. Refused for another reason: it may have been reloaded in place with other
        tensors (Triton swaps versions without a gap), so the contract is read again too, at most
        once per ``CONTRACT_RETRY_S`` (a model that keeps failing costs no extra call per request).
        A timeout says nothing about the contract."""
        stale = time.monotonic() - self._read_at.get(service, -1e9) >= CONTRACT_RETRY_S
        if isinstance(error, UpstreamUnavailable) or (
            stale and not isinstance(error, UpstreamTimeout | CallCancelled)
        ):
            self.forget(service)

    async def ensure_fit(self, services: Sequence[Service], x: Inputs, timeout: float) -> None:
        """Refuse (``ContractMismatch``, 422) an input that does not fit a service's model, before
        any inference call. Contracts not read yet are read now, concurrently and within
        ``timeout``; a service whose contract cannot be read now is left to fail (or not) on its
        own call."""
        # A contract that could not be read is not asked for again here for a second: the
        # service's own call reports it, and a missing model costs no extra calls per request.
        now = time.monotonic()
        unknown = [
            s
            for s in services
            if s not in self._contracts and now - self._unreadable.get(s, -1e9) >= CONTRACT_RETRY_S
        ]
        if unknown:
            try:
                async with asyncio.timeout(timeout):
                    results = await asyncio.gather(
                        *(self.contract(s, timeout) for s in unknown), return_exceptions=True
                    )
            except TimeoutError:
                results = []
            for service, result in zip(unknown, results, strict=False):
                if isinstance(result, BaseException):
                    self._unreadable[service] = now
        kind = signature(x)
        for service in services:
            contract = self._contracts.get(service)
            if contract is None:
                continue
            # Each raises ContractMismatch naming the service.
            if isinstance(x, np.ndarray):
                contract.input_rows(service.name, x)
            else:
                contract.input_tensors(service.name, x)
            self._fits[(service, kind)] = contract.max_batch_size if contract.batched else 0

    def fits(self, services: Sequence[Service], x: Inputs) -> bool:
        """True when inputs like this one already fitted every service's model: the hot path,
        with no need for ``ensure_fit``."""
        kind, n = signature(x), row_count(x)
        for service in services:
            limit = self._fits.get((service, kind))
            if limit is None or (limit and n > limit):
                return False
        return True

    def planned(self, service: Service) -> Plan | None:
        """The plan already worked out, if any (the hot path: no await)."""
        return self._plans.get(service)

    async def plan(self, service: Service, timeout: float, output: str | None = None) -> Plan:
        """How to call the service's model, worked out from its contract and kept; ``output``:
        the output to take where the service names none (an ensemble's label)."""
        contract = self._contracts.get(service) or await self.contract(service, timeout)
        try:
            name, problem = contract.output(service.name, service.output or output).name, ""
        except ContractMismatch as exc:  # several outputs, none named: only a pass-through call works
            name, problem = "", exc.message
        inputs = tuple((t.name, t.datatype, NUMPY_DTYPES.get(t.datatype)) for t in contract.inputs)
        plan = self._plans[service] = Plan(inputs, name, problem)
        return plan

    def tensors(self, service: Service, plan: Plan, x: Inputs) -> list[tuple[str, NDArray[Any], str]]:
        """The input tensors of one call, each in the model's datatype."""
        if isinstance(x, np.ndarray):
            if len(plan.inputs) != 1:
                names = ", ".join(name for name, _, _ in plan.inputs)
                raise ContractMismatch(
                    f"{service.name}: model '{service.model}' takes inputs {names}: send named tensors"
                )
            ((name, datatype, dtype),) = plan.inputs
            return [(name, x if dtype is None or x.dtype == dtype else x.astype(dtype), datatype)]
        tensors = []
        for name, datatype, dtype in plan.inputs:
            if name not in x:
                raise ContractMismatch(
                    f"{service.name}: model '{service.model}' needs input '{name}', not sent"
                )
            array = x[name]
            tensors.append(
                (name, array if dtype is None or array.dtype == dtype else array.astype(dtype), datatype)
            )
        return tensors


def label_outputs(service: Service, contract: Contract) -> tuple[str, str]:
    """An ensemble's label output (its one BYTES output) and probability output (its one
    floating-point output of one value per row)."""
    labels = [t.name for t in contract.outputs if t.datatype == "BYTES"]
    probas = [
        t.name for t in contract.outputs if t.datatype.startswith("FP") and int(np.prod(t.shape or (1,))) == 1
    ]
    if len(labels) != 1 or len(probas) != 1:
        raise UpstreamError(
            f"{service.name}: model '{service.model}' needs one BYTES output (the label) and one "
            f"floating-point output of one value per row (its probability); it has "
            f"{', '.join(t.describe(contract.batched) for t in contract.outputs)}",
            service=service.name,
        )
    return labels[0], probas[0]
