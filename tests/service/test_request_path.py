"""The request path's contracts, through real servers: links follow each replica's path
prefix while the cache keeps one entry; a prototype's picture is read from the store
without loading its model; the options are declared once for query, form and docs."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from PIL import Image

from model_store import ModelStore
from service.deps import ExplainOptions, PredictOptions
from service.main import create_app
from service.settings import Settings
from tests.service.store_builder import build_photo_model
from tests.support.servers import RedisProcess, start_server


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_links_follow_each_replicas_prefix_and_the_cache_is_shared(
    tmp_path: Path, store_root: Path, redis_server: RedisProcess, photo_images
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    upload = _png(photo_images["cat"])
    headers = {"Content-Type": "image/png"}
    plain = start_server(tmp_path / "a", store_root, redis_url=redis_server.url)
    prefixed = start_server(
        tmp_path / "b", store_root, redis_url=redis_server.url, root_path="/protopnet"
    )
    try:
        first = httpx.post(plain.url + "/explain", content=upload, headers=headers, timeout=60)
        second = httpx.post(prefixed.url + "/explain", content=upload, headers=headers, timeout=60)
        assert first.status_code == second.status_code == 200
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        a, b = first.json(), second.json()
        assert a["id"] == b["id"]
        assert a["links"]["report"] == f"/explanations/{a['id']}/report"
        assert b["links"]["report"] == f"/protopnet/explanations/{a['id']}/report"
        pa, pb = a["prototypes"][0], b["prototypes"][0]
        assert pb["heatmap"]["mask"] == "/protopnet" + pa["heatmap"]["mask"]
        assert pb["prototype_images"]["patch"] == "/protopnet" + pa["prototype_images"]["patch"]
        # Stored once, handed out under each replica's own prefix, and the links work.
        again = httpx.get(f"{plain.url}/explanations/{a['id']}", timeout=30).json()
        assert again["links"] == a["links"]
        r = httpx.get(plain.url + pa["heatmap"]["mask"], timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        stripped = pb["prototype_images"]["patch"].removeprefix("/protopnet")
        r = httpx.get(prefixed.url + stripped, timeout=30)  # a proxy strips the prefix
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        plain.stop()
        prefixed.stop()


def test_a_prototype_picture_is_read_without_loading_its_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    build_photo_model(store)
    build_photo_model(store, name="other", seed=2)
    (tmp_path / "s").mkdir()
    server = start_server(tmp_path / "s", store.root, default_model="photo", models="photo")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.get("/models/other/prototypes/2.png?kind=source")
            assert r.status_code == 200
            path = store.load("other@1").prototype_image(2, "source")
            assert path is not None and r.content == path.read_bytes()
            assert c.get("/models/other@latest/prototypes/2.png").status_code == 200
            listing = {m["name"]: m["loaded"] for m in c.get("/models").json()["models"]}
            assert listing == {"photo": ["1"], "other": []}
            assert list(c.get("/readyz").json()["devices"]) == ["photo@1"]
            r = c.get("/models/other/prototypes/99.png")
            assert r.status_code == 404 and "0..8" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_the_options_are_declared_once_for_the_query_the_form_and_the_docs(
    store_root: Path,
) -> None:
    app = create_app(Settings(store=store_root, models=[], redis_url=None, docs=True))
    spec = app.openapi()
    for path, options in (("/explain", ExplainOptions), ("/predict", PredictOptions)):
        op = spec["paths"][path]["post"]
        query = {p["name"] for p in op["parameters"] if p["in"] == "query"}
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert query == set(options.model_fields)
        assert set(form) == {"image", *options.model_fields}
    explain_form = spec["paths"]["/explain"]["post"]["requestBody"]["content"]
    props = explain_form["multipart/form-data"]["schema"]["properties"]
    assert props["top_prototypes"]["description"].startswith("most activated prototypes")
