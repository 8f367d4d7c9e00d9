"""``train.loss.class_weights: balanced`` through a whole run on imbalanced data: the CE
weights come from the training split's counts, every validation carries the balanced
accuracy, and the best checkpoint is the one with the highest balanced accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.conftest import TINY
from training import engine
from training.config import load_config
from training.data import Splits, build_splits
from training.run import Trainer, read_checkpoint


def _imbalanced(cfg) -> Splits:  # type: ignore[no-untyped-def]
    """The synthetic set with class 0 whole and a quarter of every other class."""
    splits = build_splits(cfg.data, cfg.train.seed)
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(splits.train.labels):
        seen[y] = seen.get(y, 0) + 1
        if y == 0 or seen[y] <= 5:
            keep.append(i)
    return Splits(train=splits.train.subset(keep), val=splits.val, test=splits.test)


@pytest.mark.parametrize("weights", ["balanced", "none"])
def test_balanced_run_selects_by_balanced_accuracy(tmp_path: Path, weights: str) -> None:
    cfg = load_config("synthetic", [*TINY, f"train.loss.class_weights={weights}"])
    splits = _imbalanced(cfg)
    counts = splits.train.class_counts()
    assert counts[0] > 3 * counts[1]
    trainer = Trainer(cfg, tmp_path, progress=False, splits=splits)
    if weights == "balanced":
        expected = engine.balanced_class_weights(counts)
        assert trainer.class_weights is not None
        assert trainer.class_weights.tolist() == pytest.approx(expected.tolist())
    else:
        assert trainer.class_weights is None
    trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [(h["unit"], h["val"]) for h in lines if h["stage"] == "last_layer"]
    assert vals and all(0 <= v["balanced_accuracy"] <= 1 for _, v in vals)
    metric = "balanced_accuracy" if weights == "balanced" else "accuracy"
    best = max(vals, key=lambda uv: uv[1][metric])[1]  # the first of equals wins
    meta = read_checkpoint(tmp_path, "best").meta
    assert meta["selected_by"] == {"metric": metric, "value": best[metric]}
    assert meta["val_accuracy"] == best["accuracy"]
