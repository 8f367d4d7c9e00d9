"""The corpus of bad and unusual uploads through the real server: the right status, a
JSON error naming the problem, never a 500; unusual but valid images are explained."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.service.corpus import (
    Case,
    animated_gif,
    bad_inputs,
    encode,
    exif_rotated,
    sixteen_bit_png,
)

CASES = bad_inputs()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(client, case: Case) -> None:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    r = client.post("/explain", content=case.data, headers=headers)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    assert r.headers["x-content-type-options"] == "nosniff"  # never sniffed into HTML
    body = r.json()
    if case.code is None:
        assert body["prediction"]["label"] in {"cat", "person", "coffee"}
        return
    err = body["error"]
    assert err["code"] == case.code
    assert case.message in err["message"], err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


def test_multipart_errors(client) -> None:
    r = client.post("/explain", files={"picture": ("a.png", b"x", "image/png")})
    assert r.status_code == 422
    assert "no field 'image'" in r.json()["error"]["message"]
    assert "picture" in r.json()["error"]["message"]
    r = client.post("/explain", data={"image": "not a file"}, files={"other": ("a", b"x")})
    assert r.status_code == 422 and "must be a file" in r.json()["error"]["message"]
    r = client.post("/explain", files={"image": ("a.txt", b"plain words", "text/plain")})
    assert r.status_code == 415 and "looks like text" in r.json()["error"]["message"]


def test_bad_options(client) -> None:
    png = encode(Image.new("RGB", (32, 32), (200, 10, 10)), "PNG")
    h = {"Content-Type": "image/png"}
    for params, needle in [
        ({"top_classes": 0}, "top_classes must be between 1 and 50 (got 0)"),
        ({"top_prototypes": 100000}, "top_prototypes must be between 1 and 200"),
        ({"top_classes": "many"}, "top_classes: Input should be a valid integer"),
        ({"heatmaps": "svg"}, "Input should be 'url', 'inline' or 'none' (got 'svg')"),
    ]:
        r = client.post("/explain", content=png, headers=h, params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_option"
        assert needle in r.json()["error"]["message"]
    r = client.post("/explain", content=png, headers=h, params={"model": "nope@3"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_model"
    assert "valid: " in r.json()["error"]["message"] and "photo" in r.json()["error"]["message"]
    r = client.post("/explain", content=png, headers=h, params={"model": "photo@9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"
    assert "valid: 1, latest" in r.json()["error"]["message"]
    r = client.post("/explain", content=png, headers=h, params={"model": "photo@"})
    assert r.status_code == 422 and "nothing after '@'" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_use_the_error_shape(client) -> None:
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/explain")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def _logits(body: dict) -> dict[int, float]:
    return {c["class_index"]: c["logit"] for c in body["top_classes"]}


def post(client, data: bytes, ctype: str) -> dict:
    r = client.post("/explain", content=data, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    return r.json()


def test_exif_orientation_is_applied(client, photo_images) -> None:
    """An EXIF-rotated PNG explains exactly like the same pixels rotated by hand."""
    img = photo_images["cat"].resize((150, 100))
    tagged = post(client, exif_rotated(img, "PNG", 6), "image/png")
    upright = post(client, encode(img.transpose(Image.Transpose.ROTATE_270), "PNG"), "image/png")
    assert tagged["image"]["received"] == {"width": 150, "height": 100}
    assert tagged["image"]["oriented"] == {"width": 100, "height": 150}
    assert tagged["image"]["exif_orientation"] == 6
    assert tagged["image"]["display"] == {"width": 100, "height": 150}
    assert _logits(tagged) == pytest.approx(_logits(upright), abs=1e-5)
    assert [p["box"] for p in tagged["prototypes"]] == [p["box"] for p in upright["prototypes"]]
    for p in tagged["prototypes"]:
        assert 0 <= p["box"]["x0"] < p["box"]["x1"] <= 100
        assert 0 <= p["box"]["y0"] < p["box"]["y1"] <= 150


def test_animated_gif_uses_its_first_frame(client) -> None:
    gif, first = animated_gif()
    anim = post(client, gif, "image/gif")
    still = post(client, encode(first, "PNG"), "image/png")
    assert anim["image"]["frames"] == 3 and anim["image"]["format"] == "GIF"
    assert _logits(anim) == pytest.approx(_logits(still), abs=1e-5)


def test_sixteen_bit_png_keeps_its_full_range(client, photo_images) -> None:
    grey = np.asarray(photo_images["coffee"].resize((120, 80)).convert("L"))
    deep = post(client, sixteen_bit_png(grey), "image/png")
    eight = post(client, encode(Image.fromarray(grey, "L"), "PNG"), "image/png")
    assert deep["image"]["mode"] == "I;16"
    assert _logits(deep) == pytest.approx(_logits(eight), abs=1e-4)


def test_cmyk_and_transparency_are_converted(client, photo_images) -> None:
    small = photo_images["cat"].resize((120, 80))
    cmyk_jpeg = encode(small.convert("CMYK"), "JPEG", quality=95)
    cmyk = post(client, cmyk_jpeg, "image/jpeg")
    assert cmyk["image"]["mode"] == "CMYK"
    # Its colours, not just its mode: the answer is that of the same file's pixels
    # turned to RGB, and those pixels are the photograph's (JPEG noise aside), not its
    # inks read as red, green and blue.
    as_rgb = Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB")
    gap = np.abs(np.asarray(as_rgb, dtype=np.int16) - np.asarray(small, dtype=np.int16))
    assert gap.mean() < 4, gap.mean()
    rgb = post(client, encode(as_rgb, "PNG"), "image/png")
    assert _logits(cmyk) == pytest.approx(_logits(rgb), abs=1e-5)
    inks = Image.fromarray(np.asarray(small.convert("CMYK"))[..., :3])  # C, M, Y as R, G, B
    wrong = post(client, encode(inks, "PNG"), "image/png")
    assert _logits(wrong) != pytest.approx(_logits(rgb), abs=1e-3)  # the check can tell
    rgba = small.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white, not black
    clear = post(client, encode(rgba, "PNG"), "image/png")
    white = post(client, encode(Image.new("RGB", (120, 80), "white"), "PNG"), "image/png")
    assert _logits(clear) == pytest.approx(_logits(white), abs=1e-5)
    boxes = client.get(clear["links"]["boxes"])
    assert Image.open(io.BytesIO(boxes.content)).size == (120, 80)


def test_errors_cut_what_they_echo_and_name_the_configured_limit(client) -> None:
    png = encode(Image.new("RGB", (32, 32), (200, 10, 10)), "PNG")
    h = {"Content-Type": "image/png"}
    r = client.post("/explain", content=png, headers=h, params={"top_classes": "9" * 5000})
    assert r.status_code == 422
    msg = r.json()["error"]["message"]
    assert len(r.content) < 600 and "(5002 characters)" in msg, msg
    # An empty model is a mistake, not a request for the default.
    for params in ({"model": ""}, {"model": "  "}):
        r = client.post("/explain", content=png, headers=h, params=params)
        assert r.status_code == 422, r.text
        assert "model is empty" in r.json()["error"]["message"]
    r = client.post("/explain", data={"model": ""}, files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 422 and "model is empty" in r.json()["error"]["message"]
    # A multipart upload over the limit names the limit the operator set: 10 MiB.
    big = np.random.default_rng(0).integers(0, 256, 10 * 1024 * 1024 + 5000, np.uint8)
    r = client.post("/explain", files={"image": ("big.png", big.tobytes(), "image/png")})
    assert r.status_code == 413
    msg = r.json()["error"]["message"]
    assert "the limit is 10485760 bytes (10 MiB" in msg and "10.1 MiB" not in msg, msg


def test_prototype_indices_are_parsed_strictly(client, photo_images) -> None:
    body = post(client, encode(photo_images["cat"].resize((64, 64)), "PNG"), "image/png")
    j = body["prototypes"][0]["prototype"]
    eid = body["id"]
    assert client.get(f"/explanations/{eid}/heatmaps/{j}.png").status_code == 200
    for bad in ("-0", "%20" + str(j), str(j) + "%20", "0" + str(j), "+" + str(j), "1e1"):
        r = client.get(f"/explanations/{eid}/heatmaps/{bad}.png")
        assert r.status_code == 422, (bad, r.status_code)
        assert "written in digits" in r.json()["error"]["message"], r.text
        r = client.get(f"/models/photo/prototypes/{bad}.png")
        assert r.status_code == 422, (bad, r.status_code)
