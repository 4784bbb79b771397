"""The parallel fan-out proxy in front of Triton: ``create_app(settings)`` builds the FastAPI app."""

from client_proxy.app import create_app
from client_proxy.config import (
    ConfigError,
    Service,
    Settings,
    TimeoutPolicy,
    load_settings,
    services_from_env,
)

__all__ = [
    "ConfigError",
    "Service",
    "Settings",
    "TimeoutPolicy",
    "create_app",
    "load_settings",
    "services_from_env",
]
