"""Schemathesis fuzzes every route from the OpenAPI schema: whatever a client sends,
the service never answers 500 and errors keep the one JSON shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

# Raw image bodies: random bytes, half of them starting like a PNG or a JPEG.
schemathesis.openapi.media_type(
    "image/*",
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=256).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=256).map(lambda b: b"\xff\xd8\xff\xe0" + b),
    ),
)


def test_no_server_errors(server) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
        def one(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=server.url, timeout=30)
            where = (case.method, case.formatted_path, response.status_code, response.text[:300])
            assert response.status_code < 500, where
            ctype = (response.headers.get("content-type") or [""])[0]  # header lists
            if response.status_code >= 400 and ctype.startswith("application/json"):
                err = response.json()["error"]
                assert err["code"] and err["message"] and err["request_id"], where

        one()
        checked.append(op.label)
    assert len(checked) >= 15, checked
