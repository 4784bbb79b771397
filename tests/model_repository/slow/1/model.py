"""Test-only slow model: sleeps ``delay_ms`` per execute, then answers [0.99, 0.01] per row."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.delay = float(config["parameters"]["delay_ms"]["string_value"]) / 1000.0

    def execute(self, requests):
        time.sleep(self.delay)
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "input").as_numpy().shape[0]
            probabilities = np.tile(np.array([[0.99, 0.01]], dtype=np.float32), (rows, 1))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", probabilities)]))
        return responses
