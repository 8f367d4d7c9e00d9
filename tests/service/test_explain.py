"""POST /explain and /predict through a real uvicorn process and a real Redis, checked
against brute-force references computed here from the published model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.explain import top_indices
from service.schemas import ExplainResponse
from tests.protopnet.reference import percentile_box
from tests.service.corpus import encode
from tests.service.helpers import (
    check_sheets,
    mask_box,
    png_of,
    post_image,
    reference,
    to_original,
)
from tests.service.store_builder import fashion_available, fashion_test_images
from tests.support.servers import RedisProcess, metric_value, start_server

PNG_HEADERS = {"Content-Type": "image/png"}

needs_fashion = pytest.mark.skipif(
    not fashion_available(), reason="Fashion-MNIST not installed (scripts/system-deps.sh)"
)


def test_explains_a_real_photograph(client, store_root, photo_images) -> None:
    # Rotated a little, so no latent patch is exactly a prototype: near distance 0 the log
    # similarity amplifies float32 rounding, and the loop reference runs in float64.
    img = photo_images["cat"].rotate(3)
    r = post_image(client, encode(img, "PNG"), top_prototypes=4)  # fewer than P = 9
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "photo" and body["model"]["version"] == "1"
    assert body["image"]["received"] == {"width": 451, "height": 300}
    assert body["image"]["display"] == body["image"]["oriented"]
    ref = reference(store_root, "photo@1", img)
    # Logits and probabilities against the loop reference.
    for c in body["top_classes"]:
        assert c["logit"] == pytest.approx(ref["logits"][c["class_index"]], abs=1e-3)
    probs = torch.tensor(ref["logits"]).softmax(0).numpy()
    assert body["prediction"]["class_index"] == int(ref["logits"].argmax())
    assert body["prediction"]["probability"] == pytest.approx(probs.max(), abs=1e-4)
    check_sheets(body, ref["logits"])
    # The body is exactly the documented schema: no field missing, renamed or extra.
    assert ExplainResponse.model_validate(body).model_dump(mode="json") == body
    P = len(ref["classes"])
    for sheet in body["scoring_sheets"]:
        k = sheet["class_index"]
        # A sheet's rows are exactly its class's own prototypes, with the model's weights.
        assert (
            sorted(r["prototype"] for r in sheet["rows"])
            == np.flatnonzero(ref["classes"] == k).tolist()
        )
        assert sheet["other_prototypes"] == P - len(sheet["rows"])
        for row in sheet["rows"]:
            assert row["similarity"] == pytest.approx(ref["sims"][row["prototype"]], abs=1e-3)
            assert row["weight"] == pytest.approx(ref["weights"][k, row["prototype"]], abs=1e-6)
        others = [j for j in range(P) if ref["classes"][j] != k]
        other = float(np.sum(ref["weights"][k, others] * ref["sims"][others]))
        assert sheet["other_total"] == pytest.approx(other, abs=1e-3)
    # The most activated prototypes over all classes, best first, by the reference's
    # similarities (to within float32 rounding: the closest two differ by 1.3e-3 here).
    tops = [p["prototype"] for p in body["top_prototypes"]]
    assert tops == top_indices(ref["sims"], len(tops)).tolist()
    for p in body["top_prototypes"] + body["prototypes"]:
        assert p["similarity"] == pytest.approx(ref["sims"][p["prototype"]], abs=1e-3)
    # Boxes: the reference upsamples with OpenCV's bicubic on the letterbox square (pad:
    # the 451 x 451 input square sits 75 px above the 300 px tall image).
    shown = {p["prototype"]: p for p in body["prototypes"]}
    assert set(p["prototype"] for p in body["top_prototypes"]) <= set(shown)
    for j, p in shown.items():
        full = cv2.resize(
            ref["maps"][j].astype(np.float32), (451, 451), interpolation=cv2.INTER_CUBIC
        )
        expect = percentile_box(full[75:375])
        got = p["box"]
        assert np.allclose([got["x0"], got["y0"], got["x1"], got["y1"]], expect, atol=1), (j, got)
        assert got["x0"] <= p["peak"]["x"] < got["x1"] and got["y0"] <= p["peak"]["y"] < got["y1"]


def test_a_prototype_matches_its_own_source_photograph(client, photo_images) -> None:
    """Prototypes were pushed onto latent patches of these photographs: the source image
    gives its prototypes the largest similarity, log(1 / eps), at the recorded cell."""
    body = post_image(client, encode(photo_images["cat"], "PNG"), top_prototypes=3).json()
    assert body["prediction"]["label"] == "cat"
    cells = {1: (8, 8), 0: (5, 6), 2: (10, 11)}  # store_builder's push cells of cat
    for top in body["top_prototypes"]:
        assert top["label"] == "cat"
        assert top["similarity"] > 8.5  # log(1 / 1e-4) = 9.21 up to float32 rounding
        cell = top["latent_cell"]
        assert (cell["h"], cell["w"]) == cells[top["prototype"]]


def test_every_box_is_the_percentile_box_of_its_heatmap(client, photo_images) -> None:
    """Coffee is 600 x 400: heatmaps are drawn at 512 x 341, boxes are in 600 x 400."""
    r = post_image(client, encode(photo_images["coffee"], "PNG"), top_prototypes=4)
    assert r.status_code == 200, r.text
    body = r.json()
    disp = body["image"]["display"]
    assert (disp["width"], disp["height"]) == (512, 341)
    size = (600, 400)
    scale = (600 / 512, 400 / 341)
    for p in body["prototypes"]:
        urls = p["heatmap"]
        mask = png_of(client, urls["mask"])
        overlay = png_of(client, urls["overlay"])
        heat = png_of(client, urls["heatmap"])
        assert mask.size == overlay.size == heat.size == (512, 341)
        assert (mask.mode, overlay.mode, heat.mode) == ("L", "RGB", "RGBA")
        m = np.asarray(mask)
        assert set(np.unique(m)) <= {0, 255}
        b = p["box"]
        assert to_original(mask_box(m), scale, size) == (b["x0"], b["y0"], b["x1"], b["y1"])
        # The RGBA heatmap's alpha is the activation: its peak lies in the mask.
        alpha = np.asarray(heat)[..., 3]
        y, x = np.unravel_index(alpha.argmax(), alpha.shape)
        assert m[y, x] == 255
    boxes = png_of(client, body["links"]["boxes"])
    assert boxes.size == (512, 341) and boxes.mode == "RGB"


def test_heatmaps_at_the_uploads_own_size(client, photo_images) -> None:
    """Boxes are in upload pixels; size=upload draws the map there, for a front end to lay
    over its full-size picture, and the headers say the size."""
    body = post_image(client, encode(photo_images["coffee"], "PNG"), top_prototypes=2).json()
    for p in body["prototypes"][:2]:
        base = p["heatmap"]["mask"].replace("style=mask", "")
        r = client.get(base + "style=mask&size=upload")
        assert r.status_code == 200, r.text
        assert (r.headers["x-heatmap-width"], r.headers["x-heatmap-height"]) == ("600", "400")
        mask = np.asarray(Image.open(io.BytesIO(r.content)))
        assert mask.shape == (400, 600)
        b = p["box"]
        # The percentile region at full size bounds the JSON's box to within a pixel of
        # the display map's rounding (boxes are grown outward from display pixels).
        got = mask_box(mask)
        assert np.allclose(got, (b["x0"], b["y0"], b["x1"], b["y1"]), atol=2), (got, b)
        heat = client.get(base + "style=heatmap&size=upload")
        assert Image.open(io.BytesIO(heat.content)).size == (600, 400)
        shown = client.get(base + "style=heatmap")
        assert (shown.headers["x-heatmap-width"], shown.headers["x-heatmap-height"]) == (
            "512",
            "341",
        )
        r = client.get(base + "style=overlay&size=upload")
        assert r.status_code == 422 and "style=heatmap" in r.json()["error"]["message"]


@needs_fashion
def test_explains_a_demo_model_image(client, store_root) -> None:
    imgs, _ = fashion_test_images(3)
    for arr in imgs:
        img = Image.fromarray(arr, "L")
        r = post_image(client, encode(img, "PNG"), model="fashion", top_classes=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "fashion"
        assert len(body["scoring_sheets"]) == 10
        ref = reference(store_root, "fashion@1", img)
        check_sheets(body, ref["logits"])
        # 28 x 28 "stretch": display = original, reference box straight from OpenCV.
        for p in body["prototypes"]:
            full = cv2.resize(
                ref["maps"][p["prototype"]].astype(np.float32),
                (28, 28),
                interpolation=cv2.INTER_CUBIC,
            )
            b = p["box"]
            assert np.allclose([b["x0"], b["y0"], b["x1"], b["y1"]], percentile_box(full), atol=1)
            m = np.asarray(png_of(client, p["heatmap"]["mask"]))
            assert mask_box(m) == (b["x0"], b["y0"], b["x1"], b["y1"])


def test_same_image_twice_is_a_cache_hit(client, redis_server: RedisProcess, photo_images) -> None:
    data = encode(photo_images["person"].resize((256, 256)), "JPEG", quality=90)
    before = client.get("/metrics").text
    first = post_image(client, data, "image/jpeg")
    second = post_image(client, data, "image/jpeg")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.json() == second.json()
    after = client.get("/metrics").text
    assert metric_value(after, "protopnet_cache_hits_total") > metric_value(
        before, "protopnet_cache_hits_total"
    )
    assert metric_value(after, "protopnet_cache_misses_total") > metric_value(
        before, "protopnet_cache_misses_total"
    )
    # The explanation lives in Redis, with a TTL, for every replica.
    eid = first.json()["id"]
    r = redis_server.client()
    key = f"protopnet:exp:{eid}"
    assert set(r.hkeys(key)) >= {b"json", b"render", b"image"}
    assert 0 < r.ttl(key) <= 3600
    # Other options are another explanation.
    third = post_image(client, data, "image/jpeg", top_prototypes=3)
    assert third.headers["x-cache"] == "miss" and third.json()["id"] != eid
    assert len(third.json()["top_prototypes"]) == 3


def test_a_small_image_is_kept_exactly_for_its_pictures(
    client, redis_server: RedisProcess, photo_images
) -> None:
    """Up to ~100 x 100 px the display image is stored as raw pixels, not as a JPEG: the
    boxes picture shows the upload's own pixels wherever no box or label is drawn."""
    small = photo_images["coffee"].convert("RGB").resize((64, 48))
    r = post_image(client, encode(small, "PNG"), top_prototypes=2)
    assert r.status_code == 200, r.text
    eid = r.json()["id"]
    assert b"image" not in redis_server.client().hkeys(f"protopnet:exp:{eid}")  # no JPEG
    boxes = np.asarray(png_of(client, r.json()["links"]["boxes"]))
    same = (boxes == np.asarray(small)).all(axis=2)
    assert boxes.shape == (48, 64, 3) and same.mean() > 0.5, same.mean()
    # A larger upload keeps its JPEG, which cannot reproduce the photo's pixels exactly.
    big = photo_images["coffee"].convert("RGB").resize((300, 200))
    r = post_image(client, encode(big, "PNG"), top_prototypes=2)
    assert b"image" in redis_server.client().hkeys(f"protopnet:exp:{r.json()['id']}")
    boxes = np.asarray(png_of(client, r.json()["links"]["boxes"]))
    assert (boxes == np.asarray(big)).all(axis=2).mean() < 0.5


