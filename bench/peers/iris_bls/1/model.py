"""Triton BLS (Business Logic Scripting): the seed's one-vs-rest rule in Triton's Python backend.

Each request's rows go to the three classifiers at once (``InferenceRequest.async_exec``); the
answer is iris_ensemble's: every class's P(class) (``scores``), the index of the highest (the first
on ties, as the seed's loop), its probability and its name. A classifier's error is the request's.
"""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

CLASSES = ("setosa", "versicolor", "virginica")


class TritonPythonModel:
    async def execute(self, requests):
        return list(await asyncio.gather(*(self._answer(request) for request in requests)))

    async def _answer(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
        calls = [
            pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=["probabilities"],
                inputs=[pb_utils.Tensor("input", x)],
            )
            for name in CLASSES
        ]
        answers = await asyncio.gather(*(call.async_exec() for call in calls))
        columns = []
        for name, answer in zip(CLASSES, answers, strict=True):
            if answer.has_error():
                return pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{name}: {answer.error().message()}")
                )
            columns.append(pb_utils.get_output_tensor_by_name(answer, "probabilities").as_numpy()[:, 0])
        scores = np.stack(columns, axis=1).astype(np.float32)
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
