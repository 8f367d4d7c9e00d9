"""End to end on the synthetic parts set, through the real CLI and the real model store:
train (warm-up, joint, push, last layer), export, load, and check what a user sees."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.model import max_similarity
from protopnet.preprocess import eval_transform
from training.config import load_config
from training.data import build_splits

pytestmark = pytest.mark.slow


def test_training_reaches_well_above_chance(parts_run) -> None:  # type: ignore[no-untyped-def]
    best = parts_run.summary["best"]
    chance = 1 / 4
    assert best["test_accuracy"] >= 0.8 > 2 * chance
    assert parts_run.summary["published"] == "parts@1"
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json"):
        assert (parts_run.run_dir / name).is_file(), name
    png = Image.open(parts_run.run_dir / "curves.png")
    assert png.format == "PNG" and png.size[0] > 400


def test_every_stage_logged_its_loss_terms(parts_run) -> None:  # type: ignore[no-untyped-def]
    import json

    hist = [json.loads(x) for x in (parts_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [h["stage"] for h in hist]
    assert stages[0] == "warm" and "joint" in stages
    assert stages.count("push") == stages.count("last_layer") >= 2
    for h in hist:
        if h["stage"] in ("warm", "joint"):
            assert set(h["train"]) >= {"ce", "cluster", "separation", "avg_separation", "l1"}
            assert h["train"]["cluster"] < h["train"]["avg_separation"]
    push = [h for h in hist if h["stage"] == "push"][-1]
    last = [h for h in hist if h["stage"] == "last_layer"][-1]
    first_joint = next(h for h in hist if h["stage"] == "joint")
    # The last layer recovers what projection cost, and training helped overall.
    assert last["val"]["accuracy"] >= push["val"]["accuracy"]
    assert last["val"]["accuracy"] > first_joint["val"]["accuracy"]


def test_published_prototypes_come_from_their_own_class(parts_run) -> None:  # type: ignore[no-untyped-def]
    store = ModelStore(parts_run.store)
    loaded = store.load("parts")
    m = loaded.manifest
    cfg = load_config("synthetic")
    train = build_splits(cfg.data, cfg.train.seed).train
    label_of = {train.image_id(i): train.labels[i] for i in range(len(train))}
    index_of = {train.image_id(i): i for i in range(len(train))}
    P = loaded.model.num_prototypes
    assert [r.index for r in m.prototypes] == list(range(P))
    maps = loaded.activation_maps()
    assert maps is not None and maps.shape[0] == P
    tf = eval_transform(m.preprocessing)
    for r in m.prototypes:
        assert r.source_image_id in label_of, r.source_image_id
        assert label_of[r.source_image_id] == r.class_index  # its own class, always
        assert r.has_images
        i = index_of[r.source_image_id]
        # The published model's prototype is a real patch of that image: distance ~0.
        with torch.no_grad():
            out = loaded.model.forward_full(tf(train.load(i))[None])
        h, w = r.patch_hw  # type: ignore[misc]
        assert float(out.distances[0, r.index, h, w]) < 1e-3
        assert float(loaded.model.similarity(out.min_distances[0, r.index])) > 0.9 * max_similarity(
            "log"
        )
        # Pictures: the source at its own size, the patch = the box.
        src = Image.open(io.BytesIO(loaded.prototype_image_bytes(r.index, "source")))  # type: ignore[arg-type]
        patch = Image.open(io.BytesIO(loaded.prototype_image_bytes(r.index, "patch")))  # type: ignore[arg-type]
        x0, y0, x1, y1 = r.box  # type: ignore[misc]
        assert src.size == r.source_size and patch.size == (x1 - x0, y1 - y0)
        assert np.array_equal(
            np.asarray(patch.convert("RGB")), np.asarray(train.load(i))[y0:y1, x0:x1]
        )


def test_prototypes_point_at_the_part(parts_run) -> None:  # type: ignore[no-untyped-def]
    """Most prototypes' 95th-percentile boxes hold the centre of the coloured part of their
    source image (the part defines the class; the clutter is the same for every class)."""
    m = ModelStore(parts_run.store).load("parts").manifest
    cfg = load_config("synthetic")
    train = build_splits(cfg.data, cfg.train.seed).train
    box_of = {train.image_id(i): train.part_box(i) for i in range(len(train))}  # type: ignore[attr-defined]
    hits = 0
    for r in m.prototypes:
        px0, py0, px1, py1 = box_of[r.source_image_id]
        cx, cy = (px0 + px1) / 2, (py0 + py1) / 2
        x0, y0, x1, y1 = r.box  # type: ignore[misc]
        hits += int(x0 <= cx < x1 and y0 <= cy < y1)
    assert hits / len(m.prototypes) >= 0.75


def test_published_model_predicts_like_the_run(parts_run) -> None:  # type: ignore[no-untyped-def]
    loaded = ModelStore(parts_run.store).load("parts@latest")
    cfg = load_config("synthetic")
    test = build_splits(cfg.data, cfg.train.seed).test
    tf = eval_transform(loaded.manifest.preprocessing)
    x = torch.stack([tf(test.load(i)) for i in range(len(test))])
    with torch.no_grad():
        pred = loaded.model(x)[0].argmax(1)
    acc = float((pred == torch.tensor(test.labels)).float().mean())
    assert acc == pytest.approx(parts_run.summary["best"]["test_accuracy"], abs=1e-6)
    assert loaded.manifest.metrics.test_accuracy == pytest.approx(acc, abs=1e-6)
    # Per class, counted here image by image: the store's recall, precision, confusion.
    labels, K = test.labels, len(test.class_names)
    confusion = [[0] * K for _ in range(K)]
    for t, p in zip(labels, pred.tolist(), strict=True):
        confusion[t][p] += 1
    m = loaded.manifest.metrics
    assert m.test_confusion == confusion
    assert m.test_per_class is not None and len(m.test_per_class) == K
    recalls = []
    for c, row in enumerate(m.test_per_class):
        mine = [i for i, t in enumerate(labels) if t == c]
        said = [i for i, q in enumerate(pred.tolist()) if q == c]
        hits = sum(1 for i in mine if pred[i] == c)
        assert (row.label, row.images) == (test.class_names[c], len(mine))
        assert row.recall == pytest.approx(hits / len(mine))
        assert row.precision == (pytest.approx(hits / len(said)) if said else None)
        recalls.append(hits / len(mine))
    assert m.test_balanced_accuracy == pytest.approx(sum(recalls) / K)
    assert loaded.manifest.class_names == test.class_names
    assert loaded.manifest.training_config["train"]["epochs"] == cfg.train.epochs
