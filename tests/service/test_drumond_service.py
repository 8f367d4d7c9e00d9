"""A Drumond soft-max prototype model through the real thing: trained and published by
the command line (frozen ImageNet EfficientNet-Lite0 on the synthetic parts set), served
by a real uvicorn process beside a ProtoPNet of the same data, explained over HTTP and
read in Chromium. The numbers are checked against a plain loop over the published
weights."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.drumond import AMBIGUOUS_BELOW, MATCHED_MASS
from protopnet.preprocess import eval_transform
from tests.service.helpers import post_image
from tests.support.servers import ServerProcess, start_server
from tests.training.conftest import run_cli
from training.config import load_config
from training.data import build_splits
from training.drumond import NEAREST_K, NEAREST_TILE

pytestmark = pytest.mark.slow

DRUMOND = "parts-drumond"
DRUMOND_SET = [
    "--set", "model.kind=drumond", "--set", "model.backbone=efficientnet_lite0",
    "--set", "model.weights=imagenet", "--set", "model.img_size=64",
    "--set", f"export.name={DRUMOND}",
]  # fmt: skip


@pytest.fixture(scope="module")
def kinds_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("drumond")
    store = base / "store"
    for run, extra in (("protopnet", []), ("drumond", DRUMOND_SET)):
        proc = run_cli(
            "train", "--config", "synthetic", "--run-dir", str(base / run),
            "--set", f"export.store={store}", *extra, "--export",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def kinds_server(
    kinds_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("drumond-server"), kinds_store,
        default_model=DRUMOND, models=f"{DRUMOND},parts",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(kinds_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kinds_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def test_images() -> list[bytes]:
    test = build_splits(load_config("synthetic").data, 0).test
    out = []
    for i in range(0, len(test), 5):  # 16 images, every class
        buf = io.BytesIO()
        test.load(i).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def reference(store: Path, png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(q, logits) of the published model by a plain loop over its prototypes, float64."""
    loaded = ModelStore(store).load_drumond(f"{DRUMOND}@1")
    x = eval_transform(loaded.manifest.preprocessing)(Image.open(io.BytesIO(png)))
    with torch.no_grad():
        emb = loaded.model.features(x[None]).mean(dim=(2, 3))[0].double().numpy()
    protos = loaded.model.head.prototypes.detach().double().numpy()
    w = loaded.model.head.class_weights.detach().double().numpy()
    d = np.array([((emb - p) ** 2).sum() for p in protos])
    e = np.exp(-(d - d.min()) / 2)
    q = e / e.sum()
    return q, np.array([sum(w[k, j] * q[j] for j in range(len(q))) for k in range(len(w))])


def test_the_store_says_each_versions_kind(kinds_store: Path) -> None:
    store = ModelStore(kinds_store)
    assert store.describe(f"{DRUMOND}@1")["kind"] == "drumond"
    assert store.describe("parts@1")["kind"] == "protopnet"
    m = store.any_manifest(f"{DRUMOND}@1")
    assert m.kind == "drumond" and len(m.prototypes) == m.architecture.num_prototypes == 12
    assert m.metrics.test_accuracy is not None and m.metrics.test_accuracy > 0.5


