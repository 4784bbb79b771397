"""Ray Serve, a peer of the proxy in ``make bench`` ("Peers"): the three Iris classifiers as three
deployments running the committed ONNX files with onnxruntime, and an ingress deployment that
calls them at once through ``DeploymentHandle``s and answers the seed's ``/predict/label``
(``{"data": [[...]]}`` -> ``{"prediction": {"proba", "label"}}``, a list for N rows), the highest
P(class) winning, the first on ties, as the proxy's ``one_vs_rest``.

Run in its own virtual environment (``.venv-ray``, from ``requirements/ray.txt``: Ray is kept out
of the project's own installs) by ``python -m bench.peers.ray_serve --port P``; it serves until
SIGTERM or SIGINT. A local Ray cluster starts with it (its processes are this one's descendants,
so the bench counts their CPU), on the CPUs the machine has, without its dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import ray
from numpy.typing import NDArray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from bench.reaping import end_leftovers, session_members

CLASSES = ("setosa", "versicolor", "virginica")
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


class Classifier:
    """One classifier: P(class) per row."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as Triton's models are configured
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        p: NDArray[np.float32] = self._session.run(None, {"input": x})[0][:, 0]
        return p


class Ingress:
    """``POST /predict/label``: the three classifiers at once, the seed's rule over their answers."""

    def __init__(self, *classifiers: Any) -> None:
        self._classifiers = classifiers

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            x = np.asarray((await request.json())["data"], dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != 4:
                raise ValueError(f"expected rows of 4 features, not shape {x.shape}")
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        columns = await asyncio.gather(*(c.remote(x) for c in self._classifiers))
        scores = np.stack(columns, axis=1)
        label = scores.argmax(axis=1)
        rows = [{"proba": float(scores[i, j]), "label": CLASSES[j]} for i, j in enumerate(label)]
        return JSONResponse({"prediction": rows[0] if len(rows) == 1 else rows})


#: Requests each replica may hold at once. Serve's default, 5 (it was 100 before Ray 2.32), holds
#: the benchmark's 16 and 64 clients back in Serve's router, which then backs off and retries:
#: configured as a user composing models this way would, for as many as the bench sends.
MAX_ONGOING_REQUESTS = 100


def application(repository: Path = REPOSITORY) -> Any:
    """The ingress bound to the three classifiers, each a deployment that asks Ray for no CPU of
    its own (four actors on a machine of two cores: Ray would otherwise wait for CPUs to free)."""
    deployment = serve.deployment(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS
    )
    classifiers = [deployment(Classifier).bind(str(repository / n / "1" / "model.onnx")) for n in CLASSES]
    return deployment(Ingress).bind(*classifiers)


#: How long the driver's shutdown may take before every process of its session is killed.
SHUTDOWN_S = 30.0


def _end_session(grace: float) -> None:
    """Every other process of this session (the bench starts this driver in one of its own)
    ended: given ``grace`` seconds, then killed."""
    end_leftovers([p for p in session_members(os.getsid(0)) if p != os.getpid()], grace)


def _end_session_after(delay: float) -> None:
    """The session ended ``delay`` seconds from now, this process with it: a shutdown that hangs
    leaves nothing behind."""
    time.sleep(delay)
    _end_session(grace=0)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.ray_serve", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: the shutdown is not cut short
        stop.set()

    def take_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)

    take_signals()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="WARNING")
    take_signals()  # ray.init puts its own SIGTERM handler in place (sys.exit, anywhere)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(application(args.repository), route_prefix="/predict/label")
        print(f"ray serve: /predict/label on 127.0.0.1:{args.port}", flush=True)
        stop.wait()
    finally:
        # Whatever the shutdown does, the cluster ends within SHUTDOWN_S: some of Ray's agents
        # outlive it (seen: the dashboard and runtime-env agents still there a minute later when
        # the bench was killed and nobody came to end them). They all stay in this session.
        threading.Thread(target=_end_session_after, args=(SHUTDOWN_S,), daemon=True).start()
        serve.shutdown()
        ray.shutdown()
        _end_session(grace=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
