"""Triton BLS: the example composition ``wine`` (examples/compositions.yaml) in Triton's Python
backend: the weighted mean of the three wine models' class probabilities (wine_logreg 2,
wine_gbt 1, wine_knn 1), each model called at once with its own tensor names and datatype."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

CLASSES = ("class_0", "class_1", "class_2")
#: model: (input name, output name, input datatype, weight)
MODELS = {
    "wine_logreg": ("measurements", "class_probabilities", np.float64, 2.0),
    "wine_gbt": ("x", "proba", np.float32, 1.0),
    "wine_knn": ("INPUT__0", "OUTPUT__0", np.float32, 1.0),
}


class TritonPythonModel:
    async def execute(self, requests):
        return list(await asyncio.gather(*(self._answer(request) for request in requests)))

    async def _answer(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
        calls = [
            pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=[output],
                inputs=[pb_utils.Tensor(tensor, x.astype(dtype))],
            )
            for name, (tensor, output, dtype, _) in MODELS.items()
        ]
        answers = await asyncio.gather(*(call.async_exec() for call in calls))
        total = np.zeros((len(x), len(CLASSES)), dtype=np.float64)
        for (name, (_, output, _, weight)), answer in zip(MODELS.items(), answers, strict=True):
            if answer.has_error():
                return pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{name}: {answer.error().message()}")
                )
            total += weight * pb_utils.get_output_tensor_by_name(answer, output).as_numpy().astype(np.float64)
        scores = (total / sum(m[3] for m in MODELS.values())).astype(np.float32)
        label = scores.argmax(axis=1)
        rows = np.arange(len(label))
        names = np.array([[CLASSES[i].encode()] for i in label], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("scores", scores),
                pb_utils.Tensor("label", label.astype(np.int64).reshape(-1, 1)),
                pb_utils.Tensor("proba", scores[rows, label].reshape(-1, 1)),
                pb_utils.Tensor("class_name", names),
            ]
        )
