"""What several service test modules check the same way: a brute-force reference for a
stored model, the scoring-sheet invariants, reading a PNG the service served."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.preprocess import eval_transform, to_model_mode
from tests.protopnet.reference import logits_from_min_distances, patch_distances


def reference(store_root: Path, ref: str, img: Image.Image) -> dict[str, np.ndarray]:
    """Brute force: loop distances, similarities, logits; cv2 bicubic upsampled maps."""
    loaded = ModelStore(store_root).load(ref)
    model, prep = loaded.model, loaded.manifest.preprocessing
    x = eval_transform(prep)(to_model_mode(img, prep))[None]
    with torch.no_grad():
        z = model.conv_features(x).numpy()  # (1, D, H, W)
    protos = model.prototype_vectors.detach().numpy()
    d = patch_distances(z, protos)[0]  # (P, H', W')
    min_d = d.reshape(d.shape[0], -1).min(axis=1)
    w = model.last_layer.weight.detach().numpy()
    logits = logits_from_min_distances(min_d[None], w, "log")[0]
    sim_maps = np.log((d + 1) / (d + 1e-4))  # (P, H', W')
    return {
        "logits": logits,
        "sims": sim_maps.reshape(len(d), -1).max(1),
        "maps": sim_maps,
        "weights": w,  # (K, P)
        "classes": model.prototype_classes.numpy(),  # (P,)
    }


def post_image(client: httpx.Client, data: bytes, ctype: str = "image/png", **params: object):
    return client.post("/explain", content=data, headers={"Content-Type": ctype}, params=params)


def check_sheets(body: dict, ref_logits: np.ndarray | None = None) -> None:
    """Every class total equals its logit; rows are the class's own, sorted by points."""
    logits = {c["class_index"]: c["logit"] for c in body["top_classes"]}
    assert [s["class_index"] for s in body["scoring_sheets"]] == list(logits)
    for sheet in body["scoring_sheets"]:
        k = sheet["class_index"]
        assert sheet["total"] == pytest.approx(logits[k], abs=1e-4)
        assert sheet["logit"] == pytest.approx(logits[k], abs=1e-6)
        rows = sheet["rows"]
        assert sum(r["points"] for r in rows) == pytest.approx(sheet["own_total"], abs=1e-6)
        assert sheet["own_total"] + sheet["other_total"] == pytest.approx(sheet["total"], abs=1e-6)
        pts = [r["points"] for r in rows]
        assert pts == sorted(pts, reverse=True)
        for r in rows:
            assert r["points"] == pytest.approx(r["similarity"] * r["weight"], rel=1e-5, abs=1e-6)
        if ref_logits is not None:
            assert sheet["total"] == pytest.approx(ref_logits[k], abs=1e-3)


def png_of(client: httpx.Client, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    img = Image.open(io.BytesIO(r.content))
    img.load()
    return img


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def to_original(box: tuple[int, int, int, int], scale: tuple[float, float], size) -> tuple:
    """Display-pixel box -> original pixels, grown outward (as the explainer does)."""
    sx, sy = scale
    x0, y0, x1, y1 = box
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        min(int(np.ceil(x1 * sx)), size[0]),
        min(int(np.ceil(y1 * sy)), size[1]),
    )
