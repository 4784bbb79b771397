"""``GET /pipelines`` and ``POST /pipelines/{name}``: the serial pattern."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from client_proxy.api.answers import pipeline_answer
from client_proxy.api.fastlane import route
from client_proxy.api.inputs import parse_inputs
from client_proxy.api.openapi import WITH_BODY
from client_proxy.api.reading import inference_request
from client_proxy.api.schemas import PipelineAnswer, PipelineList, errors
from client_proxy.api.state import JSON, ProxyState

router = APIRouter(tags=["pipelines"])


@router.get("/pipelines", response_class=JSON, responses={200: {"model": PipelineList}})
async def list_pipelines(request: Request) -> JSON:
    """The pipelines loaded from ``PROXY_PIPELINES_FILE``, step by step."""
    state: ProxyState = request.app.state.proxy
    config = state.config
    return JSON(
        {
            "file": config.pipelines_source,
            "pipelines": {name: p.describe() for name, p in config.pipelines.items()},
        }
    )


_ERRORS = {
    200: {"model": PipelineAnswer, "description": "The label per row, the path and each step's latency"},
    **errors(
        {
            400: "Body is not JSON; keys sent to a proxy without a feature store",
            404: "No such pipeline; none of the keys is in the feature store (named)",
            413: "Body too large",
            415: "Not application/json",
            422: "Invalid rows or parameters",
            503: "A step with on_failure: fail did not answer (named), no step answered, or the "
            "feature store is down",
            504: "A step with on_failure: fail was late (named), or the feature store was",
        }
    ),
}


async def run(request: Request) -> dict[str, Any]:
    """Run one pipeline on the rows: the label per row, the path taken and each step's latency."""
    state: ProxyState = request.app.state.proxy
    name = request.path_params["name"]
    inference = await inference_request(
        request, state, name, "/pipelines/{name}", parse_inputs, kind="pipeline"
    )
    return pipeline_answer(await state.plane.infer(inference))


#: The pipelines' inference route, served by the fast lane and documented by FastAPI.
ROUTES = [route("/pipelines/{name}", "POST", run, ["pipelines"], _ERRORS, WITH_BODY, JSON)]
