"""A request's own deadline and policy (``client_proxy.api.reading``), from its query and headers."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from client_proxy.api.reading import ARRIVAL, MIN_DEADLINE_MS, call_options
from client_proxy.config import load_settings
from client_proxy.errors import InvalidInput


def _request(query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request({"type": "http", "query_string": query, "headers": headers or [], ARRIVAL: ("", 100.0)})


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize("value", ["49.9", "10", "0", "-5", "inf", "nan", "soon"])
def test_a_deadline_under_50_ms_or_not_a_number_is_a_422(where: str, value: str) -> None:
    request = (
        _request(query=b"deadline_ms=" + value.encode())
        if where == "query"
        else _request(headers=[(b"x-deadline-ms", value.encode())])
    )
    with pytest.raises(InvalidInput) as refused:
        call_options(request, load_settings())
    assert refused.value.status_code == 422
    assert f"at least {MIN_DEADLINE_MS:g} milliseconds" in str(refused.value) or "number" in str(
        refused.value
    )


def test_a_deadline_of_50_ms_or_more_is_taken_and_capped_by_the_setting() -> None:
    settings = load_settings(deadline_ms=2000)
    assert call_options(_request(query=b"deadline_ms=50"), settings).deadline == pytest.approx(100.05)
    assert call_options(_request(headers=[(b"x-deadline-ms", b"60000")]), settings).deadline == pytest.approx(
        102.0
    )
