"""A request body (read by ``reading.py``) parsed into rows (``[N, width]``), named tensors or
keys, with a 4xx naming every problem: the JSON parsed with orjson and validated by
pydantic-core in one pass."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import orjson
from annotated_types import Len
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from client_proxy.core.contracts import NUMPY_DTYPES
from client_proxy.core.features import KEY
from client_proxy.core.tensors import Inputs
from client_proxy.errors import InvalidInput, InvalidJSON

N_FEATURES = 4
"""The Iris example's width, as the documentation shows it: the models' contracts decide."""
SAMPLE_ROW = [5.1, 3.5, 1.4, 0.2]
"""The seed's sample row, used by the test endpoints and as the documented default."""

#: Largest feature magnitude the seed's routes accept. Far beyond it float32 features overflow
#: in the models (the Iris models' quadratic features become NaN), so the seed's API refuses it.
MAX_ABS_FEATURE = 1e6
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_FEATURE, le=MAX_ABS_FEATURE)]
Row = Annotated[list[Feature], Len(1, None)]


class PredictRequest(BaseModel):
    """Rows of features, as wide as the default composition's models take: for Iris, sepal
    length, sepal width, petal length, petal width (cm)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"data": [[1.0, 2.0, 3.0, 4.0]]},
                {"data": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]},
            ]
        },
    )
    data: Annotated[list[Row], Len(1, None)] = Field(
        description="N rows of finite numbers, each as wide as the models take (4 for Iris); "
        "one Triton call per service for all rows."
    )


_ADAPTER = TypeAdapter(PredictRequest)


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if not location:
        return 'body must be a JSON object {"data": [[f1, f2, f3, f4], ...]}'
    return f"{location}: {error['msg']}"


def _refuse_duplicate_keys(body: bytes) -> None:
    """JSON parsers keep the last of duplicated keys, silently: refuse the ambiguity instead.

    Only called when ``"data"`` appears more than once in the body, so the common case pays
    nothing for it.
    """

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        if duplicated:
            raise InvalidJSON(f"duplicated key(s) in a JSON object: {', '.join(repr(k) for k in duplicated)}")
        return dict(items)

    json.loads(body, object_pairs_hook=pairs)


def _document(body: bytes, max_rows: int, expected: str) -> Any:
    """The parsed JSON body, refused (4xx) when empty, not JSON, with a duplicated key, or with
    more than ``max_rows`` rows (counted before any validation, so a huge batch costs nothing)."""
    if not body:
        raise InvalidInput(f"empty body: expected JSON {expected}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"body is not valid JSON: {exc}") from None
    if body.count(b'"data"') > 1:
        _refuse_duplicate_keys(body)
    if (
        isinstance(document, dict)
        and isinstance(document.get("data"), list)
        and len(document["data"]) > max_rows
    ):
        raise InvalidInput(
            f"data: {len(document['data'])} rows, more than the {max_rows} allowed per request",
            max_rows=max_rows,
        )
    return document


def parse_rows(body: bytes, max_rows: int) -> NDArray[np.float32]:
    """``{"data": [[f, ...], ...]}`` -> float32 ``[N, width]``; ``ProxyError`` (4xx) otherwise.
    The width is the models' to check (their contracts), not this schema's."""
    document = _document(body, max_rows, '{"data": [[f1, f2, f3, f4], ...]}')
    try:
        request = _ADAPTER.validate_python(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = [_describe(e) for e in errors[:10]]
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise InvalidInput("; ".join(problems) + more, problems=problems) from None
    try:
        # Every value is within +-MAX_ABS_FEATURE, so the float32 cast is always finite.
        return np.asarray(request.data, dtype=np.float32)
    except ValueError:  # rows of different widths: numpy cannot make them one array
        widths = sorted({len(row) for row in request.data})
        raise InvalidInput(
            f"data: rows of different widths {widths}: every row needs the same number of values"
        ) from None


GenericValue = Annotated[float, Field(strict=True, allow_inf_nan=False)] | Annotated[str, Field(strict=True)]


class RowsRequest(BaseModel):
    """Rows for a composition: each a list of numbers (or strings, for a model taking BYTES), all
    of one width, which the services' models check (their tensor contracts)."""

    model_config = ConfigDict(extra="forbid")
    data: Annotated[list[Annotated[list[GenericValue], Len(1, None)]], Len(1, None)] = Field(
        description="N rows; each service's model says how wide and of which type"
    )


_ROWS_ADAPTER = TypeAdapter(RowsRequest)


