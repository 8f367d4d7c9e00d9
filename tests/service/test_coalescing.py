"""One explanation id, one answer: identical uploads in flight share one computation (one
replica), two replicas computing the same id at once hand out the body Redis kept, and a
pushed model scores an image the same over HTTP (batched, channels-last) as through
the Python API (batch 1 and 16, NCHW)."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model_store import ModelStore
from protopnet.explain import PrototypeExplainer
from protopnet.preprocess import eval_transform, to_model_mode
from tests.service.corpus import encode
from tests.support.servers import RedisProcess, metric_value, noisy, start_server

pytestmark = pytest.mark.slow
PNG = {"Content-Type": "image/png"}


def burst(url: str, data: bytes, n: int) -> list[httpx.Response]:
    """``n`` identical uploads sent at the same moment, each on its own connection."""
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(httpx.post, f"{url}/explain", content=data, headers=PNG, timeout=60)
            for _ in range(n)
        ]
        return [f.result() for f in futures]


def test_sixteen_identical_uploads_are_computed_once(server, client, photo_images) -> None:
    data = encode(noisy(photo_images["cat"].resize((160, 120)), 2101), "PNG")
    before = client.get("/metrics").text
    results = burst(server.url, data, 16)
    after = client.get("/metrics").text
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len({r.content for r in results}) == 1  # one id, one body, byte for byte
    assert sum(r.headers["x-cache"] == "miss" for r in results) == 1

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("protopnet_batch_size_sum", model="photo@1") == 1  # one forward, one image
    shared = delta("protopnet_coalesced_total")
    hits = delta("protopnet_cache_hits_total")
    assert shared + hits == 15 and shared >= 1


def test_two_replicas_hand_out_the_body_redis_kept(
    tmp_path: Path, store_root: Path, redis_server: RedisProcess, photo_images
) -> None:
    a = start_server(tmp_path, store_root, redis_url=redis_server.url, models="photo")
    b = start_server(tmp_path, store_root, redis_url=redis_server.url, models="photo")
    try:
        for seed in range(3):  # each round a new image, sent to both replicas at once
            data = encode(noisy(photo_images["person"].resize((128, 128)), 2200 + seed), "PNG")
            with cf.ThreadPoolExecutor(2) as pool:
                ra, rb = pool.map(burst, [a.url, b.url], [data, data], [8, 8])
            bodies = {r.content for r in ra + rb if r.status_code == 200}
            assert len(ra + rb) == 16 and len(bodies) == 1
            eid = ra[0].json()["id"]
            for srv in (a, b):  # and what either replica serves for the id afterwards
                assert httpx.get(f"{srv.url}/explanations/{eid}").content in bodies
    finally:
        a.stop()
        b.stop()


def test_a_pushed_model_scores_alike_over_http_and_the_python_api(
    client, store_root: Path, photo_images
) -> None:
    """The cat photograph is the source of its prototypes: their distances are exact
    matches, where float32 cancellation used to move a logit by up to 0.13."""
    img = photo_images["cat"]
    body = client.post("/explain", content=encode(img, "PNG"), headers=PNG).json()
    loaded = ModelStore(store_root).load("photo")
    prep = loaded.manifest.preprocessing
    explainer = PrototypeExplainer(loaded.model.eval(), prep, max_map_side=512)
    x = eval_transform(prep)(to_model_mode(img, prep))[None]  # (1, 3, S, S)
    others = torch.stack(
        [eval_transform(prep)(to_model_mode(noisy(img, s), prep)) for s in range(15)]
    )
    with torch.inference_mode():
        alone = explainer.attribute(x, [img.size])[0]
        batched = explainer.attribute(torch.cat([others[:7], x, others[7:]]), [img.size] * 16)[7]
    http_logits = {c["class_index"]: c["logit"] for c in body["top_classes"]}
    http_sims = {p["prototype"]: p["similarity"] for p in body["top_prototypes"]}
    assert max(http_sims.values()) > 9.2  # log(1 / 1e-4) = 9.2103
    for exp in (alone, batched):
        for k, v in http_logits.items():
            assert v == pytest.approx(float(exp.logits[k]), rel=1e-5, abs=1e-5)
        for j, v in http_sims.items():
            assert v == pytest.approx(float(exp.similarities[j]), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(alone.logits.numpy(), batched.logits.numpy(), rtol=1e-5)
