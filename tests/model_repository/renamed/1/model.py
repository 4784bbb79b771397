"""Test-only model: P(class) = sigmoid(sum of the features - 10), answered as [P, 1 - P] in FP64."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            assert features.dtype == np.float64, features.dtype
            p = 1.0 / (1.0 + np.exp(-(features.sum(axis=1) - 10.0)))
            scores = np.stack([p, 1.0 - p], axis=1)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("scores", scores)]))
        return responses
