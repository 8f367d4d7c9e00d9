"""Faults on real processes: Redis killed under load, SIGTERM under load, a corrupted
artifact in the store, training killed with SIGKILL mid-epoch and resumed.

The scenarios live in bench.faults (``python -m bench.faults`` records their figures);
these tests assert what a client or an operator would notice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import faults
from tests.support.serving import ModelSource

pytestmark = pytest.mark.slow


def test_redis_killed_and_restarted_under_load_fails_no_request(
    tmp_path: Path, demo_source: ModelSource
) -> None:
    r = faults.redis_outage(tmp_path, demo_source, before_s=3, down_s=4, after_s=3)
    assert r["explanations_in_redis_before_kill"] > 0, "Redis was never used before the kill"
    assert r["failed"] == 0, f"{r['failed']} failed requests: {r['first_failures']}"
    assert r["statuses"] == {"200": r["requests"]}
    # Load was running in each phase, and the service noticed the outage and the recovery.
    for phase in ("before", "during", "after"):
        assert r[phase]["requests"] > 0, f"no request {phase} the outage"
    assert "degraded" in r["readyz_while_down"], r["readyz_while_down"]
    assert set(r["readyz_while_down"]) <= {"ready", "degraded"}  # never out of rotation
    assert r["readyz_after"] == "ready" and r["redis_up_metric_after"] == 1.0
    assert r["explain_after_status"] == 200 and r["stored_in_redis_after"]


def test_sigterm_under_load_finishes_in_flight_requests(
    tmp_path: Path, demo_source: ModelSource
) -> None:
    r = faults.sigterm_under_load(tmp_path, demo_source, term_after_s=3)
    assert r["errors_5xx"] == 0 and r["http_errors"] == 0, r["statuses"]
    # Requests the server was working on when the signal came were answered ...
    assert r["answered_after_shutdown_began"] >= 1, "no request was in flight at SIGTERM"
    assert r["in_flight_answered_200"] >= 1
    # ... and no answer the server produced was lost on the way to its client.
    assert r["server_logged_200"] == r["client_received_200"]
    # What was not answered never reached the application (its request id is not in the
    # server's log): a refused connection, or a keep-alive one closed under a request
    # the server had not read (seen as a reset or an early close). A client may retry
    # those; never a timeout.
    assert r["requests_logged_by_server"] >= r["server_logged_200"] > 0
    assert r["unanswered_reached_app"] == 0, r
    dropped = {"ConnectError", "RemoteProtocolError", "ReadError", "WriteError"}
    assert set(r["unanswered_errors"]) <= dropped, r
    assert r["exit_code"] in (0, -15) and r["clean_stop_logged"]


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return faults.corrupted_artifact(tmp_path_factory.mktemp("corrupt"))


def test_corrupted_artifact_is_refused_naming_the_file(corrupt: dict[str, Any]) -> None:
    path = corrupt["corrupted_file"]
    assert corrupt["log_lines_naming_file"] >= 1
    assert (
        "IntegrityError" in corrupt["first_log_line"]
        and '"level": "error"' in (corrupt["first_log_line"])
    )
    # The other model keeps serving, as the default and by name.
    assert corrupt["explain_default_status"] == 200
    assert corrupt["explain_default_model"] == "good"
    assert corrupt["explain_good_status"] == 200
    # Asking for the broken one: an error naming the file, never a served model.
    broken = corrupt["explain_broken"]
    assert broken["status_code"] == 503 and broken["error"]["code"] == "model_unavailable"
    assert path in broken["error"]["message"]
    # /models lists it (it is in the store) but never as loaded.
    assert corrupt["models_listed"]["broken"]["loaded"] == []
    assert corrupt["models_listed"]["good"]["loaded"] == ["1"]
    assert path in corrupt["readyz"]["detail"]


def test_corrupted_artifact_does_not_take_the_replica_out_of_rotation(
    corrupt: dict[str, Any],
) -> None:
    """The replica serves the other model, so it stays ready: degraded, naming the file."""
    assert corrupt["readyz"]["status_code"] == 200
    assert corrupt["readyz"]["status"] == "degraded"
    assert corrupt["readyz"]["models"] == ["good@1"]
    assert corrupt["corrupted_file"] in corrupt["readyz"]["detail"]


def test_training_killed_mid_epoch_resumes_and_publishes(tmp_path: Path) -> None:
    r = faults.training_kill_resume(tmp_path)
    assert r["first_exit_code"] == -9 and r["killed_at"] is not None, r
    assert r["units_saved_before_kill"] == ["epoch 0 warm"]
    assert r["resume_exit_code"] == 0, r["resume_stderr_tail"]
    # Every unit exactly once, in order: the interrupted epoch was run again from its start.
    assert r["unit_numbers_after_resume"] == list(range(len(r["units_after_resume"])))
    assert r["units_after_resume"][:2] == ["epoch 0 warm", "epoch 1 joint"]
    assert r["units_after_resume"][-1].endswith("last_layer")
    assert r["published"] == "parts@1" and r["published_loads"]
    assert r["test_accuracy"] is not None and 0.0 <= r["test_accuracy"] <= 1.0
