"""Triton model configurations (``config.pbtxt``) for the classifiers, the aggregator and the ensemble.

The same repository serves in the official Triton image (native ONNX Runtime backend) and in
the embedded server (``local_triton``'s Python-based backend of the same name): both read the
configs below, including the ``intra_op_thread_count`` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from training.data import CLASS_NAMES
from training.wine import N_FEATURES, WINE_CLASSES, WineModel

MAX_BATCH_SIZE = 1024
ENSEMBLE = "iris_ensemble"
AGGREGATE = "aggregate"


LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]
    #: Triton's classification extension: the class names, one a line, in the model's folder.
    label_filename: str | None = None

    def render(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        labels = f'\n    label_filename: "{self.label_filename}"' if self.label_filename else ""
        head = f'  {{\n    name: "{self.name}"\n    data_type: {self.data_type}\n'
        return f"{head}    dims: [ {dims} ]{labels}\n  }}"


def _tensors(kind: str, tensors: list[Tensor]) -> str:
    return f"{kind} [\n" + ",\n".join(t.render() for t in tensors) + "\n]\n"


def onnx_config(
    name: str, inputs: list[Tensor], outputs: list[Tensor], parameters: dict[str, str] | None = None
) -> str:
    extra = "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in (parameters or {}).items()
    )
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "dynamic_batching { }\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        "parameters {\n"
        '  key: "intra_op_thread_count"\n'
        '  value: { string_value: "1" }\n'
        "}\n" + extra
    )


CLASSIFIER_INPUTS = [Tensor("input", "TYPE_FP32", (4,))]
CLASSIFIER_OUTPUTS = [Tensor("probabilities", "TYPE_FP32", (2,))]
AGGREGATE_OUTPUTS = [
    Tensor("scores", "TYPE_FP32", (len(CLASS_NAMES),)),
    Tensor("label", "TYPE_INT64", (1,)),
    Tensor("proba", "TYPE_FP32", (1,)),
    Tensor("class_name", "TYPE_STRING", (1,)),
]


def classifier_config(name: str) -> str:
    return onnx_config(name, CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS)


def wine_config(model: WineModel) -> str:
    """A wine model: its own tensor names, its input datatype, the class names in ``labels.txt``."""
    datatype = "TYPE_FP64" if model.dtype == np.float64 else "TYPE_FP32"
    inputs = [Tensor(model.input_name, datatype, (N_FEATURES,))]
    outputs = [Tensor(model.output_name, datatype, (len(WINE_CLASSES),), label_filename=LABELS_FILE)]
    # The class names twice: labels.txt for Triton's classification extension, and a parameter
    # that anyone reading the config through Triton's API (the proxy) can see.
    return onnx_config(model.name, inputs, outputs, {"class_names": ",".join(WINE_CLASSES)})


def aggregate_config() -> str:
    inputs = [Tensor(name, "TYPE_FP32", (2,)) for name in CLASS_NAMES]
    return onnx_config(AGGREGATE, inputs, AGGREGATE_OUTPUTS)


def ensemble_config() -> str:
    steps = []
    for name in CLASS_NAMES:
        steps.append(
            "    {\n"
            f'      model_name: "{name}"\n'
            "      model_version: -1\n"
            '      input_map { key: "input" value: "input" }\n'
            f'      output_map {{ key: "probabilities" value: "{name}_probabilities" }}\n'
            "    }"
        )
    aggregate_inputs = "".join(
        f'      input_map {{ key: "{name}" value: "{name}_probabilities" }}\n' for name in CLASS_NAMES
    )
    aggregate_outputs = "".join(
        f'      output_map {{ key: "{t.name}" value: "{t.name}" }}\n' for t in AGGREGATE_OUTPUTS
    )
    steps.append(
        "    {\n"
        f'      model_name: "{AGGREGATE}"\n'
        "      model_version: -1\n" + aggregate_inputs + aggregate_outputs + "    }"
    )
    return (
        f'name: "{ENSEMBLE}"\n'
        'platform: "ensemble"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        + _tensors("input", CLASSIFIER_INPUTS)
        + _tensors("output", AGGREGATE_OUTPUTS)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
        "parameters {\n"
        '  key: "class_names"\n'
        f'  value: {{ string_value: "{",".join(CLASS_NAMES)}" }}\n'
        "}\n"
    )


def write_model(
    repository: Path, name: str, config: str, model: onnx.ModelProto | None, labels: tuple[str, ...] = ()
) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config)
    if labels:
        (folder / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    if model is not None:
        (folder / "1" / "model.onnx").write_bytes(model.SerializeToString())
    else:
        # An ensemble has no file, but Triton wants its version folder; git keeps no empty one.
        (folder / "1" / ".gitkeep").write_text("")
