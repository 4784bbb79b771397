"""The parallel fan-out proxy in front of Triton: ``create_app(settings)`` builds the FastAPI app.

The package in three parts: ``core`` (services, contracts, the fan-out, aggregators,
compositions, pipelines; no HTTP, no tritonclient), ``triton`` (the gateway to Triton servers)
and ``api`` (the FastAPI app and its routes). The names below are imported on first use, so that
importing the core does not import the web framework.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "client_proxy.api.app",
    "ConfigError": "client_proxy.core.services",
    "Service": "client_proxy.core.services",
    "TimeoutPolicy": "client_proxy.core.services",
    "Settings": "client_proxy.config",
    "load_settings": "client_proxy.config",
    "services_from_env": "client_proxy.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'client_proxy' has no attribute {name!r}")
