"""``python -m client_proxy``: serve the proxy with uvicorn on ``PROXY_HOST:PROXY_PORT`` (0.0.0.0:9000).

Invalid settings stop the start with one line naming the variable or the file and line (exit
code 2). ``python -m client_proxy --check`` checks the settings, the ``SERVICE_*`` variables and
the compositions and pipelines files the same way, and exits (0: valid) without serving.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile

import uvicorn
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE

from client_proxy import tracing
from client_proxy.api.lingering import LingeringHttpToolsProtocol
from client_proxy.config import (
    TracingSettings,
    check_settings,
    ensemble_service,
    initial_services,
    load_settings,
)
from client_proxy.core.compositions_file import CompositionError
from client_proxy.core.declared import load_configuration
from client_proxy.core.pipelines_file import PipelineError
from client_proxy.core.services import ConfigError
from client_proxy.logs import uvicorn_log_config
from client_proxy.workers import GENERATION, WORKERS_DIR, Supervisor


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python -m client_proxy [--check]  (settings: PROXY_* variables)", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        # Parsed here too (the app parses them again in each worker) so that a bad SERVICE_*
        # variable stops the start with one line instead of a traceback per worker.
        check_settings(settings)
        services = initial_services(os.environ, settings)
        ensemble_service(settings, services)
        load_configuration(settings, services, os.environ, warn=False)  # each worker warns in its log
        tracing.check(TracingSettings.from_environ(os.environ))
    except (ConfigError, PipelineError, CompositionError, tracing.TracingConfigError) as exc:
        print(f"client_proxy: error: {exc}", file=sys.stderr)
        return 2
    if args == ["--check"]:
        return 0
    _raise_descriptor_limit()
    config = uvicorn.Config(
        "client_proxy.asgi:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        # uvloop, accepting a burst of connections at once instead of one per loop turn.
        loop="client_proxy.api.accepting:new_event_loop",
        # httptools with a lingering close, so a client still sending a refused body reads the 413.
        http=LingeringHttpToolsProtocol,
        # The proxy logs one line per request itself, with its request id and each service's outcome.
        access_log=False,
        # Nothing here reads the client's address, so X-Forwarded-* need not be parsed per request.
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        # PROXY_LOG_FORMAT=json: uvicorn's own lines as JSON objects too, like the proxy's.
        log_config=uvicorn_log_config(settings.log_format) or LOGGING_CONFIG,
        timeout_graceful_shutdown=int(settings.deadline_ms / 1000) + 5,
        server_header=False,
    )
    if settings.workers == 1:
        os.environ.pop(GENERATION, None)
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        return 0 if server.started else STARTUP_FAILURE
    # Several workers: uvicorn's supervisor (SIGHUP handed on: workers.Supervisor), and a directory
    # of this user's alone where the workers share their metrics.
    with tempfile.TemporaryDirectory(prefix="client-proxy-") as directory:
        os.environ[WORKERS_DIR] = directory
        os.environ[GENERATION] = "1"
        with contextlib.suppress(KeyboardInterrupt):
            Supervisor(config, sockets=[config.bind_socket()]).run()
    return 0


def _raise_descriptor_limit() -> None:
    """The soft limit on open descriptors raised to the hard one (as Go's runtime does): every
    connection is one, and 1,024, a common soft default, is too few for the connection limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # else kept as it was
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    sys.exit(main())
