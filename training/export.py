"""Publish a trained, pushed checkpoint to the model store, with its prototype pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model_store import Manifest, ModelStore
from model_store.manifest import Interpretability, PrototypeQuality, PrototypeRecord
from model_store.store import PrototypeVisuals
from protokit.devices import pick_device
from protopnet import familiarity, quality
from protopnet.config import Preprocessing
from protopnet.errors import ProtoPNetError, ShapeError
from protopnet.explain import percentile_boxes, upsample_maps
from protopnet.model import ProtoPNet
from protopnet.preprocess import eval_transform, input_region, to_model_mode
from training import engine
from training.config import RunConfig
from training.data import ImageSet, Splits, build_splits, stratified_order
from training.push import render_visuals
from training.run import eval_loader, metrics_from_test, read_checkpoint


class ExportError(ProtoPNetError):
    """A checkpoint that cannot be published (e.g. never pushed)."""


# Training images the familiarity score's means and covariance are fitted on (a
# stratified sample; the demo's 18000 take 9 s on 2 cores, so larger sets are sampled).
FAMILIARITY_FIT_IMAGES = 10_000
# Test images the prototypes' stability and consistency are measured on (a stratified
# sample): each goes through the model twice, clean and with noise.
QUALITY_IMAGES = 400
# The global analysis (the paper's section 3.1): each prototype's k nearest training
# patches, one per image, searched in a stratified sample of the training split.
NEAREST_K = 5
NEAREST_IMAGES = 10_000
NEAREST_TILE = 64  # px, each patch in the strip the model card shows


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
    nearest = (
        add_nearest_patches(ck.model.to(device), splits, ck.preprocessing, cfg, visuals, device)
        if visuals is not None
        else None
    )
    interp = measure_interpretability(
        ck.model.to(device), splits, ck.preprocessing, cfg, ck.records, visuals, nearest
    )
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
        interpretability=interp,
    )


@torch.no_grad()
def nearest_training_patches(
    model: ProtoPNet,
    splits: Splits,
    prep: Preprocessing,
    cfg: RunConfig,
    device: torch.device,
    k: int = NEAREST_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ImageSet]:
    """Each prototype's k nearest training patches, at most one per image, among a
    stratified sample of the training split: (P, k) distances, (P, k) indices into the
    returned sample, (P, k, H', W') the prototype's distance map on each of those images
    (kept from the search, so drawing them needs no second forward), and the sample."""
    train = splits.train
    order = stratified_order(train.labels, cfg.train.seed)[:NEAREST_IMAGES]
    sample = train.subset(sorted(order))
    P = model.num_prototypes
    best_d = torch.full((P, 0), float("inf"))
    best_i = torch.zeros((P, 0), dtype=torch.long)
    best_m: torch.Tensor | None = None  # (P, k, H', W')
    seen = 0
    model.eval()
    for x, _, _ in eval_loader(sample, prep, cfg):
        d = model.distances(model.conv_features(x.to(device))).cpu()  # (B, P, H', W')
        maps = d.transpose(0, 1)  # (P, B, H', W')
        md = maps.flatten(2).min(dim=2).values  # (P, B)
        idx = torch.arange(seen, seen + len(x))
        seen += len(x)
        all_d = torch.cat([best_d, md], dim=1)
        all_i = torch.cat([best_i, idx.expand(P, -1)], dim=1)
        all_m = maps if best_m is None else torch.cat([best_m, maps], dim=1)
        top = all_d.topk(min(k, all_d.shape[1]), dim=1, largest=False)
        best_d = top.values
        best_i = all_i.gather(1, top.indices)
        best_m = all_m[torch.arange(P)[:, None], top.indices]
    assert best_m is not None, "an empty training split"
    return best_d, best_i, best_m, sample


def add_nearest_patches(
    model: ProtoPNet,
    splits: Splits,
    prep: Preprocessing,
    cfg: RunConfig,
    visuals: dict[int, PrototypeVisuals],
    device: torch.device,
) -> dict[int, list[int]]:
    """Draw each prototype's nearest training patches (``nearest_training_patches``) as
    one strip of ``NEAREST_TILE`` px tiles into ``visuals[j].nearest``; each tile is the
    95th-percentile box of the prototype's similarity map on that image, cropped from the
    model's view of it. Returns their images' classes, per prototype."""
    _, idx, dist, sample = nearest_training_patches(model, splits, prep, cfg, device)
    tf = eval_transform(prep)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    S = prep.img_size
    classes: dict[int, list[int]] = {}
    for j, vis in visuals.items():
        maps = upsample_maps(model.similarity(dist[j]).float(), (S, S))  # (k, S, S)
        tiles = []
        for i, (x0, y0, x1, y1) in zip(
            idx[j].tolist(), percentile_boxes(maps).tolist(), strict=True
        ):
            x = tf(to_model_mode(sample.load(i), prep))
            rgb = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(rgb[y0:y1, x0:x1]).resize((NEAREST_TILE, NEAREST_TILE))
            tiles.append(np.asarray(tile))
            tiles.append(np.full((NEAREST_TILE, 2, 3), 255, dtype=np.uint8))
        vis.nearest = np.ascontiguousarray(np.concatenate(tiles[:-1], axis=1))
        classes[j] = [int(sample.labels[i]) for i in idx[j].tolist()]
    return classes


def measure_interpretability(
    model: ProtoPNet,
    splits: Splits,
    prep: Preprocessing,
    cfg: RunConfig,
    records: list[PrototypeRecord],
    visuals: dict[int, PrototypeVisuals] | None,
    nearest: dict[int, list[int]] | None = None,
) -> Interpretability:
    """The prototypes' quality figures (``protopnet.quality``) on a stratified sample of
    the test split: duplicates, background patches (from the prototype pictures), the
    last layer's sparsity, stability, and consistency where the data has part boxes;
    with ``nearest`` (prototype -> its nearest training patches' classes), the share of
    them from its own class."""
    test = splits.test
    order = sorted(stratified_order(test.labels, cfg.train.seed)[:QUALITY_IMAGES])
    tf = eval_transform(prep)
    xs, labels, parts = [], [], []
    for i in order:
        img = test.load(i)
        xs.append(tf(to_model_mode(img, prep)))
        labels.append(test.labels[i])
        pts = test.part_points(i)
        if pts is not None:  # to the model input's pixels
            x0, y0, x1, y1 = input_region(img.width, img.height, prep)
            sx, sy = prep.img_size / (x1 - x0), prep.img_size / (y1 - y0)
            parts.append(
                np.stack([(pts[:, 0] - x0) * sx, (pts[:, 1] - y0) * sy, pts[:, 2]], axis=1)
            )
    has_parts = bool(parts) and len(parts) == len(xs)
    model.eval()
    agree = quality.box_agreement(
        model,
        torch.stack(xs) if xs else torch.zeros(0, 3, prep.img_size, prep.img_size),
        labels,
        torch.from_numpy(np.stack(parts)) if has_parts else None,
        seed=cfg.train.seed,
    )
    classes = model.prototype_class_identity.argmax(dim=1).cpu()
    dup = quality.duplicate_of(
        [(r.source_image_id, r.patch_hw) for r in records], model.prototype_vectors
    )
    train = splits.train
    has_boxes = len(train) > 0 and train.part_box(0) is not None  # the synthetic set
    index_of = {train.image_id(i): i for i in range(len(train))} if has_boxes else {}
    rows = []
    for j in range(model.num_prototypes):
        std = quality.patch_flatness(visuals[j].patch) if visuals and j in visuals else None
        rec = records[j]
        src = index_of.get(rec.source_image_id) if rec.source_image_id is not None else None
        part = train.part_box(src) if src is not None else None
        off = None if part is None or rec.box is None else not quality.boxes_overlap(rec.box, part)
        near = (nearest or {}).get(j, [])
        rows.append(
            PrototypeQuality(
                index=j,
                class_index=int(classes[j]),
                duplicate_of=dup[j],
                background=(
                    None
                    if std is None and off is None
                    else bool(off) or (std is not None and std < quality.BACKGROUND_STD)
                ),
                off_object=off,
                patch_std=None if std is None else round(std, 4),
                images=agree.images[j],
                stability=agree.stability[j],
                part_share=agree.part_share[j],
                nearest_classes=near,
                nearest_own_share=(
                    sum(c == int(classes[j]) for c in near) / len(near) if near else None
                ),
            )
        )
    return Interpretability(
        prototypes=len(rows),
        unique_prototypes=sum(r.duplicate_of is None for r in rows),
        duplicates=sum(r.duplicate_of is not None for r in rows),
        background_prototypes=sum(bool(r.background) for r in rows),
        sparsity=quality.last_layer_sparsity(model.last_layer.weight, classes),
        stability=quality.mean_of(agree.stability),
        consistency=quality.consistency(agree.part_share) if has_parts else None,
        measured_on=f"test split, {len(xs)} images",
        images=len(xs),
        per_prototype=rows,
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
