"""Map methods through the real server: smoothgrad made on demand for one prototype
from the kept model input (the same map as SmoothGrad run by hand on the decoded image,
its own box in the headers, cached), method=smoothgrad and method=prp on /explain (every
box from that map, as by hand), the report's labels, and a clear error for bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from model_store import ModelStore
from protopnet.explain import source_boxes
from protopnet.faithfulness import SmoothGrad
from protopnet.preprocess import eval_transform, to_model_mode
from protopnet.prp import PRP
from tests.service.corpus import encode
from tests.service.helpers import post_image


def _white_box(png: bytes) -> tuple[int, int, int, int]:
    m = np.asarray(Image.open(io.BytesIO(png)))
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_a_smoothgrad_heatmap_is_made_on_demand_with_its_own_box(
    client, store_root: Path, photo_images
) -> None:
    img = photo_images["coffee"]
    body = post_image(client, encode(img, "PNG"), top_prototypes=3).json()
    j = body["prototypes"][0]["prototype"]
    url = f"/explanations/{body['id']}/heatmaps/{j}.png"
    plain = client.get(url, params={"style": "mask", "size": "upload"})
    assert plain.headers["x-heatmap-method"] == "upsample"
    r = client.get(url, params={"style": "mask", "size": "upload", "method": "smoothgrad"})
    assert r.status_code == 200, r.text
    assert r.headers["x-heatmap-method"] == "smoothgrad"
    box = tuple(int(v) for v in r.headers["x-heatmap-box"].split(","))
    assert r.content != plain.content
    # The mask's white region is bounded by the header's box (the same map, placed twice).
    got = _white_box(r.content)
    assert all(abs(a - b) <= 1 for a, b in zip(got, box, strict=True)), (got, box)
    # By hand: SmoothGrad on the decoded image, its map placed on the upload, its box.
    loaded = ModelStore(store_root).load("photo@1")
    prep = loaded.manifest.preprocessing
    x = eval_transform(prep)(to_model_mode(img, prep))
    m = SmoothGrad(loaded.model).attribute(x, [j])
    _, want = source_boxes(m, img.size, prep)
    assert all(abs(a - b) <= 2 for a, b in zip(box, want[0].tolist(), strict=True)), (box, want)
    # Asked again: the cached picture and box.
    again = client.get(url, params={"style": "mask", "size": "upload", "method": "smoothgrad"})
    assert (
        again.content == r.content and again.headers["x-heatmap-box"] == r.headers["x-heatmap-box"]
    )
    overlay = client.get(url, params={"method": "smoothgrad"})
    assert (
        overlay.status_code == 200
        and overlay.headers["x-heatmap-box"] == r.headers["x-heatmap-box"]
    )


def test_bad_map_requests_say_what_is_wrong(client, photo_images) -> None:
    body = post_image(
        client, encode(photo_images["cat"], "PNG"), top_prototypes=1, top_classes=1
    ).json()
    shown = {p["prototype"] for p in body["prototypes"]}
    j = next(iter(shown))
    r = client.get(f"/explanations/{body['id']}/heatmaps/{j}.png", params={"method": "gradcam"})
    assert r.status_code == 422 and "method" in r.text and "smoothgrad" in r.text
    other = next(k for k in range(9) if k not in shown)
    r = client.get(
        f"/explanations/{body['id']}/heatmaps/{other}.png", params={"method": "smoothgrad"}
    )
    assert (
        r.status_code == 404
        and "has no heatmap in this explanation" in r.json()["error"]["message"]
    )


def test_explain_with_method_smoothgrad_draws_every_map_and_box_from_it(
    client, server, browser, photo_images
) -> None:
    data_ = encode(photo_images["coffee"], "PNG")
    plain = post_image(client, data_, top_prototypes=3).json()
    r = post_image(client, data_, top_prototypes=3, method="smoothgrad")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] != plain["id"]  # its own cache entry
    assert [p["prototype"] for p in body["prototypes"]] == [
        p["prototype"] for p in plain["prototypes"]
    ]
    assert all(p["map_method"] == "smoothgrad" for p in body["prototypes"])
    assert all(p["map_method"] == "upsample" for p in plain["prototypes"])
    # Each JSON box is the one the on-demand SmoothGrad map of the plain explanation has
    # (the same map: same input, same cell, same seed; within the float16 input's 2 px).
    for p, q in zip(body["prototypes"], plain["prototypes"], strict=True):
        url = f"/explanations/{plain['id']}/heatmaps/{q['prototype']}.png"
        h = client.get(url, params={"method": "smoothgrad", "style": "mask"}).headers
        want = [int(v) for v in h["x-heatmap-box"].split(",")]
        got = [p["box"][k] for k in ("x0", "y0", "x1", "y1")]
        assert all(abs(a - b) <= 2 for a, b in zip(got, want, strict=True)), (got, want)
    # Its heatmaps say so; the paper's map is still there on demand, with its own box.
    j = body["prototypes"][0]["prototype"]
    url = f"/explanations/{body['id']}/heatmaps/{j}.png"
    assert client.get(url).headers["x-heatmap-method"] == "smoothgrad"
    up = client.get(url, params={"method": "upsample", "style": "mask", "size": "upload"})
    assert up.headers["x-heatmap-method"] == "upsample"
    b = plain["prototypes"][0]["box"]  # again within the float16 input's 2 px
    got = [int(v) for v in up.headers["x-heatmap-box"].split(",")]
    want = [b[k] for k in ("x0", "y0", "x1", "y1")]
    assert all(abs(a - c) <= 2 for a, c in zip(got, want, strict=True)), (got, want)
    # The report names the method under each map.
    page = browser.new_page()
    page.goto(server.url + body["links"]["report"], wait_until="load")
    labels = page.locator(".map-method").all_inner_texts()
    assert labels and set(labels) == {"SmoothGrad map"}
    page.close()


def test_explain_with_method_prp_draws_every_box_from_relevance(
    client, server, browser, store_root: Path, photo_images
) -> None:
    img = photo_images["coffee"]
    r = post_image(client, encode(img, "PNG"), top_prototypes=3, method="prp")
    assert r.status_code == 200, r.text
    body = r.json()
    assert all(p["map_method"] == "prp" for p in body["prototypes"])
    # By hand: PRP on the decoded image, its maps placed on the upload, their boxes.
    loaded = ModelStore(store_root).load("photo@1")
    prep = loaded.manifest.preprocessing
    x = eval_transform(prep)(to_model_mode(img, prep))
    shown = [p["prototype"] for p in body["prototypes"]]
    _, want = source_boxes(PRP(loaded.model, prep).attribute(x, shown), img.size, prep)
    for p, w in zip(body["prototypes"], want.tolist(), strict=True):
        got = [p["box"][k] for k in ("x0", "y0", "x1", "y1")]
        assert all(abs(a - b) <= 2 for a, b in zip(got, w, strict=True)), (got, w)
    # The heatmap says which method made it; the report names it under each map.
    url = f"/explanations/{body['id']}/heatmaps/{shown[0]}.png"
    assert client.get(url).headers["x-heatmap-method"] == "prp"
    page = browser.new_page()
    page.goto(server.url + body["links"]["report"], wait_until="load")
    labels = page.locator(".map-method").all_inner_texts()
    assert labels and set(labels) == {"PRP relevance map"}
    page.close()
