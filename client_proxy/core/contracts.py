"""What a Triton model takes and gives, read from Triton itself: its tensor contract.

Built from the model's metadata and configuration (``GET /v2/models/<m>`` and ``.../config``,
or their gRPC twins, whose JSON renders int64 dims as strings) and nothing else: no tensor
name, datatype or width is assumed. A contract converts a request's rows into the model's input
in the model's datatype, after checking their width against the model's shape, so a row that
does not fit is refused (``ContractMismatch``, a 422 naming the service and the shape) before
any call is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_proxy.errors import InvalidInput

#: The Open Inference Protocol's datatypes the proxy converts rows to, as numpy dtypes.
NUMPY_DTYPES: dict[str, Any] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}


class ContractMismatch(InvalidInput):
    """A request does not fit a service's model (422); the message names the service and the shape."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """Without the batch dimension when the model batches; -1 is any size."""
    label_filename: str = ""
    """An output's label file in the model's config: Triton then names its classes."""

    def describe(self, batched: bool) -> str:
        dims = (["N"] if batched else []) + [str(d) if d >= 0 else "any" for d in self.shape]
        return f"'{self.name}' {self.datatype} [{', '.join(dims)}]"


def _dims(entry: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in entry.get("shape", entry.get("dims", [])))


@dataclass(frozen=True)
class Contract:
    """A model's inputs and outputs, and whether it takes a batch of rows."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    class_names: tuple[str, ...] = ()
    """From the config's ``class_names`` parameter (comma-separated), when it has one; else the
    gateway asks Triton for an output's label file (``label_filename``) when it needs them."""

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @classmethod
    def from_triton(cls, metadata: Mapping[str, Any], config: Mapping[str, Any]) -> Contract:
        """From Triton's model metadata and configuration, as either protocol's JSON gives them."""
        batched = int(config.get("max_batch_size", 0)) > 0

        label_files = {o.get("name"): o.get("label_filename", "") for o in config.get("output", []) or []}

        def specs(entries: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            # The metadata's shapes include the batch dimension (-1) when the model batches.
            return tuple(
                TensorSpec(
                    e["name"],
                    e["datatype"],
                    _dims(e)[1:] if batched else _dims(e),
                    str(label_files.get(e["name"]) or ""),
                )
                for e in entries
            )

        parameters = config.get("parameters", {}) or {}
        raw_names = (parameters.get("class_names") or {}).get("string_value", "")
        versions = metadata.get("versions") or [""]
        return cls(
            model=str(metadata.get("name", config.get("name", ""))),
            version=str(versions[-1]),
            inputs=specs(metadata.get("inputs", [])),
            outputs=specs(metadata.get("outputs", [])),
            max_batch_size=int(config.get("max_batch_size", 0)),
            class_names=tuple(n.strip() for n in raw_names.split(",") if n.strip()),
        )

    def describe_inputs(self) -> str:
        return ", ".join(t.describe(self.batched) for t in self.inputs)

    def output(self, service: str, name: str | None = None) -> TensorSpec:
        """The output a service contributes: the one named, or the model's only one."""
        if name is not None:
            for spec in self.outputs:
                if spec.name == name:
                    return spec
            known = ", ".join(t.name for t in self.outputs)
            raise ContractMismatch(f"{service}: model '{self.model}' has no output '{name}' (it has {known})")
        if len(self.outputs) != 1:
            known = ", ".join(t.name for t in self.outputs)
            raise ContractMismatch(
                f"{service}: model '{self.model}' has {len(self.outputs)} outputs ({known}): "
                "name the one to use"
            )
        return self.outputs[0]

    def input_rows(
        self, service: str, rows: Sequence[Sequence[Any]] | NDArray[Any]
    ) -> tuple[TensorSpec, NDArray[Any]]:
        """The rows as the model's single input, in its datatype, their width checked."""
        if len(self.inputs) != 1:
            raise ContractMismatch(
                f"{service}: model '{self.model}' takes {len(self.inputs)} inputs "
                f"({self.describe_inputs()}): send named tensors"
            )
        spec = self.inputs[0]
        return spec, self._convert(service, spec, rows, "rows")

    def input_tensors(self, service: str, tensors: Mapping[str, Any]) -> dict[str, NDArray[Any]]:
        """The model's inputs from named tensors (others are left out: they may be another
        service's), each in its datatype with its shape checked, all with the same rows."""
        missing = [spec for spec in self.inputs if spec.name not in tensors]
        if missing:
            needed = ", ".join(spec.describe(self.batched) for spec in missing)
            raise ContractMismatch(f"{service}: model '{self.model}' needs input {needed}, not sent")
        converted = {
            spec.name: self._convert(service, spec, tensors[spec.name], f"tensor '{spec.name}'")
            for spec in self.inputs
        }
        rows = {len(t) for t in converted.values()}
        if self.batched and len(rows) > 1:
            sizes = ", ".join(f"{name} {len(t)}" for name, t in converted.items())
            raise ContractMismatch(f"{service}: the tensors have different numbers of rows ({sizes})")
        return converted

    def _convert(self, service: str, spec: TensorSpec, value: Any, what: str) -> NDArray[Any]:
        """``value`` as ``spec``'s datatype and shape, or ``ContractMismatch`` naming both."""
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if dtype is None:
            raise ContractMismatch(
                f"{service}: input {spec.describe(self.batched)} has a datatype the proxy cannot send"
            )
        try:
            array = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            raise ContractMismatch(
                f"{service}: {what} do not convert to {spec.datatype} for input {spec.describe(self.batched)}"
            ) from None
        inner = array.shape[1:] if self.batched else array.shape
        if len(inner) != len(spec.shape) or any(
            d >= 0 and d != s for d, s in zip(spec.shape, inner, strict=True)
        ):
            got = "[" + ", ".join(str(s) for s in array.shape) + "]"
            raise ContractMismatch(
                f"{service}: expects input {spec.describe(self.batched)}, got {what} of shape {got}"
            )
        if self.batched and self.max_batch_size and array.shape[0] > self.max_batch_size:
            raise ContractMismatch(
                f"{service}: {array.shape[0]} rows, more than the model's max_batch_size "
                f"{self.max_batch_size}"
            )
        if dtype is np.float16 and not np.isfinite(array).all():
            raise ContractMismatch(
                f"{service}: a value is out of FP16's range for input {spec.describe(self.batched)}"
            )
        return array
