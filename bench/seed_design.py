"""The seed's design, rebuilt for comparison only (never served by the project).

As the seed describes it: three FastAPI inference services, each running one ONNX model with
onnxruntime, and a FastAPI proxy that opens a new ``httpx.AsyncClient`` for every request and
fans out with ``asyncio.gather``. ``python -m bench.seed_design service setosa --port 8101`` or
``python -m bench.seed_design proxy --port 8100 --services setosa=http://127.0.0.1:8101,...``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


class Data(BaseModel):
    data: list[list[float]] = [[5.1, 3.5, 1.4, 0.2]]


def service_app(mode: str) -> FastAPI:
    """One inference service: the seed's ``/predict`` answers ``{"prediction": [p_class, p_other]}``."""
    session = ort.InferenceSession(
        str(REPOSITORY / mode / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"health": "ok"}

    @app.post("/predict")
    def predict(data: Data) -> dict[str, Any]:
        (proba,) = session.run(None, {"input": np.asarray(data.data, dtype=np.float32)})
        return {"prediction": proba[0].tolist()}

    return app


def proxy_app(services: dict[str, str]) -> FastAPI:
    """The seed's proxy: a new client per request, ``asyncio.gather``, the highest P(class) wins."""
    app = FastAPI()

    @app.post("/predict/label")
    async def predict_label(data: Data) -> dict[str, Any]:
        result: dict[str, Any] = {"prediction": {"proba": -1.0, "label": None}}
        async with httpx.AsyncClient() as client:

            async def call(name: str, url: str) -> tuple[str, httpx.Response]:
                return name, await client.post(f"{url}/predict", json={"data": data.data})

            responses = await asyncio.gather(*(call(n, u) for n, u in services.items()))
        for name, response in responses:
            proba = response.json()["prediction"][0]
            if result["prediction"]["proba"] < proba:
                result["prediction"] = {"proba": proba, "label": name}
        return result

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seed_design")
    parser.add_argument("role", choices=["service", "proxy"])
    parser.add_argument("mode", nargs="?", help="service: the model (setosa, versicolor, virginica)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--services", default="", help="proxy: name=url,name=url,...")
    args = parser.parse_args()
    if args.role == "service":
        app = service_app(args.mode)
    else:
        app = proxy_app(dict(item.split("=", 1) for item in args.services.split(",")))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
