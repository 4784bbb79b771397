"""The ASGI entry point for servers (``uvicorn client_proxy.asgi:app``): settings from the environment."""

from client_proxy.api.app import create_app

app = create_app()
