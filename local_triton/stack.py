"""``python -m local_triton.stack`` (``make run``): the embedded Triton and the proxy, until Ctrl-C.

Triton starts first (ports 8000/8001/8002); the proxy (``python -m client_proxy``, port 9000)
then runs as its own process with ``SERVICE_*`` pointing at it, as docker compose would run
it. Either one exiting stops the other.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from local_triton.server import (
    DEFAULT_REPOSITORY,
    LaunchError,
    TritonServer,
    die_with_parent,
    format_ready_line,
    models_in,
    terminate,
)

SERVICES = ("setosa", "versicolor", "virginica")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_triton.stack", description=__doc__)
    parser.add_argument("--proxy-port", type=int, default=int(os.environ.get("PROXY_PORT", "9000")))
    parser.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    parser.add_argument(
        "--protocol", choices=["grpc", "http"], default=os.environ.get("PROXY_PROTOCOL", "grpc")
    )
    parser.add_argument("--triton-log", action="store_true", help="echo Triton's own log")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = TritonServer(
        model_repository=DEFAULT_REPOSITORY,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_stream=sys.stderr if args.triton_log else None,
    )
    try:
        server.start()
    except LaunchError as exc:
        print(f"local_triton: error: {exc}", file=sys.stderr)
        return 1
    print(format_ready_line(server, models_in(server.model_repository)), flush=True)
    port = server.grpc_port if args.protocol == "grpc" else server.http_port
    env = dict(os.environ, PROXY_PORT=str(args.proxy_port), PROXY_PROTOCOL=args.protocol)
    for name in SERVICES:
        env.setdefault(f"SERVICE_{name.upper()}", f"127.0.0.1:{port}")
    proxy = subprocess.Popen([sys.executable, "-m", "client_proxy"], env=env, preexec_fn=die_with_parent)
    print(f"proxy: http://127.0.0.1:{args.proxy_port} (docs at /docs); Ctrl-C stops both", flush=True)
    code = 0
    try:
        while not stopping.wait(0.5):
            if proxy.poll() is not None:
                print(f"proxy exited with code {proxy.returncode}", file=sys.stderr)
                code = proxy.returncode or 1
                break
            if not server.is_running():
                print("Triton exited unexpectedly", file=sys.stderr)
                code = 1
                break
    finally:
        terminate(proxy, timeout=15)
        server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
