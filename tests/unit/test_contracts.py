"""Tensor contracts from Triton's metadata and config, and rows converted or refused by them."""

from __future__ import annotations

import numpy as np
import pytest

from client_proxy.core.contracts import Contract, ContractMismatch

WINE_METADATA = {
    "name": "wine_logreg",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "measurements", "datatype": "FP64", "shape": [-1, 13]}],
    "outputs": [{"name": "class_probabilities", "datatype": "FP64", "shape": [-1, 3]}],
}


WINE_CONFIG = {
    "name": "wine_logreg",
    "max_batch_size": 1024,
    "parameters": {"class_names": {"string_value": "class_0,class_1,class_2"}},
}


def test_a_contract_is_read_from_metadata_and_config() -> None:
    contract = Contract.from_triton(WINE_METADATA, WINE_CONFIG)
    assert contract.batched and contract.max_batch_size == 1024 and contract.version == "1"
    assert [(t.name, t.datatype, t.shape) for t in contract.inputs] == [("measurements", "FP64", (13,))]
    assert contract.output("wine").name == "class_probabilities"
    assert contract.class_names == ("class_0", "class_1", "class_2")


def test_grpc_json_dims_are_strings_and_read_the_same() -> None:
    grpc_style = {
        **WINE_METADATA,
        "inputs": [{"name": "measurements", "datatype": "FP64", "shape": ["-1", "13"]}],
    }
    assert Contract.from_triton(grpc_style, WINE_CONFIG) == Contract.from_triton(WINE_METADATA, WINE_CONFIG)


def test_rows_become_the_models_datatype() -> None:
    contract = Contract.from_triton(WINE_METADATA, WINE_CONFIG)
    spec, array = contract.input_rows("wine", [[1.0] * 13, [2] * 13])
    assert spec.name == "measurements" and array.dtype == np.float64 and array.shape == (2, 13)
    int_model = {**WINE_METADATA, "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, 2]}]}
    _, ints = Contract.from_triton(int_model, WINE_CONFIG).input_rows("ids", [[1, 2]])
    assert ints.dtype == np.int64
    text_model = {**WINE_METADATA, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]}
    _, text = Contract.from_triton(text_model, WINE_CONFIG).input_rows("text", [["a review"]])
    assert text.dtype == object and text[0, 0] == "a review"
    half = {**WINE_METADATA, "inputs": [{"name": "x", "datatype": "FP16", "shape": [-1, 2]}]}
    _, small = Contract.from_triton(half, WINE_CONFIG).input_rows("half", [[0.5, 1.5]])
    assert small.dtype == np.float16


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [[1.0, 2.0, 3.0, 4.0]],
            r"wine: expects input 'measurements' FP64 \[N, 13\], got rows of shape \[1, 4\]",
        ),
        ([[1.0] * 13, [1.0] * 12], r"wine: rows do not convert to FP64"),
        ([["a"] * 13], r"wine: rows do not convert to FP64"),
        ([[1.0] * 13] * 1025, r"wine: 1025 rows, more than the model's max_batch_size 1024"),
    ],
)
def test_rows_that_do_not_fit_are_refused_naming_the_service_and_the_shape(rows: list, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ContractMismatch, match=message) as refused:
        Contract.from_triton(WINE_METADATA, WINE_CONFIG).input_rows("wine", rows)
    assert refused.value.status_code == 422


def test_several_outputs_need_a_name_and_several_inputs_named_tensors() -> None:
    two_out = {
        **WINE_METADATA,
        "outputs": [*WINE_METADATA["outputs"], {"name": "label", "datatype": "INT64", "shape": [-1, 1]}],
    }
    contract = Contract.from_triton(two_out, WINE_CONFIG)
    with pytest.raises(ContractMismatch, match=r"has 2 outputs .*: name the one to use"):
        contract.output("wine")
    assert contract.output("wine", "label").datatype == "INT64"
    with pytest.raises(ContractMismatch, match="has no output 'nope'"):
        contract.output("wine", "nope")
    two_in = {
        **WINE_METADATA,
        "inputs": [*WINE_METADATA["inputs"], {"name": "mask", "datatype": "BOOL", "shape": [-1, 13]}],
    }
    with pytest.raises(ContractMismatch, match=r"takes 2 inputs .*send named tensors"):
        Contract.from_triton(two_in, WINE_CONFIG).input_rows("wine", [[1.0] * 13])


def test_an_unbatched_model_takes_the_shape_as_declared() -> None:
    metadata = {**WINE_METADATA, "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]}
    contract = Contract.from_triton(metadata, {"max_batch_size": 0})
    assert not contract.batched
    assert contract.input_rows("m", [[1, 2, 3], [4, 5, 6]])[1].shape == (2, 3)
    with pytest.raises(ContractMismatch, match=r"expects input 'x' FP32 \[2, 3\]"):
        contract.input_rows("m", [[1, 2, 3]])
