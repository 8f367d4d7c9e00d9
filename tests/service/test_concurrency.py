"""Many simultaneous requests on one server: all correct, batched (seen in /metrics),
overload answered with 503 + Retry-After, and in-flight requests finish on shutdown."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.corpus import encode
from tests.support.servers import metric_value, noisy, start_server

pytestmark = pytest.mark.slow


def test_concurrent_requests_are_batched_and_correct(
    tmp_path: Path, store_root: Path, photo_images
) -> None:
    """24 at once: each answer equals its one-at-a-time reference, batches formed. Then
    SIGTERM during a last burst: every request that reached the server is answered."""
    srv = start_server(tmp_path, store_root, max_batch=8, max_wait_ms=40, models="photo")
    try:
        imgs = [encode(noisy(photo_images["person"].resize((96, 96)), i), "PNG") for i in range(24)]
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            h = {"Content-Type": "image/png"}
            # References one at a time (the predict path has no cache).
            refs = [c.post("/predict", content=d, headers=h).json() for d in imgs]

            def explain(d: bytes) -> httpx.Response:
                return c.post("/explain", content=d, headers=h)

            with cf.ThreadPoolExecutor(24) as pool:
                results = list(pool.map(explain, imgs))
            metrics = c.get("/metrics").text
        for r, ref in zip(results, refs, strict=True):
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["prediction"]["class_index"] == ref["prediction"]["class_index"]
            got = {x["class_index"]: x["logit"] for x in body["top_classes"]}
            want = {x["class_index"]: x["logit"] for x in ref["top_classes"]}
            # Batched convolutions round differently from single ones: float32 noise only.
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
            for s in body["scoring_sheets"]:
                assert s["total"] == pytest.approx(got[s["class_index"]], abs=1e-4)
        m = "protopnet_batch_size"
        batches = metric_value(metrics, m + "_count", model="photo@1")
        single = metric_value(metrics, m + "_bucket", model="photo@1", le="1.0")
        assert batches - single >= 1, "no batch of more than one image was formed"
        assert metric_value(metrics, m + "_sum", model="photo@1") == 48  # warm-up not counted
        assert metric_value(metrics, "protopnet_queue_wait_seconds_count") >= 48
        assert (
            metric_value(metrics, "protopnet_requests_total", route="/explain", status="200") == 24
        )
        # Graceful shutdown: requests in flight at SIGTERM. Each client sends half of its
        # upload, waits, then the rest, so the server has begun every request when the
        # signal comes and none can have finished (a fixed sleep before the signal let
        # fast requests all finish first, or slow ones not yet arrive).
        big = encode(photo_images["person"], "PNG")

        def slow_upload() -> Iterator[bytes]:
            yield big[: len(big) // 2]
            time.sleep(1.0)
            yield big[len(big) // 2 :]

        with httpx.Client(base_url=srv.url, timeout=60) as c, cf.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(
                    c.post,
                    "/explain",
                    content=slow_upload(),
                    headers=h,
                    params={"top_prototypes": k, "heatmaps": "inline"},
                )
                for k in range(1, 5)
            ]
            time.sleep(0.4)
            srv.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [r.status_code for r in answers] == [200] * 4
        # uvicorn re-raises the signal after its graceful shutdown: -15 is a clean exit.
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        log = srv.log()
        assert "service stopped" in log
        after_term = log[log.index("Shutting down") :]
        assert '"POST /explain 200"' in after_term, "no request was in flight at SIGTERM"
    finally:
        srv.stop()


def test_overload_gets_503_with_retry_after(tmp_path: Path, store_root: Path, photo_images) -> None:
    """One image at a time, a queue of one: a burst overflows it."""
    srv = start_server(
        tmp_path, store_root, max_batch=1, max_wait_ms=0, max_queue=1, models="photo"
    )
    img = photo_images["cat"].resize((64, 48))
    h = {"Content-Type": "image/png"}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:

            def explain(i: int) -> httpx.Response:
                return c.post("/predict", content=encode(noisy(img, i), "PNG"), headers=h)

            with cf.ThreadPoolExecutor(32) as pool:
                burst = list(pool.map(explain, range(64)))
            codes = [r.status_code for r in burst]
            assert set(codes) <= {200, 503}, codes
            refused = [r for r in burst if r.status_code == 503]
            assert refused, "a queue of one never overflowed under 64 concurrent requests"
            for r in refused:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "overloaded"
                assert "retry after" in r.json()["error"]["message"]
            assert metric_value(c.get("/metrics").text, "protopnet_rejected_total") == len(refused)

    finally:
        srv.stop()
