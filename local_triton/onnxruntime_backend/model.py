"""A Python-based Triton backend named ``onnxruntime``: runs ``model.onnx`` with the onnxruntime package.

The ``nvidia-pytriton`` wheel's ``tritonserver`` has no native ONNX Runtime backend. Triton
uses ``<backend-dir>/onnxruntime/model.py`` for every model whose config says
``backend: "onnxruntime"`` (Triton's "Python-based backends"), so the repository that the
official image serves with its C++ backend is served here unchanged.

Like the native backend it reads the model file name from ``default_model_filename``
(``model.onnx`` when unset), the tensor names from the model config, and the
``intra_op_thread_count`` / ``inter_op_thread_count`` parameters (default 1 and 1 here, to keep
a small CPU server from oversubscribing its cores). Every request of a dynamic batch goes
through one ``session.run``.

This file runs inside Triton's Python stub; ``triton_python_backend_utils`` exists only there.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

#: Triton data types this backend can serve, as numpy dtypes.
_NUMPY_TYPES: dict[str, Any] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


def _int_parameter(config: dict[str, Any], key: str, default: int) -> int:
    raw = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pb_utils.TritonModelException(f"parameter {key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise pb_utils.TritonModelException(f"parameter {key} must be >= 0, got {value}")
    return value


class _TensorSpec:
    def __init__(self, entry: dict[str, Any], batched: bool) -> None:
        self.name: str = entry["name"]
        self.data_type: str = entry["data_type"]
        if self.data_type not in _NUMPY_TYPES:
            raise pb_utils.TritonModelException(f"tensor {self.name}: unsupported data type {self.data_type}")
        self.dtype = _NUMPY_TYPES[self.data_type]
        dims = [int(d) for d in entry.get("dims", [])]
        if "reshape" in entry:
            # The model sees the reshaped tensor; the client sends the declared one.
            dims = [int(d) for d in entry["reshape"].get("shape", [])]
        self.dims = dims
        self.batched = batched

    def check(self, array: np.ndarray) -> str | None:
        """Why ``array`` does not fit this input, or None when it does."""
        shape = list(array.shape)
        expected_rank = len(self.dims) + (1 if self.batched else 0)
        inner = shape[1:] if self.batched else shape
        if len(shape) != expected_rank or any(
            d != -1 and d != s for d, s in zip(self.dims, inner, strict=True)
        ):
            want = (["N"] if self.batched else []) + [str(d) for d in self.dims]
            return f"input '{self.name}' has shape {shape}, expected [{', '.join(want)}]"
        if self.dtype is not np.object_ and array.dtype != self.dtype:
            return f"input '{self.name}' has type {array.dtype}, expected {np.dtype(self.dtype)}"
        return None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", args.get("model_name", "?"))
        batched = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [_TensorSpec(entry, batched) for entry in config.get("input", [])]
        self.outputs = [_TensorSpec(entry, batched) for entry in config.get("output", [])]
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.model_name}: no model file at {path}")

        options = ort.SessionOptions()
        options.intra_op_num_threads = _int_parameter(config, "intra_op_thread_count", 1)
        options.inter_op_num_threads = _int_parameter(config, "inter_op_thread_count", 1)
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

        # Refuse at load time, as the native backend does, a config that names tensors the model lacks.
        model_inputs = {i.name for i in self.session.get_inputs()}
        model_outputs = {o.name for o in self.session.get_outputs()}
        for kind, specs, names in (
            ("input", self.inputs, model_inputs),
            ("output", self.outputs, model_outputs),
        ):
            for spec in specs:
                if spec.name not in names:
                    raise pb_utils.TritonModelException(
                        f"{self.model_name}: config {kind} '{spec.name}' is not in the model: {sorted(names)}"
                    )
        self.output_names = [spec.name for spec in self.outputs]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        feeds_per_request: list[dict[str, np.ndarray]] = []
        for index, request in enumerate(requests):
            feeds, error = self._read_inputs(request)
            if error is not None:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(error)
                )
            else:
                good.append(index)
                feeds_per_request.append(feeds)
        if not good:
            return responses

        try:
            results, sizes = self._run(feeds_per_request)
        except Exception as exc:  # onnxruntime raises its own error types; each becomes a Triton error
            message = f"{self.model_name}: onnxruntime failed: {exc}"
            for index in good:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(message)
                )
            return responses

        offset = 0
        for index, size in zip(good, sizes, strict=True):
            tensors = []
            for spec, value in zip(self.outputs, results, strict=True):
                part = value[offset : offset + size] if spec.batched else value
                tensors.append(pb_utils.Tensor(spec.name, _to_triton(part, spec)))
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            offset += size
        return responses

    def _read_inputs(self, request: Any) -> tuple[dict[str, np.ndarray], str | None]:
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                return feeds, f"{self.model_name}: missing input '{spec.name}'"
            array = tensor.as_numpy()
            problem = spec.check(array)
            if problem is not None:
                return feeds, f"{self.model_name}: {problem}"
            feeds[spec.name] = array
        return feeds, None

    def _run(self, feeds_per_request: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], list[int]]:
        """Outputs for all requests, concatenated along the batch axis, and each request's rows."""
        if not (self.inputs and self.inputs[0].batched):
            # Triton's default scheduler hands an unbatched model one request per execute.
            (feeds,) = feeds_per_request
            return self.session.run(self.output_names, feeds), [1]
        first = self.inputs[0].name
        sizes = [int(f[first].shape[0]) for f in feeds_per_request]
        if len(feeds_per_request) == 1:
            merged = feeds_per_request[0]
        else:
            merged = {
                spec.name: np.concatenate([f[spec.name] for f in feeds_per_request], axis=0)
                for spec in self.inputs
            }
        return self.session.run(self.output_names, merged), sizes

    def finalize(self) -> None:
        self.session = None


def _to_triton(value: np.ndarray, spec: _TensorSpec) -> np.ndarray:
    if spec.dtype is np.object_:
        # onnxruntime returns str objects; Triton's BYTES tensors carry bytes.
        return np.array(
            [v.encode() if isinstance(v, str) else v for v in value.ravel()], dtype=np.object_
        ).reshape(value.shape)
    return np.ascontiguousarray(value, dtype=spec.dtype)
