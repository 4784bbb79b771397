"""Tensor contracts read from Triton: unit tests, and the real metadata of every served model."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from client_proxy import Service
from client_proxy.core.contracts import Contract
from local_triton import TritonServer, models_in
from training import CLASS_NAMES, wine

from .conftest import MODEL_REPOSITORY
from .helpers import running_proxy, settings, triton_stats


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_served_model_has_a_contract_that_matches_its_config(
    triton: TritonServer, protocol: str
) -> None:
    """The real metadata and config of every model in the repository, over both protocols."""
    if protocol == "http":
        client = httpclient.InferenceServerClient(triton.http_url)
        read = lambda name: (client.get_model_metadata(name), client.get_model_config(name))  # noqa: E731
    else:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        read = lambda name: (  # noqa: E731
            client.get_model_metadata(name, as_json=True),
            client.get_model_config(name, as_json=True)["config"],
        )
    contracts = {name: Contract.from_triton(*read(name)) for name in models_in(MODEL_REPOSITORY)}
    client.close()
    for name in CLASS_NAMES:
        assert contracts[name].inputs[0].shape == (4,) and contracts[name].output(name).shape == (2,)
    for m in wine.MODELS:
        contract = contracts[m.name]
        datatype = "FP64" if m.dtype == np.float64 else "FP32"
        assert [(t.name, t.datatype, t.shape) for t in contract.inputs] == [(m.input_name, datatype, (13,))]
        assert contract.output(m.name).name == m.output_name
        assert contract.class_names == wine.WINE_CLASSES
        spec, rows = contract.input_rows(m.name, wine.load()[0][:5].tolist())
        assert spec.name == m.input_name and rows.dtype == m.dtype


def test_the_proxy_calls_a_model_by_the_tensors_triton_describes(explicit_triton: TritonServer) -> None:
    """No tensor name or datatype is assumed: `renamed` takes 'features' FP64 and gives 'scores'."""
    services = [
        Service("setosa", "grpc", explicit_triton.grpc_url, "setosa"),
        Service("renamed", "grpc", explicit_triton.grpc_url, "renamed"),
    ]
    rows = [[1.0, 2.0, 3.0, 4.0], [5.1, 3.5, 1.4, 0.2]]
    with running_proxy(settings(), services) as url:
        body = httpx.post(f"{url}/predict", json={"data": rows}).json()
    p = 1 / (1 + np.exp(-(np.asarray(rows).sum(axis=1) - 10)))
    np.testing.assert_allclose(body["renamed"]["prediction"], np.stack([p, 1 - p], axis=1), atol=1e-6)
    assert len(body["setosa"]["prediction"]) == 2


def test_rows_that_do_not_fit_a_services_model_are_a_422_before_any_call(
    explicit_triton: TritonServer, triton: TritonServer
) -> None:
    # wine_logreg takes 13 features: the seed's 4-feature rows do not fit it.
    services = [
        Service("setosa", "grpc", explicit_triton.grpc_url, "setosa"),
        Service("wine", "grpc", triton.grpc_url, "wine_logreg"),
    ]
    with running_proxy(settings(), services) as url:
        before = triton_stats(triton, ("wine_logreg",))
        for path in ("/predict", "/predict/label", "/predict/stream"):
            response = httpx.post(f"{url}{path}", json={"data": [[1.0, 2.0, 3.0, 4.0]]})
            assert response.status_code == 422, (path, response.text)
            message = response.json()["error"]["message"]
            assert message == "wine: expects input 'measurements' FP64 [N, 13], got rows of shape [1, 4]"
        assert triton_stats(triton, ("wine_logreg",)) == before  # nothing was sent to it
