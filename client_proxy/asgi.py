"""The ASGI entry point for servers (``uvicorn client_proxy.asgi:app``): settings from the environment."""

import signal
import threading

from client_proxy.api.app import create_app

if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
    # SIGHUP reloads the configuration once the app has started (its lifespan); until then one
    # must not stop the process, which is what it does by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

app = create_app()
