"""Two replicas sharing one Redis: either answers the other's explanations; Redis killed
mid-test, the service keeps answering and says it is degraded; Redis back, it recovers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.corpus import encode
from tests.support.servers import RedisProcess, ServerProcess, free_port, launch_server, noisy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outage_redis() -> Iterator[RedisProcess]:
    r = RedisProcess(free_port())
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, store_root: Path, outage_redis: RedisProcess
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("replicas")
    opts = {"redis_url": outage_redis.url, "redis_retry_s": 0.3, "models": "photo"}
    a, b = launch_server(tmp, store_root, **opts), launch_server(tmp, store_root, **opts)
    try:
        a.wait()
        b.wait()
    except Exception:
        a.stop()
        b.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def explain(c: httpx.Client, data: bytes) -> httpx.Response:
    r = c.post("/explain", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r


def wait_status(c: httpx.Client, status: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = c.get("/readyz")
        body = r.json()
        if body["status"] == status:
            assert r.status_code == 200
            return body
        time.sleep(0.1)
    raise AssertionError(f"readyz never became {status!r}: {body}")


def test_replicas_share_explanations_and_survive_redis_outage(
    replicas: tuple[ServerProcess, ServerProcess], outage_redis: RedisProcess, photo_images
) -> None:
    a_srv, b_srv = replicas
    with (
        httpx.Client(base_url=a_srv.url, timeout=30) as a,
        httpx.Client(base_url=b_srv.url, timeout=30) as b,
    ):
        wait_status(a, "ready")
        img = photo_images["coffee"].resize((160, 120))
        # Made by A, served by B from Redis: JSON, heatmap PNG and report.
        first = explain(a, encode(img, "PNG")).json()
        assert b.get(f"/explanations/{first['id']}").json() == first
        png = b.get(first["prototypes"][0]["heatmap"]["overlay"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert explain(b, encode(img, "PNG")).headers["x-cache"] == "hit"

        outage_redis.stop()
        during = explain(a, encode(noisy(img, 1), "PNG")).json()  # still answers
        body = wait_status(a, "degraded")
        assert body["cache"] == "degraded" and "redis unreachable" in body["detail"]
        again = a.get(f"/explanations/{during['id']}")  # from A's in-process cache
        assert again.status_code == 200 and again.json() == during
        assert a.get(during["prototypes"][0]["heatmap"]["mask"]).status_code == 200
        assert a.get(during["links"]["report"]).status_code == 200
        hit = explain(a, encode(noisy(img, 1), "PNG"))
        assert hit.headers["x-cache"] == "hit"
        # B never saw it and Redis is gone: a clear 404, not a 500.
        missing = b.get(f"/explanations/{during['id']}")
        assert missing.status_code == 404 and "POST the image" in missing.json()["error"]["message"]
        metrics = a.get("/metrics").text
        assert "protopnet_redis_up 0.0" in metrics

        outage_redis.start()
        wait_status(a, "ready")
        wait_status(b, "ready")
        after = explain(a, encode(noisy(img, 2), "PNG")).json()
        assert outage_redis.client().exists(f"protopnet:exp:{after['id']}")
        assert b.get(f"/explanations/{after['id']}").json() == after
