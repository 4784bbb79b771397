"""The proxy's errors. Each carries its HTTP status and a machine-readable code.

Nothing above ``gateway`` sees a tritonclient, aiohttp or grpc exception: the gateway
translates them into ``UpstreamError`` subclasses (``raise ... from``), and one exception
handler renders every ``ProxyError`` as ``{"error": {"code", "message", ...}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ProxyError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.details)
        return {"error": error}


# -- the client's fault -----------------------------------------------------------------------
class BadRequest(ProxyError):
    status_code = 400
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidInput(ProxyError):
    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(ProxyError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ProxyError):
    status_code = 415
    code = "unsupported_media_type"


class RequestTimeout(ProxyError):
    status_code = 408
    code = "request_timeout"


class UnknownService(ProxyError):
    status_code = 404
    code = "unknown_service"


class NotFound(ProxyError):
    """A route that is switched off (``/metrics`` with ``PROXY_METRICS=false``)."""

    status_code = 404
    code = "not_found"


class Unauthorized(ProxyError):
    status_code = 401
    code = "unauthorized"


class Conflict(ProxyError):
    status_code = 409
    code = "conflict"


class UnknownPipeline(ProxyError):
    status_code = 404
    code = "unknown_pipeline"


class UnknownComposition(ProxyError):
    status_code = 404
    code = "unknown_composition"


class UnknownKeys(ProxyError):
    """Entity keys the feature store does not hold (the ``keys`` field names them)."""

    status_code = 404
    code = "unknown_keys"


class NoFeatureStore(BadRequest):
    code = "no_feature_store"


# -- the feature store --------------------------------------------------------------------------
class FeatureStoreError(ProxyError):
    """The feature store could not be read: down, refusing, or answering with what is not features."""

    status_code = 503
    code = "feature_store_unavailable"


class FeatureStoreTimeout(FeatureStoreError):
    status_code = 504
    code = "feature_store_timeout"


# -- upstream (Triton) ------------------------------------------------------------------------
class UpstreamError(ProxyError):
    """A service did not answer. ``reason`` is what the response and the metrics call it."""

    status_code = 503
    code = "upstream_error"
    reason = "error"


class UpstreamUnavailable(UpstreamError):
    """Triton unreachable, or the model not loaded / not ready."""

    code = "upstream_unavailable"
    reason = "unavailable"


class UpstreamRejected(UpstreamError):
    """The model refused the input (Triton's ``INVALID_ARG``: gRPC ``INVALID_ARGUMENT``, HTTP
    400), e.g. a key its feature store does not hold: the client's to mend, not the server's."""

    status_code = 422
    code = "input_rejected"
    reason = "rejected"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
    reason = "timeout"


class AggregationFailed(ProxyError):
    """The services answered, but their answers cannot be combined as the composition says
    (outputs of another width, class names that differ): a configuration the models do not fit."""

    status_code = 502
    code = "aggregation_failed"


class CallCancelled(UpstreamError):
    """The request no longer needed this call (all_or_nothing failed fast, or the client left).

    Only counted in the metrics; never sent to a client."""

    reason = "cancelled"


@dataclass(frozen=True)
class Failure:
    """Why one service (or pipeline step) did not answer; in a response, ``{"reason", "message"}``."""

    reason: str
    """``timeout``, ``unavailable``, ``rejected``, ``error`` or ``cancelled`` (a step: ``skipped``)."""
    message: str

    @classmethod
    def of(cls, error: UpstreamError) -> Failure:
        return cls(error.reason, error.message)


class ServicesFailed(ProxyError):
    """A request could not be answered because of the named services (``failures``); a 504 when
    one of them was late, a 422 when every one refused the input, else a 503."""

    def __init__(self, message: str, failures: Mapping[str, Failure], timed_out: bool | None = None) -> None:
        super().__init__(message, services=dict(failures))
        self.failures = dict(failures)
        if timed_out is None:
            timed_out = any(f.reason == "timeout" for f in failures.values())
        if timed_out:
            self.status_code, self.code = 504, "upstream_timeout"
        elif failures and all(f.reason == UpstreamRejected.reason for f in failures.values()):
            self.status_code, self.code = 422, UpstreamRejected.code
        else:
            self.status_code, self.code = 503, "upstream_unavailable"
