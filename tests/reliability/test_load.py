"""Sustained load on a real server with Redis: every request answered, memory flat.

The CI form of ``python -m bench.load`` (60 s there, 15 s here after a 5 s warm-up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.load import RSS_GROWTH_LIMIT_MB, measure
from tests.support.serving import ModelSource

pytestmark = pytest.mark.slow


def test_sixteen_clients_no_errors_and_bounded_memory(
    tmp_path: Path, demo_source: ModelSource
) -> None:
    r = measure(tmp_path, demo_source, clients=16, duration_s=15.0, warmup_s=5.0)
    assert r["errors_5xx"] == 0, r["server_log_tail"]
    assert r["statuses"] == {"200": r["requests_total"]}, r["statuses"]
    assert r["requests"] >= 16, f"only {r['requests']} requests answered in 15 s"
    assert r["p50_ms"] is not None and r["p50_ms"] <= r["p99_ms"]
    # Every request was a new image: each explanation went through to Redis.
    assert r["explanations_in_redis"] == r["requests_total"]
    assert r["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, (
        f"the server's resident memory grew {r['rss_growth_mb']} MB after warm-up "
        f"({r['rss_after_warmup_mb']} -> {r['rss_end_mb']} MB)"
    )
