"""Test-only failing model: answers every request with a Triton error naming the request's id,
so a test can see the id the proxy gave Triton."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            message = f"failing: this test model always fails (request id {request.request_id()!r})"
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
            )
        return responses