def test_explain_answers_q_the_class_and_matched_prototypes_as_a_loop_does(
    client: httpx.Client, kinds_store: Path, test_images: list[bytes]
) -> None:
    manifest = ModelStore(kinds_store).any_manifest(f"{DRUMOND}@1")
    for png in test_images[:6]:
        r = post_image(client, png, top_prototypes=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["kind"] == "drumond"
        q, logits = reference(kinds_store, png)
        assert body["prediction"]["class_index"] == int(np.argmax(logits))
        for c in body["top_classes"]:
            assert c["logit"] == pytest.approx(logits[c["class_index"]], abs=1e-4)
        # The matched prototypes: the most probable first, fewest to MATCHED_MASS of q.
        order = np.argsort(-q, kind="stable")
        need = int(np.searchsorted(np.cumsum(q[order]), MATCHED_MASS) + 1)
        shown = [p["prototype"] for p in body["prototypes"]]
        assert shown == order[: min(need, 5)].tolist()
        for p in body["prototypes"]:
            assert p["q"] == pytest.approx(q[p["prototype"]], abs=1e-4)
            rec = manifest.prototypes[p["prototype"]]
            assert [w["weight"] for w in p["class_weights"]] == rec.class_weights
            n = sum(rec.matched_classes)
            assert {s["class_index"]: s["share"] for s in p["neighbourhood"]} == {
                k: pytest.approx(c / n) for k, c in enumerate(rec.matched_classes) if c
            }
        # Ambiguity: the q-weighted share of the matched neighbourhoods' images in the
        # answered class, below AMBIGUOUS_BELOW.
        answered = body["prediction"]["class_index"]
        num = den = 0.0
        for p in body["prototypes"]:
            rec = manifest.prototypes[p["prototype"]]
            if sum(rec.matched_classes):
                num += p["q"] * rec.matched_classes[answered] / sum(rec.matched_classes)
                den += p["q"]
        share = num / den if den else 0.0
        assert body["ambiguity"]["answered_share"] == pytest.approx(share, abs=1e-6)
        assert body["ambiguity"]["ambiguous"] is (share < AMBIGUOUS_BELOW)
        assert body["familiarity"]["familiar"] is None and body["familiarity"]["reason"]


def test_nearest_training_images_come_from_the_store(
    client: httpx.Client, test_images: list[bytes]
) -> None:
    body = post_image(client, test_images[0]).json()
    p = body["prototypes"][0]
    assert len(p["nearest"]) == NEAREST_K
    r = client.get(p["nearest_png"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    strip = Image.open(io.BytesIO(r.content))
    assert strip.size == (NEAREST_K * NEAREST_TILE + (NEAREST_K - 1) * 2, NEAREST_TILE)


def test_options_and_routes_a_drumond_model_cannot_serve_say_why(
    client: httpx.Client, test_images: list[bytes]
) -> None:
    r = post_image(client, test_images[0], method="smoothgrad")
    assert r.status_code == 422 and "no heatmaps" in r.json()["error"]["message"]
    body = post_image(client, test_images[0]).json()
    r = client.get(f"/explanations/{body['id']}/heatmaps/{body['prototypes'][0]['prototype']}.png")
    assert r.status_code == 404 and "no heatmaps" in r.json()["error"]["message"]
    r = client.get(f"/models/{DRUMOND}/card")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "wrong_model_kind"
    assert "drumond" in r.json()["error"]["message"]


def test_predict_and_the_cache_serve_drumond_answers(
    client: httpx.Client, test_images: list[bytes]
) -> None:
    first = post_image(client, test_images[1])
    again = post_image(client, test_images[1])
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert again.json() == first.json()
    assert client.get(first.json()["links"]["self"]).json() == first.json()
    r = client.post("/predict", content=test_images[1], headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert r.json()["prediction"] == first.json()["prediction"]


def test_protopnet_answers_beside_it_are_unchanged(
    client: httpx.Client, test_images: list[bytes]
) -> None:
    r = post_image(client, test_images[2], model="parts")
    assert r.status_code == 200
    body = r.json()
    assert "kind" not in body and body["scoring_sheets"] and body["prototypes"][0]["box"]


def test_report_explains_it_in_words_and_pictures(
    client: httpx.Client, kinds_server: ServerProcess, test_images: list[bytes], browser
) -> None:
    page = browser.new_page()
    seen = set()
    for png in test_images:
        body = post_image(client, png).json()
        page.goto(kinds_server.url + body["links"]["report"], wait_until="load")
        assert page.title() == f"Explanation report: {body['prediction']['label']}"
        rows = page.locator("tr.row")
        assert rows.count() == len(body["prototypes"])
        for i, p in enumerate(body["prototypes"]):
            assert f"prototype {p['prototype']}" in rows.nth(i).inner_text()
        loaded = page.eval_on_selector_all(
            "img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded
        banner = page.locator(".ambiguous")
        assert banner.count() == (1 if body["ambiguity"]["ambiguous"] else 0)
        seen.add(body["ambiguity"]["ambiguous"])
    page.close()
    print(json.dumps({"ambiguous answers seen": sorted(seen)}))
