"""The one place that talks to Triton: what the rest of the proxy asks of the Triton side.

It is made of parts that each do one job, and says what they do together:

- ``clients``: one async tritonclient per Triton server and protocol (``clients.py``);
- ``routing``: which replica takes a call, retry, hedging, ejection (``routing.py``);
- ``contracts``: what each model takes and gives, read from Triton, the plan of a call, whether an
  input fits, the class names (``contracts.py``);
- errors: every tritonclient, aiohttp and grpc exception is translated into an ``UpstreamError``
  subclass by its status code (``errors.py``); nothing above this package sees a foreign one.

No tensor name is written here: each is read from the model's contract.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_proxy.config import Settings
from client_proxy.core.contracts import ContractMismatch
from client_proxy.core.services import Service, Target
from client_proxy.core.tensors import Inputs, row_count
from client_proxy.errors import UpstreamError
from client_proxy.triton.clients import Client, Clients
from client_proxy.triton.contracts import ContractBook, label_outputs
from client_proxy.triton.errors import translate
from client_proxy.triton.replicas import Listener
from client_proxy.triton.routing import Routing


class TritonGateway:
    """Calls the models behind the services. Shared by every request of one app."""

    def __init__(
        self,
        settings: Settings,
        listener: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: what the routing's deadlines, hedges and ejections are timed by."""
        self.clients = Clients(settings)
        self.routing = Routing(settings, self.clients, listener, clock)
        # Late-bound: a test may stand in for the metadata read.
        self.contracts = ContractBook(lambda s, t: self.model_description(s, t), self.routing)
        # What the parts answer alone, bound once (``fits`` is asked on every request).
        book = self.contracts
        self.fits = book.fits
        self.ensure_fit = book.ensure_fit
        self.contract = book.contract
        self.known_contracts = book.known
        self.class_names = book.class_names
        self.replicas = self.routing.replicas
        self.hedging = self.routing.hedging
        self.open = self.clients.open
        self.aclose = self.clients.aclose

    async def _send(
        self,
        service: Service,
        x: Inputs,
        request_id: str,
        timeout: float,
        outputs: tuple[str, ...] | None = None,
        output: str | None = None,
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """One inference of ``service``'s model on ``x``, routed to a replica: its ``outputs``
        (None: the one the service contributes, or ``output`` where it names none), and which
        those were. After a failure that may mean the model changed, its contract is read again."""
        book = self.contracts
        try:
            plan = book.planned(service) or await book.plan(service, timeout, output)
            if outputs is None:
                if plan.problem:
                    raise ContractMismatch(plan.problem)
                outputs = (plan.output_name,)
            tensors = book.tensors(service, plan, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = translate(exc, service)
            book.after_failure(service, error)
            raise error from exc
        wanted = outputs

        async def call(client: Client, target: Target, budget: float) -> dict[str, Any]:
            return await client.infer(target, tensors, request_id, budget, wanted)

        try:
            return await self.routing.call(service, timeout, call), wanted
        except UpstreamError as error:
            book.after_failure(service, error)
            raise

    async def infer(self, service: Service, x: Inputs, request_id: str, timeout: float) -> NDArray[Any]:
        """``service``'s output for the input ``x``, one Triton call, in the model's own tensors."""
        result, (name,) = await self._send(service, x, request_id, timeout)
        output = result[name]
        rows = row_count(x)
        if output is None or output.shape[0] != rows:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned no output of {rows} rows",
                service=service.name,
            )
        output = np.asarray(output, dtype=np.float32)
        if not np.isfinite(output).all():
            # Never pass NaN on (it would reach the client as null): the service failed these rows.
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return output

    async def call(
        self, service: Service, x: Inputs, request_id: str, timeout: float, outputs: tuple[str, ...]
    ) -> dict[str, NDArray[Any]]:
        """The model's ``outputs`` for ``x``, as Triton gives them (a pass-through call)."""
        result, _ = await self._send(service, x, request_id, timeout, outputs)
        missing = [name for name, value in result.items() if value is None]
        if missing:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' gave no {', '.join(missing)}", service=service.name
            )
        return result

    async def ensemble_rows(
        self, service: Service, x: Inputs, request_id: str, timeout: float
    ) -> NDArray[Any]:
        """``infer_ensemble``'s answer as one array, a row ``[label, probability]`` per input row
        (object dtype): the shape a ``Coalescer`` splits among the requests of a batched call."""
        assert isinstance(x, np.ndarray)  # the seed's rows: the ensemble takes one input
        names, proba = await self.infer_ensemble(service, x, request_id, timeout)
        rows = np.empty((len(names), 2), dtype=object)
        rows[:, 0] = names
        rows[:, 1] = proba
        return rows

    async def infer_ensemble(
        self, service: Service, x: NDArray[Any], request_id: str, timeout: float
    ) -> tuple[list[str], NDArray[np.float32]]:
        """A server-side ensemble's label and its probability per row, in one call. Read from
        its contract: the label is its one BYTES output, the probability its one floating-point
        output of one value per row (``class_name`` and ``proba`` for ``iris_ensemble``)."""
        try:
            label, proba = label_outputs(service, await self.contract(service, timeout))
        except UpstreamError as error:
            self.contracts.after_failure(service, error)
            raise
        out, _ = await self._send(service, x, request_id, timeout, (label, proba), output=label)
        names, scores = out.get(label), out.get(proba)
        if names is None or scores is None or names.shape[0] != x.shape[0]:
            raise UpstreamError(
                f"{service.name}: model '{service.model}' gave no {label}/{proba}", service=service.name
            )
        labels = [n.decode() if isinstance(n, bytes) else str(n) for n in names.reshape(-1)]
        values = np.asarray(scores, dtype=np.float32).reshape(-1)
        if not np.isfinite(values).all():
            raise UpstreamError(
                f"{service.name}: model '{service.model}' returned non-finite values", service=service.name
            )
        return labels, values

    async def model_ready(self, service: Service, timeout: float) -> bool:
        """Triton's per-model readiness, on any replica; raises ``UpstreamError`` when no replica's
        Triton can be asked."""
        answers = await asyncio.gather(
            *(self.replica_ready(service, t, timeout) for t in service.targets), return_exceptions=True
        )
        if any(a is True for a in answers):
            return True
        errors = [a for a in answers if isinstance(a, UpstreamError)]
        if len(errors) == len(answers):
            raise errors[0]
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
                raise answer
        return False

    async def replica_ready(self, service: Service, target: Target, timeout: float) -> bool:
        """One replica's readiness in its Triton."""
        try:
            return await self.clients(target).is_model_ready(target, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, service) from exc

    async def model_description(self, service: Service, timeout: float) -> dict[str, Any]:
        """Triton's metadata and config for the service's model (from one replica)."""

        async def describe(client: Client, target: Target, budget: float) -> dict[str, Any]:
            return {
                "metadata": await client.model_metadata(target, budget),
                "config": await client.model_config(target, budget),
            }

        return await self.routing.call(service, timeout, describe, "metadata")
