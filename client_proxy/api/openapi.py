"""The OpenAPI descriptions of the hand-read routes: their parameters, bodies and errors.

The hot routes read their query, headers and body by hand (``reading.py``, ``inputs.py``), so
FastAPI cannot infer them; these dicts describe them for ``/docs`` and the fuzz tests."""

from __future__ import annotations

from typing import Any

from client_proxy.api.inputs import SAMPLE_ROW, PredictRequest
from client_proxy.api.schemas import LabelAnswer, Predictions, errors
from client_proxy.core.features import KEY
from client_proxy.core.services import TimeoutPolicy

PARAMETERS: dict[str, Any] = {
    "parameters": [
        {
            "name": "policy",
            "in": "query",
            "required": False,
            "description": "Timeout policy for this request (default: PROXY_TIMEOUT_POLICY)",
            "schema": {"type": "string", "enum": [p.value for p in TimeoutPolicy]},
        },
        {
            "name": "deadline_ms",
            "in": "query",
            "required": False,
            "description": "This request's deadline in ms, from 50 to PROXY_DEADLINE_MS",
            "schema": {"type": "number", "minimum": 50},
        },
        {
            "name": "X-Timeout-Policy",
            "in": "header",
            "required": False,
            "description": "Same as ?policy=",
            "schema": {"type": "string", "enum": [p.value for p in TimeoutPolicy]},
        },
        {
            "name": "X-Deadline-Ms",
            "in": "header",
            "required": False,
            "description": "Same as ?deadline_ms=",
            "schema": {"type": "number", "minimum": 50},
        },
        {
            "name": "X-Variant",
            "in": "header",
            "required": False,
            "description": "For an experiment that allows it (allow_pin), the variant that answers; "
            "the one that did is the answer's 'variant'",
            "schema": {"type": "string", "maxLength": 128},
        },
        {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "Request id, returned in the response and passed to Triton (made up when absent)",
            "schema": {"type": "string", "maxLength": 128},
        },
    ]
}


#: ``{"keys": [...]}``: entities whose rows the feature store holds (``PROXY_FEATURE_STORE``).
KEYS: dict[str, Any] = {
    "type": "object",
    "title": "Keys (rows read from the feature store)",
    "required": ["keys"],
    "additionalProperties": False,
    "properties": {
        "keys": {
            "type": "array",
            "minItems": 1,
            "description": "Entity keys: the proxy reads their rows from PROXY_FEATURE_STORE (the feature "
            "set PROXY_FEATURE_SET, or the composition's or pipeline's features) in one lookup; a "
            "composition with keys: forward sends them to its services instead",
            "items": {"type": "string", "pattern": KEY.pattern},
        }
    },
}
_BY_KEY_EXAMPLE = {"summary": "Rows by key", "value": {"keys": ["flower-17", "flower-120"]}}

WITH_BODY: dict[str, Any] = {
    **PARAMETERS,
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [PredictRequest.model_json_schema(), KEYS]},
                "examples": {
                    "seed": {"summary": "The seed's request", "value": {"data": [[1.0, 2.0, 3.0, 4.0]]}},
                    "batch": {"summary": "Two rows", "value": {"data": [SAMPLE_ROW, [6.3, 3.3, 6.0, 2.5]]}},
                    "by_key": _BY_KEY_EXAMPLE,
                },
            }
        },
    },
}


ERRORS = errors(
    {
        400: "Body is not JSON; keys sent to a proxy without a feature store",
        404: "None of the keys is in the feature store (all_or_nothing: one is not); the keys are named",
        408: "Body still arriving at the deadline",
        413: "Body over PROXY_MAX_BODY_BYTES",
        415: "Not application/json, or compressed",
        422: "Rows missing, of the wrong length or type, not finite, or too many; a bad parameter",
        503: "No service answered (all_or_nothing: one did not), or the feature store is down; named",
        504: "Deadline missed (all_or_nothing: a service was late), or the feature store was; named",
    }
)


PREDICTIONS = {200: {"model": Predictions, "description": "Each service's probabilities"}, **ERRORS}


LABELS = {200: {"model": LabelAnswer, "description": "The label per row"}, **ERRORS}


LABEL: dict[str, Any] = {
    **WITH_BODY,
    "parameters": [
        *PARAMETERS["parameters"],
        {
            "name": "route",
            "in": "query",
            "required": False,
            "description": "fanout (the proxy calls every service) or ensemble (one call to Triton's "
            "iris_ensemble); default PROXY_LABEL_ROUTE; also the X-Route header",
            "schema": {"type": "string", "enum": ["fanout", "ensemble"]},
        },
    ],
}


COMPOSITION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "title": "Rows",
                            "required": ["data"],
                            "additionalProperties": False,
                            "properties": {
                                "data": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {"anyOf": [{"type": "number"}, {"type": "string"}]},
                                    },
                                }
                            },
                        },
                        {
                            "type": "object",
                            "title": "Named tensors (Open Inference Protocol)",
                            "required": ["inputs"],
                            "additionalProperties": False,
                            "properties": {
                                "inputs": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["name", "shape", "datatype", "data"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "name": {"type": "string", "minLength": 1},
                                            "shape": {
                                                "type": "array",
                                                "minItems": 1,
                                                "items": {"type": "integer", "minimum": 0},
                                            },
                                            "datatype": {"type": "string"},
                                            "data": {"type": "array"},
                                        },
                                    },
                                }
                            },
                        },
                        KEYS,
                    ]
                },
                "examples": {
                    "by_key": _BY_KEY_EXAMPLE,
                    "wine": {
                        "value": {
                            "data": [
                                [13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]
                            ]
                        }
                    },
                },
            }
        },
    }
}


COMPOSITION_ERRORS = errors(
    {
        400: "Body is not JSON; keys sent to a proxy without a feature store",
        404: "No such composition; none of the keys is in the feature store (named)",
        413: "Body too large",
        415: "Not application/json",
        422: "Rows that do not fit a service's model (named), invalid parameters, or input every "
        "service's model refused (input_rejected: a forwarded key its store lacks)",
        502: "The services answered but their answers cannot be combined as declared",
        503: "Too few services answered (named, with reasons), or the feature store is down",
        504: "Too few services answered in time, or the feature store did not",
    }
)


# -- the Open Inference Protocol (/v2) ---------------------------------------------------------
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
V2_MODEL: dict[str, Any] = {"parameters": [_NAME]}
V2_MODEL_VERSION: dict[str, Any] = {"parameters": [_NAME, _VERSION]}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "data": {"type": "array"},
        "parameters": {"type": "object"},
    },
}
V2_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "description": "timeout (microseconds), timeout_policy, binary_data_output",
                        },
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                },
                "examples": {
                    "iris_fanout": {
                        "summary": "The seed's row, to the Iris fan-out",
                        "value": {
                            "inputs": [
                                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": SAMPLE_ROW}
                            ]
                        },
                    }
                },
            }
        },
    }
}


def streamed(description: str, errors: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a streaming route: NDJSON lines (``description``), or ``errors``."""
    return {200: {"content": {"application/x-ndjson": {}}, "description": description}, **errors}
