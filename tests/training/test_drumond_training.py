"""``model.kind: drumond`` through the training command line and the store: a run that
stops resumes to the same weights, export's neighbourhoods and nearest images match a
brute-force pass over the training sample, and the store keeps the kinds apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelStore, WrongKindError
from model_store.errors import IntegrityError
from training.config import ConfigError, load_config
from training.data import build_splits, stratified_order
from training.drumond import NEAREST_IMAGES, NEAREST_K, DrumondTrainer, embed, export_drumond
from training.run import RunError

FINE_TUNED = ["model.kind=drumond", "model.drumond.train_trunk=true", "train.epochs=2"]


def config(*extra: str):  # type: ignore[no-untyped-def]
    return load_config("synthetic", [*FINE_TUNED, *extra])


def test_too_few_prototypes_is_a_config_error_naming_the_rule() -> None:
    cfg = load_config("synthetic", ["model.kind=drumond", "model.drumond.num_prototypes=2"])
    with pytest.raises(ValueError, match="at least num_classes"):
        cfg.model.drumond_architecture(4)
    with pytest.raises(ConfigError, match=r"model\.drumond\.prototypes: unknown key"):
        load_config("synthetic", ["model.kind=drumond", "model.drumond.prototypes=2"])


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = DrumondTrainer(config(), tmp_path / "whole", progress=False)
    whole.run()
    parts = DrumondTrainer(config(), tmp_path / "parts", progress=False)
    assert parts.run(max_units=2)["stopped_after_units"] == 2
    with pytest.raises(RunError, match="--resume"):
        DrumondTrainer(config(), tmp_path / "parts", progress=False).run()
    resumed = DrumondTrainer(config(), tmp_path / "parts", progress=False)
    summary = resumed.run(resume=True)
    for (k, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert (
        summary["best"]["test_accuracy"]
        == json.loads((tmp_path / "whole" / "summary.json").read_text())["best"]["test_accuracy"]
    )


def test_export_neighbourhoods_and_nearest_images_match_brute_force(tmp_path: Path) -> None:
    cfg = load_config("synthetic", ["model.kind=drumond"])
    trainer = DrumondTrainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    store = tmp_path / "store"
    manifest = export_drumond(tmp_path / "run", store_root=store, aliases=["latest"])
    assert manifest.kind == "drumond"
    loaded = ModelStore(store).load_drumond("parts@latest")
    splits = build_splits(cfg.data, cfg.train.seed)
    order = sorted(stratified_order(splits.train.labels, cfg.train.seed)[:NEAREST_IMAGES])
    sample = splits.train.subset(order)
    x = embed(loaded.model, sample, loaded.manifest.preprocessing, cfg, torch.device("cpu"))
    P = loaded.model.head.prototypes.detach()
    W = loaded.model.head.class_weights.detach()
    d = np.array([[float(((xi - p) ** 2).sum()) for p in P] for xi in x])  # (N, J)
    best = d.argmin(1)  # the most probable prototype is the nearest one
    for j, rec in enumerate(manifest.prototypes):
        counts = [int(((best == j) & (np.array(sample.labels) == k)).sum()) for k in range(4)]
        assert rec.matched_classes == counts
        near = np.argsort(d[:, j], kind="stable")[:NEAREST_K]
        assert rec.nearest_image_ids == [sample.image_id(int(i)) for i in near]
        assert rec.nearest_distances == pytest.approx(d[near, j].tolist(), rel=1e-4)
        assert rec.class_weights == pytest.approx(W[:, j].tolist(), abs=1e-6)
    # The published model answers as the trained one does.
    with torch.no_grad():
        assert torch.allclose(loaded.model.head(x)[0], trainer.model.head(x)[0], atol=1e-6)


def test_the_store_keeps_kinds_apart_and_verifies_drumond_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_store.cli import main as store_cli
    from training.cli import main as training_cli

    cfg = load_config("synthetic", ["model.kind=drumond"])
    DrumondTrainer(cfg, tmp_path / "run", progress=False).run()
    store = ModelStore(tmp_path / "store")
    export_drumond(tmp_path / "run", store_root=store.root)
    assert store_cli(["--root", str(store.root), "show", "parts@1"]) == 0
    assert "Drumond soft-max prototypes on tiny_cnn (frozen)" in capsys.readouterr().out
    assert training_cli(["evaluate", "--run-dir", str(tmp_path / "run")]) == 2
    assert "holds a Drumond model" in capsys.readouterr().err
    with pytest.raises(WrongKindError, match="parts@1 is a drumond model"):
        store.load("parts@1")
    with pytest.raises(WrongKindError):
        store.manifest("parts@1")
    assert store.verify("parts@1").kind == "drumond"
    strip = store.root / "parts" / "1" / "prototypes" / "0_nearest.png"
    strip.write_bytes(strip.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"0_nearest\.png"):
        store.load_drumond("parts@1")
