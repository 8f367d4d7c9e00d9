"""Changing the store over HTTP with an admin key, through a real uvicorn process: the
promotion gate (PUT an alias) on real store versions, and the revisions a request cannot
make refused up front. The revision itself, on a trained model: tests/training/test_revise.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from model_store import ModelStore
from tests.model_store.conftest import publish_tiny
from tests.model_store.test_gate import _quality
from tests.support.servers import ServerProcess, start_server

ADMIN = {"X-API-Key": "admin-key"}
READER = {"X-API-Key": "reader-key"}


@pytest.fixture(scope="module")
def gate_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    s = ModelStore(tmp_path_factory.mktemp("gate-store"))
    good = {"test_accuracy": 0.90, "test_balanced_accuracy": 0.89}
    publish_tiny(s, seed=0, metrics=good, interpretability=_quality(), aliases=("production",))
    publish_tiny(s, seed=1, metrics={"test_accuracy": 0.895}, interpretability=_quality())
    worse = _quality(background_prototypes=2, unique_prototypes=5, duplicates=1, stability=0.8)
    publish_tiny(s, seed=2, metrics={"test_accuracy": 0.91}, interpretability=worse)
    return s


@pytest.fixture(scope="module")
def admin_server(
    tmp_path_factory: pytest.TempPathFactory, gate_store: ModelStore
) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("admin-server"), gate_store.root, default_model="tiny",
        models="tiny", api_keys="reader-key", admin_keys="admin-key",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(admin_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin_server.url, timeout=60) as c:
        yield c


def test_store_changes_are_off_without_admin_keys(client: httpx.Client) -> None:
    r = client.put("/models/photo/aliases/production", json={"version": "1"})
    assert r.status_code == 403, r.text
    assert "PROTOPNET_ADMIN_KEYS" in r.json()["error"]["message"]
    r = client.post("/models/photo/revisions", json={"remove": [0]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_the_gate_over_http(admin: httpx.Client, gate_store: ModelStore) -> None:
    url = "/models/tiny/aliases/production"
    r = admin.put(url, json={"version": "2"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = admin.put(url, json={"version": "2"}, headers=READER)  # may read, not change
    assert r.status_code == 403 and "not an admin key" in r.json()["error"]["message"]
    assert admin.get("/models/tiny@production", headers=ADMIN).json()["version"] == "1"

    r = admin.put(url, json={"version": "2", "by": "dr. reviewer"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["previous"], body["version"], body["promoted"], body["forced"]) == (
        "1", "2", True, False,
    )  # fmt: skip
    rows = {f["figure"]: f for f in body["comparison"]}
    assert (
        rows["test_accuracy"]["worse_by"] == pytest.approx(0.005)
        and rows["test_accuracy"]["passed"]
    )
    # The service answers with the moved alias at once.
    assert admin.get("/models/tiny@production", headers=READER).json()["version"] == "2"

    r = admin.put(url, json={"version": "3"}, headers=ADMIN)
    assert r.status_code == 409, r.text
    err, promotion = r.json()["error"], r.json()["promotion"]
    assert err["code"] == "gate_refused"
    assert (
        "tiny@3 is worse than tiny@2 on unique_share, background_share, stability"
        in (err["message"])
    )
    assert promotion["promoted"] is False and promotion["failed"] == [
        "unique_share", "background_share", "stability",
    ]  # fmt: skip
    bg = {f["figure"]: f for f in promotion["comparison"]}["background_share"]
    assert bg["worse_by"] == pytest.approx(2 / 6) and not bg["passed"]
    assert gate_store.aliases("tiny")["production"] == "2"  # unmoved

    r = admin.put(url, json={"version": "3", "force": True, "by": "ops"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["forced"] is True
    history = admin.get("/models/tiny/history", headers=READER).json()
    assert [(h["previous"], h["version"], h["by"], h["forced"]) for h in history[-2:]] == [
        ("1", "2", "dr. reviewer", False), ("2", "3", "ops", True),
    ]  # fmt: skip
    assert history[-1]["failed"] == ["unique_share", "background_share", "stability"]
    # A wider tolerance lets a worse version through without force.
    r = admin.put("/models/tiny/aliases/staging", json={"version": "1"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["comparison"] == []  # a new alias
    r = admin.put(
        "/models/tiny/aliases/staging", json={"version": "3", "tolerance": 0.5}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["forced"] is False


@pytest.mark.parametrize(
    ("url", "body", "status", "says"),
    [
        ("/models/tiny/aliases/production", {"version": "9"}, 404, "unknown version '9'"),
        ("/models/tiny/aliases/production", {"version": "2", "tolerance": -1}, 422, "tolerance"),
        ("/models/tiny/aliases/production", {"version": "2", "forse": True}, 422, "forse"),
        ("/models/tiny@2/aliases/production", {"version": "2"}, 422, "not a version"),
        ("/models/tiny/aliases/2", {"version": "1"}, 422, "reserved for versions"),
        ("/models/tiny/aliases/bad%20alias", {"version": "1"}, 422, "alias"),
        ("/models/nope/aliases/production", {"version": "1"}, 404, "unknown model 'nope'"),
        ("/models/tiny@1/revisions", {"remove": []}, 422, "remove"),
        ("/models/tiny@1/revisions", {"remove": [99]}, 422, "unknown prototype 99"),
        ("/models/tiny@1/revisions", {"remove": [0, 1, 2]}, 422, "without prototypes"),
        ("/models/tiny@1/revisions", {"remove": [0]}, 422, "no training configuration"),
        ("/models/tiny@1/revisions", {"remove": [0], "aliases": ["a b"]}, 422, "alias"),
    ],
)
def test_store_change_errors_say_what_is_wrong(
    admin: httpx.Client, url: str, body: dict, status: int, says: str
) -> None:
    r = admin.request("POST" if url.endswith("revisions") else "PUT", url, json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_an_unknown_revision_is_a_404(admin: httpx.Client) -> None:
    r = admin.get("/models/tiny/revisions/0123456789abcdef", headers=READER)
    assert r.status_code == 404 and "no revision" in r.json()["error"]["message"]
    r = admin.get("/models/tiny/revisions/..%2F..%2Fregistry", headers=READER)
    assert r.status_code == 404
