"""The ASGI entry point for servers (``uvicorn client_proxy.asgi:app``): settings from the environment."""

from client_proxy.api.app import create_app
from client_proxy.reloading import hold_sighup

# SIGHUP reloads the configuration once the app has started (its lifespan); one that comes
# sooner must not stop the process (what it does by default), nor be lost: it is kept for then.
hold_sighup()

app = create_app()
