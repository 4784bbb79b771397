"""The Open Inference Protocol's HTTP/REST encoding (KServe v2, as Triton speaks it): inference
requests and responses in JSON, with Triton's binary tensor data extension.

A request is JSON, or (with an ``Inference-Header-Content-Length`` header) that many bytes of
JSON followed by the raw tensors whose ``parameters`` carry a ``binary_data_size``, in order. A
response puts an output in binary when the request asked for it (the output's ``binary_data``
parameter, or the request's ``binary_data_output``), which is what ``tritonclient.http`` does by
default. Tensor bytes are little-endian; BYTES elements are each a 4-byte length and the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from client_proxy.api.inputs import _tensor
from client_proxy.api.reading import POLICIES, CallOptions
from client_proxy.core.compositions import Composition
from client_proxy.core.contracts import NUMPY_DTYPES
from client_proxy.core.dataplane import InferenceAnswer, InferenceRequest
from client_proxy.core.rules import Alert
from client_proxy.core.served import VERSION, UnknownModel
from client_proxy.core.services import TimeoutPolicy
from client_proxy.errors import BadRequest, Failure, InvalidInput, InvalidJSON

HEADER = "inference-header-content-length"

#: The server metadata both doors answer (``GET /v2``, ``ServerMetadata``).
SERVER = {
    "name": "client_proxy",
    "version": "0.1.0",
    "extensions": ["binary_tensor_data", "model_configuration", "parameters"],
}
_DATATYPES = {np.dtype(dtype).str: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}


@dataclass
class InferRequest:
    id: str
    inputs: dict[str, NDArray[Any]]
    outputs: list[str] | None
    """The outputs asked for; None: all."""
    binary: dict[str, bool] = field(default_factory=dict)
    """Per output asked for: in binary?"""
    binary_output: bool = False
    """``binary_data_output``: every output in binary unless it says otherwise."""
    parameters: dict[str, Any] = field(default_factory=dict)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"failed to parse the request JSON: {exc}") from None


def parse_request(body: bytes, header_length: str | None, max_rows: int) -> InferRequest:
    """An inference request; ``InvalidInput``/``BadRequest`` naming what is wrong otherwise."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length[:40]!r} is not a number"
            ) from None
        if not 0 < size <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {size} is not within the body's {len(body)} bytes"
            )
        document, binary = _json(body[:size]), memoryview(body)[size:]
    else:
        document, binary = _json(body), memoryview(b"")
    if not isinstance(document, dict):
        raise InvalidInput("the request must be a JSON object with 'inputs'")
    # Other keys are ignored, as Triton ignores them: KServe's SDK sends ``model_name``.
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    entries = document.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, NDArray[Any]] = {}
    offset = 0
    for i, entry in enumerate(entries):
        name, array, used = _input(i, entry, binary[offset:], max_rows)
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the last tensor")
    outputs, wanted = _outputs(document.get("outputs"))
    binary_output = bool(parameters.get("binary_data_output", False))
    return InferRequest(request_id, inputs, outputs, wanted, binary_output, parameters)


