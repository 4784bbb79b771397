"""``python -m local_triton``: serve a model repository with the embedded Triton until Ctrl-C.

Errors that stop the start (port in use, wrong platform, missing wheel, a model that does
not load) are printed as one line, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from client_proxy.config import TracingSettings
from local_triton.server import (
    BY_KEY_REPOSITORY,
    DEFAULT_REPOSITORY,
    LaunchError,
    TritonServer,
    format_ready_line,
    models_in,
    trace_args,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m local_triton", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--address", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument("--model-control-mode", choices=["none", "explicit"], default="none")
    parser.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with explicit model control: a model to load at start (repeatable; '*' for all)",
    )
    parser.add_argument(
        "--feature-store",
        default=None,
        metavar="URL",
        help="also serve the models that read their own features (model_repository_by_key/) from "
        "this feature store (sqlite:///path.db, redis://host:6379/0, postgresql://user@host/db)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo Triton's own log")
    parser.add_argument(
        "--trace-url",
        default=None,
        metavar="URL",
        help="Triton's OpenTelemetry tracing of requests that carry a trace context, exported over "
        "OTLP/HTTP to URL (default: on where OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, to that endpoint)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    traced = TracingSettings.from_environ(os.environ)
    if args.trace_url is None and traced.enabled:
        args.trace_url = traced.traces_url
    server = TritonServer(
        model_repository=args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        log_verbose=args.log_verbose,
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        log_stream=None if args.quiet else sys.stderr,
        extra_args=trace_args(args.trace_url) if args.trace_url else (),
        extra_repositories=[BY_KEY_REPOSITORY] if args.feature_store else [],
        environment={"FEATURE_STORE": args.feature_store} if args.feature_store else {},
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except LaunchError as exc:
        print(f"local_triton: error: {exc}", file=sys.stderr)
        return 1
    try:
        models = models_in(server.model_repository)
        if args.feature_store:
            models += models_in(BY_KEY_REPOSITORY)
        print(format_ready_line(server, models), flush=True)
        while not stopping.wait(0.5):
            if not server.is_running():
                print("local_triton: error: Triton exited unexpectedly; see its log above", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
