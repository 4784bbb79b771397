"""Test-only model: answers each [a, b] row with [b, a]."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            pairs = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            swapped = pairs[:, ::-1].copy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", swapped)]))
        return responses
