"""Response schemas, for the OpenAPI documentation (and the fuzz tests that hold the proxy to it).

The routes build their JSON by hand for speed; these models describe what they build.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, RootModel


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    code: str
    message: str
    request_id: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Failure(BaseModel):
    reason: Literal["timeout", "unavailable", "rejected", "error", "cancelled"]
    message: str


class ServicePrediction(BaseModel):
    prediction: list[float] | list[list[float]] | None
    """``[P(class), P(other)]`` for one row; one such pair per row for N rows; null if missing."""
    error: Failure | None = None


class Live(BaseModel):
    status: Literal["live"]


class Ready(BaseModel):
    status: Literal["ready", "unavailable", "draining"]
    ready_services: list[str] | None = None
    """With ``ready``: the services of the default composition that Triton says are ready."""
    reason: str | None = None
    """Otherwise: why not."""


class Predictions(RootModel[dict[str, ServicePrediction]]):
    """Service name -> its prediction."""


class Label(BaseModel):
    proba: float
    label: str


class LabelAnswer(BaseModel):
    prediction: Label | list[Label]
    partial: bool | None = None
    missing: dict[str, Failure] | None = None
    variant: str | None = None
    """For an experiment: the variant that answered."""


class Health(BaseModel):
    health: Literal["ok"]


class ServiceHealth(_Open):
    target: str
    health: Literal["ok", "unavailable"]
    ready: bool


class FeatureStoreHealth(BaseModel):
    url: str
    kind: str
    ready: bool


class HealthAll(BaseModel):
    status: Literal["ok", "degraded"]
    services: dict[str, ServiceHealth]
    feature_store: FeatureStoreHealth | None = None


class Metadata(_Open):
    data_type: str
    data_structure: str
    services: dict[str, dict[str, Any]]


class PipelineList(BaseModel):
    file: str
    pipelines: dict[str, dict[str, Any]]


class PipelineLabel(Label):
    stopped_at: str


class PipelineAnswer(BaseModel):
    pipeline: str
    prediction: PipelineLabel | list[PipelineLabel]
    path: list[dict[str, Any]]
    triton_calls: int
    variant: str | None = None
    """For an experiment: the variant that answered."""


def errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the error body's schema."""
    return {status: {"description": text, "model": ErrorBody} for status, text in descriptions.items()}


# -- the Open Inference Protocol (/v2) ---------------------------------------------------------
class OipError(BaseModel):
    """The protocol's error body."""

    error: str


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool
    error: str | None = None
    """When not ready: why."""


class ModelReady(BaseModel):
    name: str
    ready: bool
    error: str | None = None
    """When not ready: why."""


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelConfig(_Open):
    """Triton's model configuration (its JSON form)."""

    name: str
    max_batch_size: int


class OutputTensor(_Open):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    """Absent when the tensor is in binary after the JSON (``parameters.binary_data_size``)."""


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    """A partial answer: ``partial``, ``missing`` (the services) and ``missing.<service>`` (why)."""
    outputs: list[OutputTensor]


def oip_errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the protocol's error statuses (``{"error": "..."}``)."""
    return {status: {"description": text, "model": OipError} for status, text in descriptions.items()}
