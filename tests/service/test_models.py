"""GET /models and prototype pictures, against what the store holds."""

from __future__ import annotations

import io

from PIL import Image

from model_store import ModelStore


def test_model_list_and_detail(client) -> None:
    listing = client.get("/models").json()
    assert listing["default_model"] == "photo"
    photo = next(m for m in listing["models"] if m["name"] == "photo")
    assert photo["versions"] == ["1"] and photo["aliases"] == {"latest": "1"}
    assert photo["loaded"] == ["1"]
    d = client.get("/models/photo").json()
    assert d["version"] == "1" and d["aliases"] == ["latest"]
    assert d["classes"] == ["cat", "person", "coffee"]
    assert d["num_prototypes"] == 9 and d["prototypes_per_class"] == {
        "cat": 3,
        "person": 3,
        "coffee": 3,
    }
    assert d["trunk"] == "small_cnn" and d["image_size"] == 64 and d["accuracy"] == 0.5
    assert d["prototype_shape"] == [32, 1, 1] and d["preprocessing"]["resize"] == "pad"
    assert client.get("/models/photo@latest").json()["manifest_sha256"] == d["manifest_sha256"]


def test_prototypes_and_their_pictures(client, store_root) -> None:
    protos = client.get("/models/photo/prototypes").json()
    assert protos["version"] == "1" and len(protos["prototypes"]) == 9
    first = protos["prototypes"][0]
    assert first["label"] == "cat" and first["source_image_id"] == "cat"
    assert first["latent_cell"] == {"h": 5, "w": 6} and first["source_size"] == {
        "width": 451,
        "height": 300,
    }
    loaded = ModelStore(store_root).load("photo@1")
    for kind in ("patch", "source", "activation"):
        r = client.get(first["images"][kind])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == loaded.prototype_image(0, kind).read_bytes()  # type: ignore[union-attr]
    src = Image.open(io.BytesIO(client.get("/models/photo/prototypes/0.png?kind=source").content))
    assert src.size == (451, 300)
    patch = Image.open(io.BytesIO(client.get("/models/photo/prototypes/0.png").content))
    b = first["box"]
    assert patch.size == (b["x1"] - b["x0"], b["y1"] - b["y0"])


def test_model_errors(client) -> None:
    r = client.get("/models/photo/prototypes/99.png")
    assert r.status_code == 404 and "valid: 0..8" in r.json()["error"]["message"]
    r = client.get("/models/photo/prototypes/1.png?kind=thumbnail")
    assert r.status_code == 422
    assert "'patch', 'source' or 'activation'" in r.json()["error"]["message"]
    r = client.get("/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    r = client.get("/models/photo@7")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"


def test_api_docs_describe_every_parameter_and_route(client) -> None:  # type: ignore[no-untyped-def]
    # Front-end teams read /docs: no route without a description, no bare parameter.
    spec = client.get("/openapi.json").json()
    bare = [
        f"{method.upper()} {path} {p['name']}"
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        for p in op.get("parameters", [])
        if not (p.get("description") or p.get("schema", {}).get("description"))
    ]
    assert bare == []
    undescribed = [
        f"{method.upper()} {path}"
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if not op.get("description")
    ]
    assert undescribed == []
