"""Tensor contracts read from Triton: unit tests, and the real metadata of every served model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

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


def test_a_model_reloaded_in_place_with_other_tensors_is_called_by_its_new_contract(
    explicit_triton: TritonServer, test_repository: Path
) -> None:
    """Triton swaps a reloaded model without a gap, so the proxy never sees it unavailable: the
    call by the old contract is refused, and the proxy reads the contract again for the next."""
    model = test_repository / "reshaped"
    shutil.copytree(test_repository / "renamed", model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "renamed"', 'name: "reshaped"'))
    control = grpcclient.InferenceServerClient(explicit_triton.grpc_url)
    control.load_model("reshaped")
    services = [
        Service("setosa", "grpc", explicit_triton.grpc_url, "setosa"),
        Service("reshaped", "grpc", explicit_triton.grpc_url, "reshaped"),
    ]
    rows = [[1.0, 2.0, 3.0, 4.0]]
    p = 1 / (1 + np.exp(-(sum(rows[0]) - 10)))
    try:
        with running_proxy(settings(), services) as url:
            first = httpx.post(f"{url}/predict", json={"data": rows}).json()
            assert first["reshaped"]["prediction"] == pytest.approx([p, 1 - p], abs=1e-6)
            # The same model, its input renamed 'features' -> 'measures', loaded again in place.
            config.write_text(config.read_text().replace('"features"', '"measures"'))
            code = model / "1" / "model.py"
            code.write_text(code.read_text().replace('"features"', '"measures"'))
            control.load_model("reshaped")
            time.sleep(1.1)  # past the proxy's once-a-second limit on reading a contract again
            answers = [httpx.post(f"{url}/predict", json={"data": rows}).json() for _ in range(2)]
        # At most the first call goes by the old contract (refused, reported as the service's error).
        refused, after = answers
        assert refused["reshaped"]["prediction"] is None or refused["reshaped"][
            "prediction"
        ] == pytest.approx([p, 1 - p], abs=1e-6)
        assert after["reshaped"]["prediction"] == pytest.approx([p, 1 - p], abs=1e-6)
    finally:
        control.unload_model("reshaped")
        control.close()
