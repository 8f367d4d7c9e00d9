"""Fashion-MNIST end to end on a subset, from Debian's IDX files (skipped without them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.training.conftest import overrides_args, run_cli
from training.config import load_config
from training.data import FASHION_MNIST_DIR, build_splits

HAVE_DATA = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_DATA,
        reason=f"Fashion-MNIST IDX files not in {FASHION_MNIST_DIR} "
        "(install the Debian package dataset-fashion-mnist)",
    ),
]

SUBSET = [
    "data.train_subset=2000",
    "data.test_subset=500",
    "data.num_workers=0",
    "train.epochs=2",
    "train.warm_epochs=0",  # the compact trunk starts from random weights
    "train.batch_size=32",
    "train.push_start=1",
    "train.last_layer_epochs=10",
    "model.prototypes_per_class=3",
    "model.prototype_depth=32",
]


def test_fashion_mnist_subset_trains_pushes_and_publishes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = run_cli(
        "train", "--config", "fashion_mnist", "--run-dir", str(tmp_path / "run"),
        *overrides_args([*SUBSET, f"export.store={store}"]), "--export",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["best"]["test_accuracy"] > 0.4  # chance is 0.1
    loaded = ModelStore(store).load("fashion-mnist@production")
    assert loaded.manifest.class_names[0] == "T-shirt/top"
    assert loaded.manifest.preprocessing.grayscale and loaded.manifest.preprocessing.img_size == 28
    cfg = load_config("fashion_mnist", SUBSET)
    train = build_splits(cfg.data, cfg.train.seed).train
    label_of = {train.image_id(i): train.labels[i] for i in range(len(train))}
    for r in loaded.manifest.prototypes:
        assert label_of[r.source_image_id] == r.class_index
        assert r.source_size == (28, 28) and r.has_images