def parse_any_rows(body: bytes, max_rows: int) -> NDArray[Any]:
    """``{"data": [[...], ...]}`` of any width -> ``[N, width]`` float64 (or object, for strings)."""
    document = _document(body, max_rows, '{"data": [[...], ...]}')
    try:
        request = _ROWS_ADAPTER.validate_python(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = list(dict.fromkeys(_describe(e) for e in errors))[:10]
        raise InvalidInput("; ".join(problems), problems=problems) from None
    widths = {len(row) for row in request.data}
    if len(widths) != 1:
        raise InvalidInput(
            f"data: rows of different widths {sorted(widths)}: every row needs the same number of values"
        )
    if all(isinstance(v, int) for row in request.data for v in row):
        return np.asarray(request.data, dtype=np.int64)  # exact, for a model taking integers
    if all(isinstance(v, float | int) for row in request.data for v in row):
        return np.asarray(request.data, dtype=np.float64)
    if all(isinstance(v, str) for row in request.data for v in row):
        return np.asarray(request.data, dtype=object)
    raise InvalidInput("data: mixes numbers and strings: a row is all numbers, or all strings (BYTES)")


def parse_inputs(body: bytes, max_rows: int) -> Inputs:
    """Rows (``{"data": [[...], ...]}``, as ``parse_any_rows``) or named tensors in the Open
    Inference Protocol's JSON (``{"inputs": [{"name", "shape", "datatype", "data"}, ...]}``),
    for a model with several inputs; ``ProxyError`` (4xx) naming the problem otherwise."""
    if b'"inputs"' not in body:
        return parse_any_rows(body, max_rows)
    document = _document(body, max_rows, '{"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    if not isinstance(document, dict) or "inputs" not in document:
        return parse_any_rows(body, max_rows)  # "inputs" was a value, not the key
    if set(document) != {"inputs"}:
        raise InvalidInput('body must be {"data": [[...], ...]} or {"inputs": [...]}, not both')
    return parse_tensors(document["inputs"], max_rows)


def parse_keys(body: bytes, max_rows: int) -> list[str] | None:
    """``{"keys": ["flower-17", ...]}`` -> the keys; None when the body is not a request by key
    (rows or tensors then); ``ProxyError`` (4xx) naming the problem."""
    if b'"keys"' not in body:
        return None
    document = _document(body, max_rows, '{"keys": ["key", ...]}')
    if not isinstance(document, dict) or "keys" not in document:
        return None  # "keys" was a value, not the key
    if set(document) != {"keys"}:
        raise InvalidInput('body must be {"data": [...]}, {"inputs": [...]} or {"keys": [...]}, not both')
    keys = document["keys"]
    if not isinstance(keys, list) or not keys:
        raise InvalidInput("keys: must be a non-empty list of keys")
    if len(keys) > max_rows:
        raise InvalidInput(
            f"keys: {len(keys)} keys, more than the {max_rows} allowed per request", max_rows=max_rows
        )
    for key in keys:
        if not isinstance(key, str) or not KEY.match(key):
            raise InvalidInput(f"keys: {str(key)[:40]!r} is not a key (1 to 128 of A-Z a-z 0-9 . _ : @ / -)")
    return keys


_TENSOR_KEYS = {"name", "shape", "datatype", "data"}


def parse_tensors(entries: Any, max_rows: int) -> dict[str, NDArray[Any]]:
    """The Open Inference Protocol's input tensors (JSON) as named arrays of their datatype and
    shape; the first dimension of every tensor is the rows, the same for all."""
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("inputs: must be a non-empty list of tensors")
    tensors: dict[str, NDArray[Any]] = {}
    for i, entry in enumerate(entries):
        where = f"inputs[{i}]"
        if not isinstance(entry, dict) or not set(entry) >= _TENSOR_KEYS:
            raise InvalidInput(f"{where}: a tensor is an object with name, shape, datatype and data")
        unknown = sorted(set(entry) - _TENSOR_KEYS)
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {unknown}")
        name, shape, datatype, data = entry["name"], entry["shape"], entry["datatype"], entry["data"]
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name: must be a non-empty string")
        where = f"inputs[{i}] ({name!r})"
        if name in tensors:
            raise InvalidInput(f"{where}: the name is used twice")
        if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"{where}.datatype: must be one of {', '.join(NUMPY_DTYPES)}, not {str(datatype)[:40]!r}"
            )
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InvalidInput(f"{where}.shape: must be a list of whole numbers >= 0, the rows first")
        if not 1 <= shape[0] <= max_rows:
            raise InvalidInput(
                f"{where}.shape: {shape[0]} rows; from 1 to {max_rows} per request", max_rows=max_rows
            )
        tensors[name] = _tensor(where, shape, datatype, data)
    rows = {len(t) for t in tensors.values()}
    if len(rows) > 1:
        sizes = ", ".join(f"{name} {len(t)}" for name, t in tensors.items())
        raise InvalidInput(f"inputs: every tensor needs the same number of rows (first dimension): {sizes}")
    return tensors


def _flatten(data: Any) -> list[Any]:
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _tensor(where: str, shape: list[int], datatype: str, data: Any) -> NDArray[Any]:
    if not isinstance(data, list):
        raise InvalidInput(f"{where}.data: must be a list (flat, or nested as the shape)")
    flat = _flatten(data)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise InvalidInput(f"{where}.data: {len(flat)} values, the shape {shape} needs {expected}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"{where}.data: BYTES values must be strings")
        return np.asarray(flat, dtype=object).reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise InvalidInput(f"{where}.data: BOOL values must be true or false")
    elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise InvalidInput(f"{where}.data: {datatype} values must be numbers")
    elif not all(math.isfinite(v) for v in flat):
        raise InvalidInput(f"{where}.data: values must be finite")
    elif datatype.startswith(("INT", "UINT")):
        # numpy casts out-of-range Python integers by wrapping them (1.x) or raises (2.x): check.
        limits = np.iinfo(NUMPY_DTYPES[datatype])
        if not all(isinstance(v, int) and limits.min <= v <= limits.max for v in flat):
            raise InvalidInput(
                f"{where}.data: a value does not fit {datatype} (whole numbers "
                f"from {limits.min} to {limits.max})"
            )
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = np.asarray(flat, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError, FloatingPointError):
        raise InvalidInput(f"{where}.data: a value does not fit {datatype}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where}.data: a value is out of {datatype}'s range")
    return array


def parse_body(
    body: bytes, max_rows: int, parse: Callable[[bytes, int], Inputs]
) -> tuple[list[str] | None, Inputs | None]:
    """``{"keys": [...]}``'s keys, or else what ``parse`` reads of the body (rows or tensors)."""
    keys = parse_keys(body, max_rows)
    return (keys, None) if keys is not None else (None, parse(body, max_rows))