def _input(i: int, entry: Any, binary: memoryview, max_rows: int) -> tuple[str, NDArray[Any], int]:
    """One input tensor, and how many bytes of the binary part it used."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{i}]: a tensor is an object with name, shape and datatype")
    name, shape, datatype = entry.get("name"), entry.get("shape"), entry.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string")
    where = f"input '{name}'"
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        shown = str(datatype)[:40]
        raise InvalidInput(f"{where}: unknown datatype {shown!r} (one of {', '.join(NUMPY_DTYPES)})")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"{where}: 'shape' must be a list of whole numbers >= 0")
    if shape and shape[0] > max_rows:
        raise InvalidInput(f"{where}: {shape[0]} rows, more than the {max_rows} allowed per request")
    parameters = entry.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        if "data" not in entry:
            raise InvalidInput(f"{where}: no 'data' and no binary_data_size")
        return name, _tensor(where, shape, datatype, entry["data"]), 0
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
        raise BadRequest(f"{where}: binary_data_size {size!r} is beyond the binary data sent")
    return name, from_bytes(where, bytes(binary[:size]), shape, datatype), size


def from_bytes(where: str, raw: bytes, shape: list[int], datatype: str) -> NDArray[Any]:
    count = math.prod(shape)  # numpy's prod costs microseconds on a list
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidInput(f"{where}: a BYTES element's length is cut short")
            (length,) = struct.unpack_from("<I", raw, at)
            at += 4
            if at + length > len(raw):
                raise InvalidInput(f"{where}: a BYTES element is longer than the data sent")
            items.append(raw[at : at + length])
            at += length
        if len(items) != count:
            raise InvalidInput(f"{where}: {len(items)} BYTES elements, the shape {shape} needs {count}")
        return np.asarray(items, dtype=object).reshape(shape)
    dtype = _LITTLE_ENDIAN[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: {len(raw)} bytes of binary data, the shape {shape} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where}: values must be finite")
    return array


def _outputs(entries: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if entries is None:
        return None, {}
    if not isinstance(entries, list):
        raise InvalidInput("'outputs' must be a list")
    names, binary = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"outputs[{i}]: an output is an object with a 'name'")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput(f"outputs[{i}]: 'parameters' must be an object")
        if parameters.get("classification"):
            raise InvalidInput(f"output '{entry['name']}': the classification extension is not served here")
        names.append(entry["name"])
        if "binary_data" in parameters:
            binary[entry["name"]] = bool(parameters["binary_data"])
    return names, binary


_LITTLE_ENDIAN = {name: np.dtype(dtype).newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}


def datatype_of(array: NDArray[Any]) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    return _DATATYPES[array.dtype.str if array.dtype.byteorder != ">" else array.dtype.newbyteorder("<").str]


def to_bytes(array: NDArray[Any]) -> bytes:
    if datatype_of(array) == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def raw_outputs(outputs: dict[str, NDArray[Any]]) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Each output's name, datatype, shape and raw bytes (little-endian; ``BYTES`` length-prefixed),
    as the gRPC door's ``raw_output_contents`` carry them."""
    return [(name, datatype_of(array), array.shape, to_bytes(array)) for name, array in outputs.items()]


def _to_json(array: NDArray[Any]) -> list[Any]:
    if datatype_of(array) == "BYTES":
        return [i.decode(errors="replace") if isinstance(i, bytes) else str(i) for i in array.reshape(-1)]
    return array.reshape(-1).tolist()  # type: ignore[no-any-return]


def encode_response(
    model: str,
    version: str,
    request: InferRequest,
    outputs: dict[str, NDArray[Any]],
    parameters: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    entries, blobs = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.binary.get(name, request.binary_output):
            raw = to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_json(array)
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id:
        header["id"] = request.id
    if parameters:
        header["parameters"] = parameters
    encoded = orjson.dumps(header)
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)


# -- the request's parameters, and the answer as the protocol's tensors -------------------------
def check_version(name: str, version: str | None) -> None:
    """Only version 1 of each model is served (both doors; none named: the latest, 1). Another
    is an unknown model, a 404 (gRPC NOT_FOUND) in Triton's words."""
    if version not in (None, "", VERSION):
        raise UnknownModel(f"Request for unknown model: '{name}' version {version} is not found")


def inference_request(
    model: str,
    endpoint: str,
    options: CallOptions,
    timeout_us: Any,
    asked_policy: Any,
    tensors: Mapping[str, NDArray[Any]],
    outputs: Sequence[str] | None,
) -> InferenceRequest:
    """The dataplane's request for a protocol's inference (both doors): its named tensors and
    outputs asked for, its deadline and policy once its ``timeout`` and ``timeout_policy``
    parameters are applied (``deadline_and_policy``) to the door's ``options``."""
    deadline, policy = deadline_and_policy(
        timeout_us, asked_policy, options.started, options.deadline, options.policy
    )
    return InferenceRequest(
        model, endpoint, options.request_id, options.started, deadline, policy,
        tensors=tensors, outputs=outputs, variant=options.variant, variant_key=options.variant_key,
    )  # fmt: skip


def deadline_and_policy(
    timeout_us: Any, asked_policy: Any, started: float, deadline: float, policy: TimeoutPolicy | None
) -> tuple[float, TimeoutPolicy | None]:
    """The deadline and policy once the request's ``timeout`` (microseconds, Triton's extension)
    and ``timeout_policy`` parameters are applied (None: not sent)."""
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us <= 0:
            raise InvalidInput("parameter 'timeout' must be a whole number of microseconds > 0")
        deadline = min(deadline, started + timeout_us / 1e6)
    if asked_policy is not None:
        if not isinstance(asked_policy, str) or asked_policy not in POLICIES:
            raise InvalidInput("parameter 'timeout_policy' must be 'partial' or 'all_or_nothing'")
        policy = POLICIES[asked_policy]
    return deadline, policy


