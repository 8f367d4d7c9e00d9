"""``python -m training revise`` on real store versions: prototypes removed, the last
layer refitted on the training split, a new version with its lineage; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from tests.model_store.conftest import publish_tiny
from tests.training.conftest import run_cli
from training import engine
from training.config import validate_config
from training.data import build_splits
from training.run import eval_loader


@pytest.mark.slow
def test_revise_publishes_a_mended_version_with_its_lineage(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_root = tmp_path / "store"
    shutil.copytree(parts_run.store, store_root)
    store = ModelStore(store_root)
    before = store.load("parts")
    proc = run_cli(
        "revise", "--model", f"parts@{before.manifest.version}", "--remove", "4,0",
        "--reason", "on the clutter", "--store", str(store_root),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    after = store.load(out["published"])
    m = after.manifest
    assert m.version == "2" and store.aliases("parts")["latest"] == "2"
    assert m.lineage is not None and m.lineage.derived_from == "parts@1"
    assert m.lineage.removed_prototypes == [0, 4] and m.lineage.reason == "on the clutter"
    keep = [j for j in range(12) if j not in (0, 4)]
    assert m.lineage.kept_prototypes == keep
    # The kept prototypes are the same vectors, records and pictures, renumbered.
    assert torch.equal(after.model.prototype_vectors, before.model.prototype_vectors[keep])
    assert [r.source_image_id for r in m.prototypes] == [
        before.manifest.prototypes[j].source_image_id for j in keep
    ]
    for new, old in enumerate(keep):
        assert after.prototype_image_bytes(new, "patch") == before.prototype_image_bytes(
            old, "patch"
        )
    # Its published test accuracy is what the model scores on the test split now.
    cfg = validate_config(
        {k: v for k, v in m.training_config.items() if k not in ("checkpoint", "run_dir")}
    )
    test = build_splits(cfg.data, cfg.train.seed).test
    res = engine.evaluate(
        after.model, eval_loader(test, m.preprocessing, cfg), cfg.train.loss, torch.device("cpu")
    )
    assert m.metrics.test_accuracy == pytest.approx(res["accuracy"])
    assert out["test_accuracy_after"] == pytest.approx(res["accuracy"])
    assert m.interpretability is not None and m.interpretability.prototypes == 10
    assert m.familiarity == before.manifest.familiarity  # the latent space did not change


@pytest.mark.slow
def test_revise_errors_say_what_is_wrong(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = str(parts_run.store)

    def err(*args: str) -> str:
        proc = run_cli("revise", "--store", root, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr

    assert "unknown prototype 99: parts@1 has prototypes 0..11" in err(
        "--model", "parts@1", "--remove", "3,99"
    )
    classes = ModelStore(root).load("parts").model.prototype_class_identity.argmax(dim=1)
    own = ",".join(str(j) for j in torch.nonzero(classes == 1).flatten().tolist())
    assert "without prototypes" in err("--model", "parts@1", "--remove", own)
    assert "prototype indices separated by commas" in err("--model", "parts@1", "--remove", "x")
    assert "unknown version '7'" in err("--model", "parts@7", "--remove", "1")
    tiny = ModelStore(tmp_path / "tiny")
    publish_tiny(tiny)
    proc = run_cli("revise", "--store", str(tiny.root), "--model", "tiny@1", "--remove", "1")
    assert proc.returncode == 2 and "no training configuration and data recorded" in proc.stderr
    assert ModelStore(root).versions("parts") == ["1"]  # nothing was published
