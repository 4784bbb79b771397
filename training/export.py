"""ONNX export of the classifiers and of the aggregator, within what Triton 24.10 loads.

Triton 24.10 ships ONNX Runtime 1.19, which loads IR version <= 8 models with opset <= 17
(``ai.onnx.ml`` <= 3). Current ``onnx`` writes IR 10+ by default, so both are set here.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from sklearn.pipeline import Pipeline

from training.data import CLASS_NAMES

IR_VERSION = 8
OPSET = 17
ML_OPSET = 3
INPUT_NAME = "input"
N_FEATURES = 4
PROBABILITIES = "probabilities"
#: Largest |ONNX - scikit-learn| probability difference accepted on the 150 Iris rows.
TOLERANCE = 1e-5


class ExportMismatchError(RuntimeError):
    """The ONNX model does not reproduce scikit-learn's probabilities."""


def classifier_to_onnx(model: Pipeline, name: str) -> onnx.ModelProto:
    """``input`` FP32 ``[N, 4]`` -> ``probabilities`` FP32 ``[N, 2]`` (no ZipMap, no label)."""
    onx = convert_sklearn(
        model,
        name=name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    # skl2onnx's `label` output is [N], which does not fit a batched Triton config;
    # only the probabilities are served, so drop it from the graph's outputs.
    kept = [out for out in onx.graph.output if out.name == PROBABILITIES]
    del onx.graph.output[:]
    onx.graph.output.extend(kept)
    return _finalise(onx)


def renamed_classifier_to_onnx(
    model: Pipeline | Any,
    name: str,
    input_name: str,
    output_name: str,
    n_features: int,
    dtype: type[np.floating[Any]],
) -> onnx.ModelProto:
    """A classifier with the tensor names and input datatype given: ``input_name`` ``[N,
    n_features]`` (FP32 or FP64) to ``output_name`` ``[N, classes]`` in the same datatype."""
    tensor_type = DoubleTensorType if dtype == np.float64 else FloatTensorType
    final = model.steps[-1][1] if isinstance(model, Pipeline) else model
    onx = convert_sklearn(
        model,
        name=name,
        initial_types=[(input_name, tensor_type([None, n_features]))],
        options={id(final): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    kept = [out for out in onx.graph.output if out.name == PROBABILITIES]
    del onx.graph.output[:]
    onx.graph.output.extend(kept)
    for node in onx.graph.node:
        for i, output in enumerate(node.output):
            if output == PROBABILITIES:
                node.output[i] = output_name
    onx.graph.output[0].name = output_name
    return _finalise(onx)


def check_probabilities(
    model: Any, onx: onnx.ModelProto, name: str, x: NDArray[np.floating[Any]], input_name: str
) -> float:
    """Largest |ONNX - scikit-learn| probability over ``x``; ``ExportMismatchError`` past ``TOLERANCE``."""
    (got,) = run_onnx(onx, {input_name: x})
    expected = model.predict_proba(x)
    if got.shape != expected.shape:
        raise ExportMismatchError(f"{name}: ONNX output shape {got.shape}, scikit-learn {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not diff <= TOLERANCE:
        raise ExportMismatchError(
            f"{name}: ONNX probabilities differ from scikit-learn by {diff:.3g} (limit {TOLERANCE:g})"
        )
    return diff


def aggregate_model() -> onnx.ModelProto:
    """Triton's server-side aggregation, the job the proxy does in Python.

    Inputs ``setosa``, ``versicolor``, ``virginica``: each classifier's ``[N, 2]``.
    Outputs ``scores`` ``[N, 3]`` (each P(class)), ``label`` INT64 ``[N, 1]`` (argmax, the
    first on ties, as the seed's loop), ``proba`` FP32 ``[N, 1]`` (the max) and
    ``class_name`` STRING ``[N, 1]``, so a client needs no label table.
    """
    nodes = [
        helper.make_node(
            "Constant", [], ["start"], value=helper.make_tensor("start", TensorProto.INT64, [1], [0])
        ),
        helper.make_node(
            "Constant", [], ["end"], value=helper.make_tensor("end", TensorProto.INT64, [1], [1])
        ),
        helper.make_node(
            "Constant", [], ["axis1"], value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
        ),
        helper.make_node(
            "Constant",
            [],
            ["names"],
            value=helper.make_tensor(
                "names",
                TensorProto.STRING,
                [len(CLASS_NAMES)],
                [n.encode() for n in CLASS_NAMES],  # type: ignore[misc]  # onnx's stub omits bytes
            ),
        ),
    ]
    for name in CLASS_NAMES:
        nodes.append(helper.make_node("Slice", [name, "start", "end", "axis1"], [f"{name}_p"]))
    nodes += [
        helper.make_node("Concat", [f"{n}_p" for n in CLASS_NAMES], ["scores"], axis=1),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=1),
        helper.make_node("ReduceMax", ["scores"], ["proba"], axes=[1], keepdims=1),
        helper.make_node("Gather", ["names", "label"], ["class_name"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "aggregate",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 2]) for n in CLASS_NAMES],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, len(CLASS_NAMES)]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None, 1]),
            helper.make_tensor_value_info("proba", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("class_name", TensorProto.STRING, [None, 1]),
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="training.export",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    return _finalise(model)


_PROCESS_UNIQUE = re.compile(r"UU\d+UU")
_SUBGRAPH_NUMBER = re.compile(r"^(cdistdf?)_(\d+)(_.*)?$")


def _canonical_names(model: onnx.ModelProto) -> None:
    """Rename what skl2onnx numbers with process-wide counters (tensors named ``UU007UU``, and the
    k-NN converter's subgraph names such as ``cdistdf_3_C0``) to numbers that restart with each
    model, so that the same model converted twice in one process is the same bytes."""
    tensors: dict[str, str] = {}
    subgraphs: dict[str, int] = {}

    def rename(name: str) -> str:
        if _PROCESS_UNIQUE.fullmatch(name):
            return tensors.setdefault(name, f"UU{len(tensors):03d}UU")
        numbered = _SUBGRAPH_NUMBER.match(name)
        if numbered:
            number = subgraphs.setdefault(numbered[2], len(subgraphs) + 1)
            return f"{numbered[1]}_{number}{numbered[3] or ''}"
        return name

    def walk(graph: onnx.GraphProto) -> None:
        for value in [*graph.input, *graph.output, *graph.value_info]:
            value.name = rename(value.name)
        for initializer in graph.initializer:
            initializer.name = rename(initializer.name)
        for node in graph.node:
            node.name = rename(node.name)
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    walk(attribute.g)
                for subgraph in attribute.graphs:
                    walk(subgraph)

    walk(model.graph)


def _finalise(model: onnx.ModelProto) -> onnx.ModelProto:
    _canonical_names(model)
    # skl2onnx lists the opsets in a set's order, which changes with each process's string
    # hashing (PYTHONHASHSEED): sorted, the same model is the same bytes from any process.
    opsets = sorted(model.opset_import, key=lambda opset: opset.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model: onnx.ModelProto, feeds: dict[str, NDArray[Any]]) -> list[NDArray[np.generic]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def check_classifier(model: Pipeline, onx: onnx.ModelProto, name: str, x: NDArray[np.float32]) -> float:
    """Largest |ONNX - scikit-learn| over ``x``; raises ``ExportMismatchError`` past ``TOLERANCE``."""
    return check_probabilities(model, onx, name, x, INPUT_NAME)
