"""Test-only model: [P, 1 - P] per row, P = sigmoid(sum(petals) - sum(sepals))."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            petals = pb_utils.get_input_tensor_by_name(request, "petals").as_numpy().astype(np.float64)
            sepals = pb_utils.get_input_tensor_by_name(request, "sepals").as_numpy()
            p = 1.0 / (1.0 + np.exp(-(petals.sum(axis=1) - sepals.sum(axis=1))))
            out = np.stack([p, 1.0 - p], axis=1).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", out)]))
        return responses