def test_get_explanation_returns_the_same_json(client, photo_images) -> None:
    r = post_image(client, encode(photo_images["cat"].resize((120, 80)), "PNG"))
    body = r.json()
    again = client.get(body["links"]["self"])
    assert again.status_code == 200 and again.json() == body


def test_heatmaps_inline_and_none(client, photo_images) -> None:
    data = encode(photo_images["coffee"].resize((90, 60)), "PNG")
    inline = post_image(client, data, heatmaps="inline").json()
    assert inline["heatmaps"] == "inline"
    for p in inline["prototypes"]:
        png = Image.open(io.BytesIO(base64.b64decode(p["heatmap_png"])))
        assert png.format == "PNG" and png.size == (90, 60)
    # Inline pictures are drawn several to a worker job. Each is the one its prototype's
    # URL draws alone, for another explanation of the same image (another option, so
    # nothing comes from the first one's cache).
    alone = post_image(client, data, top_prototypes=11).json()
    assert alone["id"] != inline["id"]
    common = {p["prototype"] for p in alone["prototypes"]} & {
        p["prototype"] for p in inline["prototypes"]
    }
    assert len(common) >= 5, common
    for p in inline["prototypes"]:
        if p["prototype"] in common:
            r = client.get(f"/explanations/{alone['id']}/heatmaps/{p['prototype']}.png")
            assert r.status_code == 200 and base64.b64decode(p["heatmap_png"]) == r.content
    none = post_image(client, data, heatmaps="none").json()
    assert none["heatmaps"] == "none" and none["id"] == inline["id"]
    assert all(p["heatmap"] is None and p["heatmap_png"] is None for p in none["prototypes"])


