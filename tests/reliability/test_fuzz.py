"""Input fuzzing: schemathesis against a real server's /openapi.json, no 5xx; and the
bodies it found that once crashed the server, sent on purpose.

About 45 s of generated requests (every phase: examples, coverage, fuzzing, stateful)
against the demo-like model; ``python -m bench.faults --only fuzz`` runs 90 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import faults
from tests.support.servers import ServerProcess
from tests.support.serving import ModelSource, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_source: ModelSource
) -> Iterator[ServerProcess]:
    s = serve(tmp_path_factory.mktemp("fuzz-server"), demo_source, log_level="warning")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, server: ServerProcess) -> dict[str, Any]:
    return faults.fuzz_server(server.url, tmp_path_factory.mktemp("fuzz"), max_time_s=45)


def test_schemathesis_finds_no_server_error(fuzzed: dict[str, Any]) -> None:
    assert fuzzed["exit_code"] == 0, fuzzed["output_tail"]
    assert fuzzed["failed_operations"] == 0, fuzzed["failures"]
    assert fuzzed["operations"] >= 10, f"only {fuzzed['operations']} operations tested"
    # The server's own count agrees: many requests, bad ones refused with 4xx, no 5xx.
    assert fuzzed["server_requests"] >= 500, fuzzed["server_statuses"]
    assert fuzzed["server_5xx"] == 0, fuzzed["server_statuses"]
    four = sum(n for code, n in fuzzed["server_statuses"].items() if code.startswith("4"))
    assert four > 0 and fuzzed["server_statuses"].get("200", 0) > 0


def test_openapi_references_all_resolve(fuzzed: dict[str, Any]) -> None:
    """Client generators (and schemathesis) need every $ref to point inside the document."""
    assert fuzzed["unresolved_refs"] == []
    assert fuzzed["skipped_schema_parts"] == []


@pytest.mark.parametrize("verb", ["predict", "explain"])
@pytest.mark.parametrize(
    "body",
    [b"\xff\x032_", b'{"instances": ["\xff"]}'],
    ids=["not-utf8", "not-utf8-inside-json"],
)
def test_kserve_body_that_is_not_utf8_json_is_a_client_error(
    server: ServerProcess, demo_source: ModelSource, verb: str, body: bytes
) -> None:
    """Found by schemathesis: a JSON body that is not UTF-8 got a 500 (the error message
    was built with ValidationError.json(), which cannot encode the bytes it quotes)."""
    r = httpx.post(
        f"{server.url}/v1/models/{demo_source.name}:{verb}",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code in (400, 422), r.text
    assert "JSON" in r.json()["error"]["message"]
