"""Request bodies: rows and named tensors parsed, or refused with a 4xx naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from client_proxy.api.inputs import parse_inputs, parse_rows
from client_proxy.api.oip import deadline_and_policy, parse_request
from client_proxy.errors import InvalidInput


def test_parse_rows_builds_float32() -> None:
    rows = parse_rows(b'{"data": [[1, 2.5, 3, 4], [5, 6, 7, 8]]}', max_rows=10)
    assert rows.dtype == np.float32 and rows.shape == (2, 4)


def test_named_tensors_take_their_datatype_and_shape() -> None:
    body = (
        b'{"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2], [3, 4]]},'
        b' {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["x", "y"]},'
        b' {"name": "i", "shape": [2, 1], "datatype": "INT8", "data": [-128, 127]}]}'
    )
    tensors = parse_inputs(body, max_rows=10)
    assert isinstance(tensors, dict) and list(tensors) == ["a", "t", "i"]
    assert tensors["a"].dtype == np.float64 and tensors["a"].tolist() == [[1, 2], [3, 4]]
    assert tensors["t"].dtype == object and tensors["t"].tolist() == ["x", "y"]
    assert tensors["i"].dtype == np.int8 and tensors["i"].shape == (2, 1)


def test_rows_are_rows_even_when_a_value_is_the_word_inputs() -> None:
    rows = parse_inputs(b'{"data": [["inputs", "b"]]}', max_rows=10)
    assert isinstance(rows, np.ndarray) and rows.tolist() == [["inputs", "b"]]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ('{"name": "a", "shape": [1, 2], "datatype": "FP32"}', "name, shape, datatype and data"),
        ('{"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "extra": 1}', "unknown key"),
        ('{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}', "non-empty string"),
        ('{"name": "a", "shape": [1.5], "datatype": "FP32", "data": [1]}', "whole numbers"),
        ('{"name": "a", "shape": [0, 2], "datatype": "FP32", "data": []}', "0 rows"),
        ('{"name": "a", "shape": [11], "datatype": "FP32", "data": [1,1,1,1,1,1,1,1,1,1,1]}', "11 rows"),
        ('{"name": "a", "shape": [1], "datatype": "FP32", "data": [true]}', "must be numbers"),
        ('{"name": "a", "shape": [1], "datatype": "BOOL", "data": [1]}', "true or false"),
        ('{"name": "a", "shape": [1], "datatype": "BYTES", "data": [1]}', "must be strings"),
        ('{"name": "a", "shape": [1], "datatype": "UINT8", "data": [-1]}', "does not fit UINT8"),
        ('{"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}', "does not fit INT32"),
        ('{"name": "a", "shape": [1], "datatype": "FP16", "data": [1e6]}', "does not fit FP16"),
        ('{"name": "a", "shape": [1], "datatype": "FP32", "data": 1}', "must be a list"),
        # JSON that is not a string where a name is expected (schemathesis found a 500 here).
        ('{"name": "a", "shape": [1], "datatype": {}, "data": [1]}', "datatype: must be one of"),
        ('{"name": "a", "shape": [1], "datatype": ["FP32"], "data": [1]}', "datatype: must be one of"),
    ],
)
def test_a_bad_tensor_is_refused_naming_it(tensor: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        parse_inputs(b'{"inputs": [' + tensor.encode() + b"]}", max_rows=10)


def test_two_tensors_of_one_name_or_different_rows_are_refused() -> None:
    a = '{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}'
    b = '{"name": "b", "shape": [2], "datatype": "FP32", "data": [1, 2]}'
    with pytest.raises(InvalidInput, match="used twice"):
        parse_inputs(f'{{"inputs": [{a}, {a}]}}'.encode(), max_rows=10)
    with pytest.raises(InvalidInput, match="same number of rows"):
        parse_inputs(f'{{"inputs": [{a}, {b}]}}'.encode(), max_rows=10)


def test_header_reads_like_starlettes_headers_get() -> None:
    """``header`` (one dict per request) answers as ``request.headers.get`` does: names in
    lower case, the first of a repeated header, None when absent."""
    from starlette.requests import Request

    from client_proxy.api.reading import header

    raw = [(b"content-type", b"application/json"), (b"x-route", b"ensemble"), (b"x-route", b"fanout")]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""})
    for name in ("content-type", "x-route", "x-deadline-ms"):
        assert header(request, name) == request.headers.get(name)
    assert header(request, "x-route") == "ensemble"


@pytest.mark.parametrize("datatype", ["{}", '["FP32"]', "null", "7"])
def test_the_protocols_parser_refuses_a_datatype_that_is_not_a_name(datatype: str) -> None:
    body = f'{{"inputs": [{{"name": "x", "shape": [1, 1], "datatype": {datatype}, "data": [1]}}]}}'
    with pytest.raises(InvalidInput, match="unknown datatype"):
        parse_request(body.encode(), None, max_rows=10)


@pytest.mark.parametrize("policy", [{}, ["partial"], 1, True])
def test_a_timeout_policy_parameter_that_is_not_a_name_is_refused(policy: object) -> None:
    with pytest.raises(InvalidInput, match="timeout_policy"):
        deadline_and_policy(None, policy, 0.0, 1.0, None)
