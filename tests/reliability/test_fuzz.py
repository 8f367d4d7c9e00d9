"""Input fuzzing: schemathesis against a real server's /openapi.json, no 5xx.

About 45 s of generated requests (every phase: examples, coverage, fuzzing, stateful)
against the demo-like model; ``python -m bench.faults --only fuzz`` runs 90 s.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import faults
from bench.serving import ModelSource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, demo_source: ModelSource) -> dict[str, Any]:
    return faults.fuzz(tmp_path_factory.mktemp("fuzz"), demo_source, max_time_s=45)


def test_schemathesis_finds_no_server_error(fuzzed: dict[str, Any]) -> None:
    assert fuzzed["exit_code"] == 0, fuzzed["output_tail"]
    assert fuzzed["failed_operations"] == 0, fuzzed["output_tail"]
    assert fuzzed["operations"] >= 10, f"only {fuzzed['operations']} operations tested"
    # The server's own count agrees: many requests, bad ones refused with 4xx, no 5xx.
    assert fuzzed["server_requests"] >= 500, fuzzed["server_statuses"]
    assert fuzzed["server_5xx"] == 0, fuzzed["server_statuses"]
    four = sum(n for code, n in fuzzed["server_statuses"].items() if code.startswith("4"))
    assert four > 0 and fuzzed["server_statuses"].get("200", 0) > 0


def test_openapi_references_all_resolve(fuzzed: dict[str, Any]) -> None:
    assert fuzzed["unresolved_refs"] == []
    assert fuzzed["skipped_schema_parts"] == []
