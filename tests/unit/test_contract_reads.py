"""The gateway reads a service's contract once however many requests ask at once (a cold
start's burst), with Triton's answer stood in for by a counting ``model_description``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from client_proxy.config import load_settings
from client_proxy.core.services import Service
from client_proxy.triton.gateway import TritonGateway

METADATA = {
    "name": "setosa",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
}
CONFIG = {"name": "setosa", "max_batch_size": 1024}


def _counting(gateway: TritonGateway, fail: bool = False) -> list[int]:
    reads = [0]

    async def model_description(service: Service, timeout: float) -> dict[str, Any]:
        reads[0] += 1
        await asyncio.sleep(0.05)
        if fail:
            raise RuntimeError("Triton said no")
        return {"metadata": METADATA, "config": CONFIG}

    gateway.model_description = model_description  # type: ignore[method-assign]
    return reads


def test_a_burst_of_requests_reads_a_contract_once() -> None:
    async def scenario() -> None:
        gateway = TritonGateway(load_settings())
        reads = _counting(gateway)
        service = Service("setosa", "grpc", "127.0.0.1:1", "setosa")
        contracts = await asyncio.gather(*(gateway.contract(service, 1.0) for _ in range(200)))
        assert reads == [1] and all(c is contracts[0] for c in contracts)
        await gateway.contract(service, 1.0)  # kept: no second read
        assert reads == [1]

    asyncio.run(scenario())


def test_a_failed_read_fails_every_waiter_and_the_next_request_reads_again() -> None:
    async def scenario() -> None:
        gateway = TritonGateway(load_settings())
        reads = _counting(gateway, fail=True)
        service = Service("setosa", "grpc", "127.0.0.1:1", "setosa")
        results = await asyncio.gather(
            *(gateway.contract(service, 1.0) for _ in range(20)), return_exceptions=True
        )
        assert reads == [1] and all(isinstance(r, RuntimeError) for r in results)
        with pytest.raises(RuntimeError):
            await gateway.contract(service, 1.0)
        assert reads == [2]

    asyncio.run(scenario())


def test_a_caller_that_gives_up_leaves_the_read_to_the_others() -> None:
    async def scenario() -> None:
        gateway = TritonGateway(load_settings())
        reads = _counting(gateway)
        service = Service("setosa", "grpc", "127.0.0.1:1", "setosa")
        first = asyncio.ensure_future(gateway.contract(service, 1.0))
        second = asyncio.ensure_future(gateway.contract(service, 1.0))
        await asyncio.sleep(0.01)
        first.cancel()
        contract = await second
        assert reads == [1] and contract.max_batch_size == 1024 and first.cancelled()

    asyncio.run(scenario())
