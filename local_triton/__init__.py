"""The real Triton Inference Server, embedded from the ``nvidia-pytriton`` wheel.

``python -m local_triton`` serves ``model_repository/``; tests use ``TritonServer`` directly.
"""

from local_triton.server import (
    TRITON_RELEASE,
    TRITON_SERVER_VERSION,
    LaunchError,
    TritonServer,
    free_ports,
    models_in,
)

__all__ = [
    "TRITON_RELEASE",
    "TRITON_SERVER_VERSION",
    "LaunchError",
    "TritonServer",
    "free_ports",
    "models_in",
]
