"""Publish a trained, pushed checkpoint to the model store, with its prototype pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model_store import Manifest, ModelStore
from protokit.devices import pick_device
from protopnet import familiarity
from protopnet.config import Preprocessing
from protopnet.errors import ProtoPNetError, ShapeError
from protopnet.model import ProtoPNet
from training import engine
from training.config import RunConfig
from training.data import Splits, build_splits, stratified_order
from training.push import render_visuals
from training.run import eval_loader, metrics_from_test, read_checkpoint


class ExportError(ProtoPNetError):
    """A checkpoint that cannot be published (e.g. never pushed)."""


# Training images the familiarity score's means and covariance are fitted on (a
# stratified sample; the demo's 18000 take 9 s on 2 cores, so larger sets are sampled).
FAMILIARITY_FIT_IMAGES = 10_000


def export_run(
    run_dir: Path,
    tag: str | None = None,
    name: str | None = None,
    store_root: str | Path | None = None,
    aliases: list[str] | None = None,
    visualize: bool = True,
) -> Manifest:
    """Publish checkpoint ``tag`` of ``run_dir`` (default: the config's export.checkpoint).

    The prototype pictures (patch crop, source with box, activation overlay) are drawn
    from the push records and self-activation maps saved with the checkpoint, loading
    each source image from the run's training data.
    """
    run_dir = Path(run_dir)
    saved = read_checkpoint(run_dir, tag or "best")
    cfg = saved.config
    tag = tag or cfg.export.checkpoint
    ck = saved if tag == "best" else read_checkpoint(run_dir, tag)
    if ck.records is None or ck.activation_maps is None:
        raise ExportError(
            f"checkpoint {tag!r} of {str(run_dir)!r} was never pushed: its prototypes are not "
            "training patches. Run `python -m training push` on it first."
        )
    splits = build_splits(cfg.data, cfg.train.seed)
    visuals = (
        render_visuals(ck.records, ck.activation_maps, splits.train, ck.preprocessing)
        if visualize
        else None
    )
    metrics = _metrics(run_dir, tag, ck.meta)
    device = pick_device(cfg.train.device, "train.device")
    if metrics.get("test_per_class") is None:  # not measured by the run: measure it now
        evaluated = engine.evaluate(
            ck.model.to(device),
            eval_loader(splits.test, ck.preprocessing, cfg),
            cfg.train.loss,
            device,
            confusion=True,
        )
        metrics.update(metrics_from_test(evaluated, ck.class_names))
    fam = calibrate_familiarity(ck.model.to(device), splits, ck.preprocessing, cfg, device)
    ck.model.cpu()
    store = ModelStore(store_root if store_root is not None else cfg.export.store)
    return store.publish(
        name or cfg.export.name or cfg.name,
        ck.model.cpu().eval(),
        ck.preprocessing,
        ck.class_names,
        ck.records,
        visuals=visuals,
        activation_maps=ck.activation_maps,
        training_config={**cfg.to_plain(), "checkpoint": tag, "run_dir": str(run_dir)},
        metrics=metrics,
        aliases=tuple(aliases if aliases is not None else cfg.export.aliases),
        familiarity=fam,
    )


def calibrate_familiarity(
    model: ProtoPNet, splits: Splits, prep: Preprocessing, cfg: RunConfig, device: torch.device
) -> familiarity.Familiarity | None:
    """Fit the familiarity score on (a stratified sample of) the training split and
    calibrate it on the validation split (the test split when there is none). None, with
    the reason printed, when the split is too small to fit it: the version is published
    without familiarity and the service answers ``familiar: null``."""
    train = splits.train
    order = stratified_order(train.labels, cfg.train.seed)[:FAMILIARITY_FIT_IMAGES]
    train = train.subset(sorted(order))
    held, held_name = (
        (splits.val, "validation split") if len(splits.val) else (splits.test, "test split")
    )
    model.eval()
    fit_x = familiarity.pooled_features(
        model, (x for x, _, _ in eval_loader(train, prep, cfg)), device
    )
    held_x = familiarity.pooled_features(
        model, (x for x, _, _ in eval_loader(held, prep, cfg)), device
    )
    try:
        return familiarity.fit(
            fit_x,
            torch.tensor(train.labels),
            len(splits.class_names),
            held_x,
            fitted_on="training split",
            calibrated_on=held_name,
        )
    except ShapeError as exc:
        print(f"published without a familiarity score: {exc}", flush=True)
        return None


def _metrics(run_dir: Path, tag: str, meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "val_accuracy": meta.get("val_accuracy"),
        "checkpoint_epoch": meta.get("epoch"),
    }
    if out["val_accuracy"] is not None and out["val_accuracy"] < 0:
        out["val_accuracy"] = None
    summary_path = run_dir / "summary.json"
    measured: dict[str, Any] = {}
    if tag == "pruned" and "prune" in meta:
        measured = meta["prune"]
        out["pruned_prototypes"] = len(meta["prune"]["pruned"])
    elif tag == "best" and summary_path.is_file():
        measured = json.loads(summary_path.read_text()).get("best", {})
    out.update({k: v for k, v in measured.items() if k.startswith("test_")})
    return out