def _column(values: Any, dtype: Any) -> NDArray[Any]:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def _names(values: Sequence[str]) -> NDArray[Any]:
    return _column([v.encode() for v in values], object)


def _missing_parameters(missing: Mapping[str, Failure]) -> dict[str, Any]:
    """A partial answer, in the protocol's parameters (scalars only): which services, and why."""
    if not missing:
        return {}
    parameters: dict[str, Any] = {"partial": True, "missing": ",".join(missing)}
    for name, failure in missing.items():
        parameters[f"missing.{name}"] = f"{failure.reason}: {failure.message}"
    return parameters


def _alert_parameters(alerts: Sequence[Alert]) -> dict[str, Any]:
    """The rules met, in the protocol's parameters (scalars only): their names, and each one's rows."""
    if not alerts:
        return {}
    parameters: dict[str, Any] = {"alerts": ",".join(a.rule.name for a in alerts)}
    for alert in alerts:
        parameters[f"alert.{alert.rule.name}"] = ",".join(map(str, alert.rows))
    return parameters


def outputs_of(
    answer: InferenceAnswer, asked: Sequence[str] | None
) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
    """The answer as the protocol's output tensors (those ``asked``, all when None) and response
    parameters: a composition's ``scores``, ``label``, ``proba``, ``class_name`` (each service's
    output with ``aggregator: none``), a pipeline's ``class_name``, ``proba``, ``stopped_at``, a
    service's own; a partial answer's missing services, the alerts, and an experiment's
    ``variant`` in the parameters."""
    if answer.outputs is not None:
        outputs, parameters = answer.outputs, {}
    elif answer.report is not None:
        report = answer.report
        outputs = {
            "class_name": _names(report.labels),
            "proba": _column(report.proba, np.float32),
            "stopped_at": _names(report.stopped_at),
        }
        skipped = {
            r.step: Failure("skipped", ", ".join(r.missing)) for r in report.path if r.status == "skipped"
        }
        parameters = _missing_parameters(skipped) | _alert_parameters(report.alerts)
    else:
        outputs, parameters = _composition_outputs(answer)
    if asked is not None:
        outputs = {o: outputs[o] for o in asked if o in outputs}
    if answer.variant is not None:
        parameters = {**parameters, "variant": answer.variant.name}
    return outputs, parameters


def _composition_outputs(answer: InferenceAnswer) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
    result, aggregated, composition = answer.result, answer.aggregated, answer.target
    assert result is not None and isinstance(composition, Composition)
    parameters = _missing_parameters(result.missing) | _alert_parameters(answer.alerts)
    if aggregated is None:
        outputs = {n: o.probabilities for n, o in result.outcomes.items() if o.probabilities is not None}
        return outputs, parameters
    n = answer.rows
    if composition.aggregator == "one_vs_rest" and not composition.classes:
        # Every service is a class, answered or not (a missing one scores 0 and is named).
        classes = tuple(m.service.name for m in composition.members)
        scores = np.zeros((n, len(classes)), dtype=np.float32)
        for i, service in enumerate(classes):
            outcome = result.outcomes[service]
            if outcome.probabilities is not None:
                scores[:, i] = outcome.probabilities[:, 0]
    else:
        classes = answer.classes
        scores = (
            np.asarray(aggregated.scores, dtype=np.float32)
            if aggregated.scores is not None
            else np.zeros((n, len(classes)), dtype=np.float32)
        )
    index = {c: i for i, c in enumerate(classes)}
    outputs = {
        "scores": scores,
        "label": _column([index.get(label, -1) for label in aggregated.labels], np.int64),
        "proba": _column(aggregated.proba, np.float32),
        "class_name": _names(aggregated.labels),
    }
    return outputs, parameters


def http_answer(
    answer: InferenceAnswer, model: str, version: str, request: InferRequest
) -> tuple[bytes, int | None]:
    """The HTTP door's response to ``request``: ``outputs_of`` the answer, encoded as it asked
    (``encode_response``)."""
    outputs, parameters = outputs_of(answer, request.outputs)
    return encode_response(model, version, request, outputs, parameters)
