"""Test-only failing model: answers every request with a Triton error."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        error = pb_utils.TritonError("failing: this test model always fails")
        return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
