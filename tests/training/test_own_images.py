"""An ML engineer's own images, from a folder to an answered /explain.

The path the README's "Your own images" section gives, through the real commands: a
folder of greyscale JPEGs and PNGs of mixed sizes (as scans or X-rays come), one
sub-folder per class; a YAML config written by the user, not a shipped one; ``python -m
training train --config my.yaml --export``; then ``python -m service`` on that store.
Over HTTP, a test image gets scoring sheets that add up to its logits, boxes in its own
pixels and a report page; the served model is as accurate on the test folder as the run
said; and the most activated prototype's box lies on the spot that defines the class.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from model_store import ModelStore
from tests.support.servers import start_server
from tests.training.conftest import run_cli

pytestmark = pytest.mark.slow

KINDS = ("bright", "dark", "striped")  # sorted: the class order ImageFolder gives
Box = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive


def _scan(kind: str, rng: np.random.Generator) -> tuple[Image.Image, Box]:
    """A greyscale "scan": one spot (bright, dark, or striped) at a random place on a
    noisy background, and the spot's box."""
    w, h = (int(v) for v in rng.integers(40, 65, size=2))
    noise = rng.normal(120, 15, size=(h, w)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(noise, mode="L")
    s = int(rng.integers(16, 23))
    x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    draw = ImageDraw.Draw(img)
    if kind == "striped":  # bright and dark bands, 5 px each
        for row in range(y, y + s + 1, 5):
            band = 240 if (row - y) % 10 == 0 else 10
            draw.rectangle((x, row, x + s, min(row + 4, y + s)), fill=band)
    else:
        draw.ellipse((x, y, x + s, y + s), fill=240 if kind == "bright" else 10)
    return img, (x, y, x + s + 1, y + s + 1)


def _write_folder(root: Path, per_class: dict[str, int], seed: int) -> dict[str, Box]:
    """The images, and each one's spot box by its path under ``root``."""
    rng = np.random.default_rng(seed)
    boxes: dict[str, Box] = {}
    for split, n in per_class.items():
        for kind in KINDS:
            d = root / split / kind
            d.mkdir(parents=True)
            for i in range(n):
                # Mostly JPEG, some PNG, as a real export from several machines would be.
                suffix = ".png" if i % 5 == 0 else ".jpg"
                img, box = _scan(kind, rng)
                img.save(d / f"{kind}-{i:03d}{suffix}")
                boxes[f"{split}/{kind}/{kind}-{i:03d}{suffix}"] = box
    return boxes


CONFIG = """\
name: scans
data:
  kind: imagefolder
  root: {root}
  val_fraction: 0.15
  num_workers: 0
model:
  backbone: tiny_cnn
  grayscale: true
  img_size: 32
  prototypes_per_class: 2
  prototype_depth: 16
train:
  device: cpu
  epochs: 8
  warm_epochs: 1
  push_start: 4
  push_every: 4
  last_layer_epochs: 10
  batch_size: 16
  lr:
    joint_features: 0.003
    last_layer: 0.01
export:
  name: scans
  store: {store}
  aliases: [latest, production]
"""


def test_own_greyscale_folder_trains_publishes_and_serves(tmp_path: Path) -> None:
    data, store = tmp_path / "scans", tmp_path / "store"
    spots = _write_folder(data, {"train": 40, "test": 12}, seed=3)
    config = tmp_path / "my.yaml"
    config.write_text(CONFIG.format(root=data, store=store))

    proc = run_cli("train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    test_accuracy = summary["best"]["test_accuracy"]
    assert test_accuracy >= 0.8  # chance is 1/3
    assert summary["published"] == "scans@1"

    loaded = ModelStore(store).load("scans@production")
    assert loaded.manifest.class_names == list(KINDS)
    assert loaded.manifest.preprocessing.grayscale
    for r in loaded.manifest.prototypes:
        # Each prototype is a patch of a training image of its own class, named by path.
        assert r.source_image_id.startswith(f"{KINDS[r.class_index]}/"), r.source_image_id

    server = start_server(tmp_path, store, default_model="scans", models="")
    try:
        # A test image the model has never seen, uploaded as the file it is.
        upload = data / "test" / "striped" / "striped-001.jpg"
        width, height = Image.open(upload).size
        with upload.open("rb") as f:
            r = httpx.post(
                server.url + "/explain",
                files={"image": (upload.name, f, "image/jpeg")},
                params={"top_classes": 3},
                timeout=60,
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "scans" and body["model"]["version"] == "1"
        assert body["image"]["mode"] == "L"
        assert body["image"]["oriented"] == {"width": width, "height": height}
        assert body["prediction"]["label"] in KINDS
        logits = {c["class_index"]: c["logit"] for c in body["top_classes"]}
        assert len(body["scoring_sheets"]) == 3
        for sheet in body["scoring_sheets"]:
            points = sum(row["points"] for row in sheet["rows"]) + sheet["other_total"]
            assert points == pytest.approx(logits[sheet["class_index"]], abs=1e-4)
        assert body["prototypes"]
        for p in body["prototypes"]:
            b = p["box"]
            # Boxes are in the upload's own pixels, not the model's 32 x 32 input.
            assert 0 <= b["x0"] < b["x1"] <= width and 0 <= b["y0"] < b["y1"] <= height, b
        report = httpx.get(server.url + body["links"]["report"], timeout=60)
        assert report.status_code == 200 and body["prediction"]["label"] in report.text
        # "That": the training patch the first shown prototype is, served from the store.
        patch = httpx.get(server.url + body["prototypes"][0]["prototype_images"]["patch"])
        assert patch.status_code == 200 and patch.content.startswith(b"\x89PNG")

        # Every test image as a client would send it: the served model answers as the run
        # evaluated it, and the most activated prototype's box lies on the spot.
        tests = sorted(k for k in spots if k.startswith("test/"))
        correct = on_spot = 0
        for rel in tests:
            kind = "image/png" if rel.endswith(".png") else "image/jpeg"
            r = httpx.post(
                server.url + "/explain",
                content=(data / rel).read_bytes(),
                headers={"Content-Type": kind},
                timeout=60,
            )
            assert r.status_code == 200, (rel, r.text)
            body = r.json()
            correct += body["prediction"]["label"] == rel.split("/")[1]
            top = body["top_prototypes"][0]["prototype"]
            b = next(p["box"] for p in body["prototypes"] if p["prototype"] == top)
            x0, y0, x1, y1 = spots[rel]
            on_spot += b["x0"] < x1 and x0 < b["x1"] and b["y0"] < y1 and y0 < b["y1"]
        assert abs(correct / len(tests) - test_accuracy) <= 1 / len(tests) + 1e-9
        assert on_spot >= len(tests) - 1, f"{on_spot} of {len(tests)} boxes on the spot"
    finally:
        server.stop()
