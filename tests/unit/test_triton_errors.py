"""Triton's errors, translated by their status code (gRPC and HTTP), never by their text."""

from __future__ import annotations

import aiohttp
import pytest
from tritonclient.utils import InferenceServerException

from client_proxy.core.services import Service
from client_proxy.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from client_proxy.triton.errors import translate

SERVICE = Service("setosa", "grpc", "10.1.2.3:8001", "setosa")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", UpstreamRejected),
        ("400", UpstreamRejected),
        ("StatusCode.NOT_FOUND", UpstreamUnavailable),
        ("404", UpstreamUnavailable),
        ("StatusCode.UNAVAILABLE", UpstreamUnavailable),
        ("StatusCode.CANCELLED", UpstreamUnavailable),
        ("503", UpstreamUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", UpstreamTimeout),
        ("504", UpstreamTimeout),
        ("StatusCode.INTERNAL", UpstreamError),
        ("500", UpstreamError),
        (None, UpstreamError),
    ],
)
def test_the_status_code_decides_whatever_the_message_says(status: str | None, kind: type) -> None:
    # The message says the opposite of the status: the status wins.
    misleading = (
        "unknown model; is not ready; failed to connect" if kind is not UpstreamUnavailable else "bad input"
    )
    error = translate(InferenceServerException(msg=misleading, status=status), SERVICE)
    assert type(error) is kind
    assert error.details["service"] == "setosa" and error.message.startswith("setosa: ")


def test_a_missing_model_is_named_and_no_address_reaches_the_message() -> None:
    missing = translate(InferenceServerException(msg="x", status="StatusCode.NOT_FOUND"), SERVICE)
    assert "model 'setosa' is not available" in missing.message
    down = InferenceServerException(
        msg="failed to connect to ipv4:10.1.2.3:8001", status="StatusCode.UNAVAILABLE"
    )
    assert "10.1.2.3" not in translate(down, SERVICE).message


def test_transport_exceptions_are_translated_by_their_type() -> None:
    assert isinstance(translate(TimeoutError(), SERVICE), UpstreamTimeout)
    assert isinstance(translate(ConnectionRefusedError(), SERVICE), UpstreamUnavailable)
    assert isinstance(translate(aiohttp.ServerDisconnectedError(), SERVICE), UpstreamUnavailable)
    assert type(translate(KeyError("x"), SERVICE)) is UpstreamError
    already = UpstreamRejected("setosa: no", service="setosa")
    assert translate(already, SERVICE) is already
