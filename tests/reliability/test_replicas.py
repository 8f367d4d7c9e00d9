"""Fail-over through a real proxy: Debian's nginx with the deployment's configuration
(deploy/nginx/protopnet.conf.template) in front of three service processes sharing a
Redis, under 16 clients. A replica SIGKILLed mid-load and a rolling restart (SIGTERM
each, start it again) must fail no request, and every explanation id handed out must
stay readable from the survivors."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import ModelStore
from tests.support.proxy import nginx_available
from tests.support.replicas import run_scenarios
from tests.support.serving import ModelSource, RequestImages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nginx_available(), reason="Debian's nginx is not installed"),
]


def test_a_killed_replica_and_a_rolling_restart_fail_no_request(
    tmp_path: Path, demo_source: ModelSource
) -> None:
    prep = ModelStore(demo_source.store).load(demo_source.ref).manifest.preprocessing
    result = run_scenarios(
        tmp_path, demo_source.store, RequestImages(prep), clients=16, phase_s=4.0,
        default_model=demo_source.ref, models=demo_source.ref, worker_threads=1, torch_threads=1,
    )  # fmt: skip
    for name, s in result.items():
        assert s["requests"] > 50, (name, s)
        assert s["failed"] == 0, (name, s)
        assert s["ids_unreadable"] == 0, (name, s)
        assert s["p99_ms_during"] is not None, (name, s)