def test_multipart_upload_with_form_options(client, photo_images) -> None:
    data = encode(photo_images["person"].resize((64, 64)), "PNG")
    r = client.post(
        "/explain",
        files={"image": ("a.png", data, "image/png")},
        data={"top_classes": "2", "top_prototypes": "5"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["top_classes"]) == 2 and len(body["top_prototypes"]) == 5
    # A query option wins over the same form field.
    r2 = client.post(
        "/explain?top_classes=1",
        files={"image": ("a.png", data, "image/png")},
        data={"top_classes": "2"},
    )
    assert len(r2.json()["top_classes"]) == 1


def test_predict_matches_explain(client, store_root, photo_images) -> None:
    img = photo_images["person"].resize((200, 200))
    data = encode(img, "PNG")
    pred = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
    assert pred.status_code == 200, pred.text
    p = pred.json()
    assert set(p) == {"model", "image", "prediction", "top_classes", "familiarity"}
    ref = reference(store_root, "photo@1", img)
    for c in p["top_classes"]:
        assert c["logit"] == pytest.approx(ref["logits"][c["class_index"]], abs=1e-3)
    assert p["prediction"]["class_index"] == int(ref["logits"].argmax())
    e = client.post("/explain", content=data, headers={"Content-Type": "image/png"}).json()
    assert p["top_classes"] == e["top_classes"][: len(p["top_classes"])]


@pytest.mark.slow
def test_predict_and_explain_break_a_tie_towards_the_lower_class(
    tmp_path: Path, store_root: Path, photo_images
) -> None:
    """A model whose classes 1 and 2 have the same last-layer row: every image ties them,
    bit for bit. /predict, /explain and its scoring sheets all put class 1 first."""
    loaded = ModelStore(store_root).load("photo")
    model = loaded.model
    with torch.no_grad():
        w = model.last_layer.weight
        w[2] = w[1]
        w[0] = -10.0  # far below: the tie is for first place
    store = ModelStore(tmp_path / "store")
    m = loaded.manifest
    store.publish("twins", model, m.preprocessing, ["low", "one", "two"], list(m.prototypes))
    srv = start_server(tmp_path, tmp_path / "store", default_model="twins", models="twins")
    try:
        data = encode(photo_images["cat"].resize((64, 64)), "PNG")
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            pred = c.post("/predict", content=data, headers=PNG_HEADERS).json()
            expl = c.post("/explain", content=data, headers=PNG_HEADERS).json()
    finally:
        srv.stop()
    for body in (pred, expl):
        order = [t["class_index"] for t in body["top_classes"]]
        assert order == [1, 2, 0], order
        assert body["top_classes"][0]["logit"] == body["top_classes"][1]["logit"]  # a tie
        assert body["prediction"]["label"] == "one"
    assert [s["class_index"] for s in expl["scoring_sheets"]] == [1, 2, 0]
