"""The KServe v1 routes (service/routes/kserve.py) through the real server: instances as
base64 in the three accepted shapes, a raw image body, parameters, and errors that name
the instance at fault."""

from __future__ import annotations

import base64

import pytest

from service.schemas import KServeExplainResponse
from tests.service.corpus import encode
from tests.service.helpers import check_sheets, post_image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def images(photo_images) -> list[bytes]:
    return [encode(photo_images[k].resize((64, 64)), "PNG") for k in ("cat", "coffee", "person")]


def test_predict_and_explain_answer_every_instance_shape(client, images) -> None:
    payload = {
        "instances": [b64(images[0]), {"b64": b64(images[1])}, {"image": {"b64": b64(images[2])}}],
        "parameters": {"top_classes": 2},
    }
    r = client.post("/v1/models/photo:predict", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "photo" and len(body["predictions"]) == 3
    assert all(len(p["top_classes"]) == 2 for p in body["predictions"])
    direct = [
        client.post("/predict", content=d, headers={"Content-Type": "image/png"}).json()
        for d in images
    ]
    # One batched forward against three single ones: the same answers, the figures equal
    # up to float32 summation order.
    for p, d in zip(body["predictions"], direct, strict=True):
        got, want = p["prediction"], d["prediction"]
        assert (got["class_index"], got["label"]) == (want["class_index"], want["label"])
        assert got["logit"] == pytest.approx(want["logit"], rel=1e-5, abs=1e-6)
        assert got["probability"] == pytest.approx(want["probability"], rel=1e-5, abs=1e-6)
    e = client.post("/v1/models/photo@1:explain", json=payload)
    assert e.status_code == 200, e.text
    # Exactly the documented schema, each explanation included.
    assert KServeExplainResponse.model_validate(e.json()).model_dump(mode="json") == e.json()
    exps = e.json()["explanations"]
    assert len(exps) == 3
    for x in exps:
        check_sheets(x)
    # The same explanation as POST /explain with the same options, readable by its id.
    assert post_image(client, images[1], top_classes=2).json() == exps[1]
    assert client.get(f"/explanations/{exps[2]['id']}").json() == exps[2]


def test_a_raw_image_body_is_one_instance(client, images) -> None:
    r = client.post(
        "/v1/models/photo:predict",
        content=images[0],
        headers={"Content-Type": "image/png"},
        params={"top_classes": 1},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    assert len(r.json()["predictions"][0]["top_classes"]) == 1


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"instances": ["not base64!"]}, 422, "instances[0] is not valid base64"),
        ({"instances": [{"image": {}}]}, 422, "instances 0 KServeInstance image b64: Field"),
        ({"instances": ["aGVsbG8="] * 17}, 422, "the limit is 16 (PROTOPNET_MAX_INSTANCES)"),
        ({"instances": "x"}, 422, "instances"),
        ({"instances": ["aGVsbG8="], "parameters": {"top_classes": 0}}, 422, "top_classes must"),
        ({"instances": []}, 422, "List should have at least 1 item"),
    ],
)
def test_bad_requests_name_what_is_wrong(client, payload, status, needle) -> None:
    r = client.post("/v1/models/photo:predict", json=payload)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"], r.json()


def test_a_bad_instance_among_good_ones_is_named(client, images) -> None:
    corrupt = images[1][:40] + bytes(200)
    r = client.post("/v1/models/photo:explain", json={"instances": [b64(images[0]), b64(corrupt)]})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("instances[1]: ") and "PNG" in msg, msg
    unknown = client.post("/v1/models/nope:predict", json={"instances": [b64(images[0])]})
    assert unknown.status_code == 404 and "photo" in unknown.json()["error"]["message"]
