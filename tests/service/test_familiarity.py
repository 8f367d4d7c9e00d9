"""Familiarity through the real service: a Fashion-MNIST model trained here (30 s) and
published by the real command line, then served by uvicorn. Its familiarity score tells
Fashion-MNIST from digits, photographs, faces and noise; about the calibrated share of
Fashion-MNIST test images is called unfamiliar; every /explain and /predict answer says
so with the score and percentile the store's calibration gives offline; Prometheus counts
the unfamiliar answers; a version without calibration answers null with a reason."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.preprocess import eval_transform, to_model_mode
from tests.service.corpus import encode
from tests.service.store_builder import fashion_available, fashion_test_images
from tests.support import ood
from tests.support.servers import ServerProcess, metric_value, start_server
from tests.training.conftest import run_cli

pytestmark = pytest.mark.slow

SHORT = [
    "data.train_subset=4000", "data.num_workers=0", "train.epochs=2", "train.push_start=2",
    "train.last_layer_epochs=5",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed (scripts/system-deps.sh installs it)")
    base = tmp_path_factory.mktemp("familiar")
    store = base / "store"
    args = ["train", "--config", "fashion_mnist", "--run-dir", str(base / "run"), "--export"]
    for o in [*SHORT, f"export.store={store}"]:
        args += ["--set", o]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store


def _scores(store: Path, images: list[Image.Image]) -> np.ndarray:
    loaded = ModelStore(store).load("fashion-mnist")
    fam = loaded.familiarity()
    assert fam is not None
    prep = loaded.manifest.preprocessing
    tf = eval_transform(prep)
    x = torch.stack([tf(to_model_mode(im, prep)) for im in images])
    with torch.no_grad():
        return fam.scorer().scores(loaded.model.conv_features(x)).numpy()


def test_the_score_tells_fashion_from_digits_photos_faces_and_noise(trained_store: Path) -> None:
    imgs, _ = fashion_test_images(1000)
    inside = _scores(trained_store, [Image.fromarray(a, "L") for a in imgs])
    # Digits are the near-out-of-distribution set (grey centred strokes on black, like
    # the clothes); after this test's two short epochs they separated at 0.88 on CI's
    # 2 cores and above 0.9 here, so their floor is 0.85. The far sets must reach 0.9.
    floors = {"digits": 0.85}
    for name, images in ood.all_sets().items():
        outside = _scores(trained_store, images)
        auc = ood.auroc(inside, outside)
        assert auc >= floors.get(name, 0.9), (name, auc)
    # The calibrated rate: 1 % of validation images fall below the threshold, so about
    # 1 % of test images (drawn like them) do.
    loaded = ModelStore(trained_store).load("fashion-mnist")
    fam = loaded.familiarity()
    assert fam is not None
    rate = float((inside < fam.threshold(1.0)).mean())
    assert abs(rate - 0.01) <= 0.015, rate


@pytest.fixture(scope="module")
def familiar_server(
    trained_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("familiar-server"),
        trained_store,
        default_model="fashion-mnist",
        models=None,
    )
    yield s
    s.stop()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_every_answer_says_whether_the_image_looks_familiar(
    familiar_server: ServerProcess, trained_store: Path
) -> None:
    server = familiar_server
    from skimage import data

    imgs, _ = fashion_test_images(3)
    cases = {
        "boot": Image.fromarray(imgs[0], "L"),
        "cat": Image.fromarray(data.chelsea()),
        "noise": ood.noise(1, seed=7)[0],
    }
    loaded = ModelStore(trained_store).load("fashion-mnist")
    fam = loaded.familiarity()
    assert fam is not None
    threshold = fam.threshold(1.0)
    want_unfamiliar = 0
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, img in cases.items():
            data_ = _png(img)
            want = float(_scores(trained_store, [img])[0])
            for route in ("/explain", "/predict"):
                r = c.post(route, content=data_, headers={"Content-Type": "image/png"})
                assert r.status_code == 200, r.text
                f = r.json()["familiarity"]
                assert f["method"] == "latent-mahalanobis" and f["reason"] is None
                assert f["threshold_percentile"] == 1.0
                assert f["score"] == pytest.approx(want, abs=1e-3), (name, route)
                assert f["percentile"] == pytest.approx(fam.percentile(f["score"]))
                assert f["familiar"] is (want >= threshold), (name, route)
                want_unfamiliar += not f["familiar"]
            if name == "boot":
                assert f["familiar"] is True and f["percentile"] > 1.0
            else:
                assert f["familiar"] is False and f["percentile"] < 1.0, name
        metrics = c.get("/metrics").text
        detail = c.get("/models/fashion-mnist").json()["familiarity"]
    assert (
        detail["method"] == "latent-mahalanobis" and detail["calibrated_on"] == "validation split"
    )
    assert detail["calibration_images"] == len(fam.validation_scores)
    got = metric_value(metrics, "protopnet_unfamiliar_answers_total", model="fashion-mnist@1")
    assert got == want_unfamiliar == 4


def test_a_version_without_calibration_answers_null_with_a_reason(client, photo_images) -> None:
    data_ = encode(photo_images["cat"], "PNG")
    for route in ("/explain", "/predict"):
        r = client.post(route, content=data_, headers={"Content-Type": "image/png"})
        f = r.json()["familiarity"]
        assert f["familiar"] is None and f["score"] is None and f["percentile"] is None
        assert "without a familiarity calibration" in f["reason"]
        assert "python -m training export" in f["reason"]


def test_the_report_warns_in_a_banner_when_nothing_looks_familiar(
    familiar_server: ServerProcess, browser
) -> None:
    from skimage import data

    imgs, _ = fashion_test_images(1)
    with httpx.Client(base_url=familiar_server.url, timeout=60) as c:
        bodies = {
            name: c.post(
                "/explain", content=_png(img), headers={"Content-Type": "image/png"}
            ).json()
            for name, img in (("cat", Image.fromarray(data.chelsea())),
                              ("boot", Image.fromarray(imgs[0], "L")))
        }  # fmt: skip
    page = browser.new_page()
    page.goto(familiar_server.url + bodies["cat"]["links"]["report"], wait_until="load")
    banner = page.locator("div.unfamiliar[role=alert]")
    assert banner.count() == 1 and banner.is_visible()
    text = banner.inner_text()
    assert "Nothing in this image looks like what the model learned from" in text
    assert "Do not rely on this answer" in text
    assert f"Only {bodies['cat']['familiarity']['percentile']:.1f}%" in text
    page.goto(familiar_server.url + bodies["boot"]["links"]["report"], wait_until="load")
    assert page.locator("div.unfamiliar").count() == 0
    assert "looks like the training images" in page.locator("p.familiar").inner_text()
    page.close()
