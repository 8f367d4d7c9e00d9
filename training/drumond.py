"""Training and publishing ``model.kind: drumond``: Drumond et al.'s soft-max prototypes.

``train_drumond`` embeds the training split with the trunk (unaugmented, average-pooled),
fits the head on those embeddings (``protopnet.drumond.fit_head``: k-means prototypes,
then full-batch Adam on cross-entropy plus the penalty on w) and, with
``model.drumond.train_trunk``, fine-tunes the whole network for ``train.epochs`` epochs
on augmented images. The run directory is the ProtoPNet run's: config.yaml,
metrics.jsonl, checkpoints/ (``last`` after every stage, for ``--resume``; ``best``, the
highest validation accuracy) and summary.json.

``export_drumond`` publishes the ``best`` checkpoint with what a reader of its
explanations needs: each prototype's class association (its column of w, and the classes
of the training images in its neighbourhood, those whose most probable prototype it is)
and its nearest training images, as a strip of pictures in the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from model_store import DrumondManifest, DrumondPrototype, ModelStore
from protokit.atomic import atomic_write
from protokit.devices import pick_device
from protopnet.config import Preprocessing
from protopnet.drumond import DrumondConfig, DrumondNet, create_drumond, fit_head
from protopnet.preprocess import eval_transform
from training.checkpoint import (
    flatten_optimizer,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from training.config import RunConfig, dump_config, load_raw, validate_config
from training.data import ImageSet, Splits, TransformedImages, build_splits, stratified_order
from training.run import RunError, _diff, eval_loader, metrics_from_test, seed_everything
from training.transforms import TrainTransform

KIND = "drumond"
# Training images each prototype's neighbourhood and nearest images are measured on (a
# stratified sample, as for ProtoPNet's global analysis).
NEAREST_K = 5
NEAREST_IMAGES = 10_000
NEAREST_TILE = 64  # px, each image in the strip


@torch.no_grad()
def embed(
    model: DrumondNet, images: ImageSet, prep: Preprocessing, cfg: RunConfig, device: torch.device
) -> torch.Tensor:
    """(N, D) pooled trunk embeddings of ``images``, unaugmented, in order, on the CPU."""
    model.eval()
    out = [model.embed(x.to(device)).float().cpu() for x, _, _ in eval_loader(images, prep, cfg)]
    return torch.cat(out) if out else torch.zeros(0, model.features.out_channels)


@torch.no_grad()
def evaluate_drumond(
    model: DrumondNet, loader: DataLoader, device: torch.device, num_classes: int
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and the confusion matrix (rows: true class)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    ce, n = 0.0, 0
    for x, y, _ in loader:
        logits, _ = model(x.to(device))
        logits = logits.float().cpu()
        ce += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        confusion += torch.bincount(
            y * num_classes + logits.argmax(1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    correct = int(confusion.diag().sum())
    return {
        "accuracy": correct / n if n else 0.0,
        "ce": ce / n if n else 0.0,
        "images": n,
        "confusion": confusion.tolist(),
    }


def model_view(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The model's view of a training image (resized as its input is), as RGB uint8."""
    x = eval_transform(prep)(image)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


class DrumondTrainer:
    """Trains (or resumes) one ``model.kind: drumond`` run in ``run_dir``."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None = None,
        progress: bool = True,
        splits: Splits | None = None,
    ):
        if cfg.model.kind != KIND:
            raise RunError(f"DrumondTrainer trains model.kind {KIND!r}, not {cfg.model.kind!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.runs_dir / cfg.name
        self.progress = progress
        t = cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)
        self.splits = splits or build_splits(cfg.data, t.seed)
        self.class_names = self.splits.class_names
        self.arch = cfg.model.drumond_architecture(len(self.class_names))
        self.prep = cfg.model.preprocessing()
        self.device = pick_device(t.device, "train.device")
        self.model = create_drumond(self.arch, cfg.model.weights).to(self.device)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.model.features.parameters(), "lr": t.lr.joint_features},
                {"params": self.model.head.parameters(), "lr": cfg.model.drumond.head_lr / 10},
            ]
        )
        self.done = 0  # stages completed: the head fit, then one per fine-tuning epoch
        self.history: list[dict[str, Any]] = []
        self.best_val = -1.0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def stages(self) -> int:
        return 1 + (self.cfg.train.epochs if self.arch.train_trunk else 0)

    def _save(self, tag: str, extra: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        meta: dict[str, Any] = {
            "tag": tag,
            "kind": KIND,
            "architecture": self.arch.model_dump(mode="json"),
            "preprocessing": self.prep.model_dump(mode="json"),
            "class_names": self.class_names,
            "config": self.cfg.to_plain(),
            **extra,
        }
        if tag == "last":
            t, m = flatten_optimizer("adam", self.optimizer)
            tensors.update(t)
            meta["optimizer"] = m
        save_checkpoint(self.ckpt_dir, tag, tensors, meta)

    def _prepare(self, resume: bool) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if resume and cfg_path.is_file():
            saved = validate_config(load_raw(cfg_path), str(cfg_path))
            if saved != self.cfg:
                diff = _diff(saved.to_plain(), self.cfg.to_plain())
                raise RunError(
                    f"--resume: the config differs from {cfg_path}: {', '.join(diff[:10])}"
                )
        if has_checkpoint(self.ckpt_dir, "last"):
            if not resume:
                raise RunError(
                    f"run directory {str(self.run_dir)!r} already holds a checkpoint; pass "
                    "--resume to continue it, or choose another --run-dir"
                )
            tensors, meta = load_checkpoint(self.ckpt_dir, "last")
            state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
            self.model.load_state_dict(state, strict=True)
            self.optimizer.load_state_dict(unflatten_optimizer("adam", tensors, meta["optimizer"]))
            self.done, self.history = int(meta["units_done"]), list(meta["history"])
            self.best_val = float(meta["best_val"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cfg_path, dump_config(self.cfg))

    def _validate(self) -> dict[str, Any] | None:
        if len(self.splits.val) == 0:
            return None
        loader = eval_loader(self.splits.val, self.prep, self.cfg)
        out = evaluate_drumond(self.model, loader, self.device, len(self.class_names))
        return {k: v for k, v in out.items() if k != "confusion"}

    def _fit_head(self) -> dict[str, Any]:
        d = self.cfg.model.drumond
        x = embed(self.model, self.splits.train, self.prep, self.cfg, self.device)
        labels = torch.tensor(self.splits.train.labels)
        head = fit_head(
            x, labels, self.arch.num_classes, self.arch.num_prototypes, self.arch.alpha,
            self.arch.penalty, d.head_steps, d.head_lr, self.cfg.train.seed,
        )  # fmt: skip
        self.model.head.load_state_dict(head.state_dict())
        with torch.no_grad():
            logits, _ = head(x)
        return {"train": {"accuracy": float((logits.argmax(1) == labels).float().mean())}}

    def _fine_tune_epoch(self, epoch: int) -> dict[str, Any]:
        t = self.cfg.train
        ds = TransformedImages(self.splits.train, TrainTransform(self.prep, self.cfg.data.augment))
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
        loader = DataLoader(
            ds,
            batch_size=t.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.cfg.data.num_workers,
            drop_last=len(ds) > t.batch_size,  # no batch of one for BatchNorm
        )
        self.model.train()
        total, correct, n = 0.0, 0, 0
        for x, y, _ in loader:
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits, _ = self.model(x)
            loss = F.cross_entropy(logits, y) + self.arch.alpha * self.model.head.penalty(
                self.arch.penalty
            )
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        return {"train": {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}}

    def run(self, resume: bool = False, max_units: int | None = None) -> dict[str, Any]:
        """Run the remaining stages (at most ``max_units``), then evaluate on the test split."""
        self._prepare(resume)
        ran = 0
        while self.done < self.stages:
            if max_units is not None and ran >= max_units:
                return {"stopped_after_units": self.done, "run_dir": str(self.run_dir)}
            seed_everything(self.cfg.train.seed * 1_000_003 + self.done)
            start = time.perf_counter()
            stage = "head" if self.done == 0 else "fine_tune"
            out = self._fit_head() if self.done == 0 else self._fine_tune_epoch(self.done - 1)
            out["val"] = self._validate()
            entry = {"unit": self.done, "epoch": self.done - 1, "stage": stage, **out}
            entry["seconds"] = time.perf_counter() - start
            self.history.append(entry)
            self.done += 1
            ran += 1
            val = (out["val"] or {}).get("accuracy")
            if val is None or val > self.best_val:
                self.best_val = -1.0 if val is None else val
                self._save("best", {"epoch": entry["epoch"], "val_accuracy": self.best_val})
            self._save(
                "last",
                {"units_done": self.done, "history": self.history, "best_val": self.best_val},
            )
            lines = "".join(json.dumps(h) + "\n" for h in self.history)
            atomic_write(self.run_dir / "metrics.jsonl", lines)
            if self.progress:
                acc = out["train"]["accuracy"]
                shown = "-" if val is None else f"{val:.4f}"
                print(
                    f"[{self.done}/{self.stages}] {stage} | train acc {acc:.4f} | val acc "
                    f"{shown} | {entry['seconds']:.1f}s",
                    flush=True,
                )
        return self.finish()

    def finish(self) -> dict[str, Any]:
        model, _, meta = read_drumond(self.run_dir, "best")
        loader = eval_loader(self.splits.test, self.prep, self.cfg)
        test = evaluate_drumond(model.to(self.device), loader, self.device, len(self.class_names))
        val = meta["val_accuracy"]
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "kind": KIND,
            "units": self.stages,
            "best": {
                "epoch": meta["epoch"],
                "val_accuracy": val if val >= 0 else None,
                **metrics_from_test(test, self.class_names),
                "prototypes": self.arch.num_prototypes,
            },
            "seconds": sum(h["seconds"] for h in self.history),
        }
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary


def read_drumond(run_dir: Path, tag: str) -> tuple[DrumondNet, RunConfig, dict[str, Any]]:
    """A Drumond checkpoint's model (CPU, eval), run configuration and metadata."""
    tensors, meta = load_checkpoint(Path(run_dir) / "checkpoints", tag)
    arch = DrumondConfig.model_validate(meta["architecture"])
    model = create_drumond(arch)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    cfg = validate_config(meta["config"], source=f"{run_dir}/checkpoints/{tag}.json")
    return model.eval(), cfg, meta


def is_drumond_run(run_dir: Path, tag: str = "best") -> bool:
    """Whether checkpoint ``tag`` of ``run_dir`` holds a Drumond model."""
    path = Path(run_dir) / "checkpoints" / f"{tag}.json"
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False  # read_checkpoint reports what is wrong with it


def prototype_neighbourhoods(
    model: DrumondNet, x: torch.Tensor, labels: list[int], k: int = NEAREST_K
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On embeddings ``x`` (N, D) with ``labels``: per prototype and class the images
    whose most probable prototype it is (J, K), and each prototype's k nearest images:
    (J, k) indices and squared distances, nearest first."""
    head = model.head
    with torch.no_grad():
        q = head.prototype_probabilities(x)
        d2 = torch.cdist(head.prototypes.double(), x.double()).pow(2)  # (J, N)
    J, K = head.prototypes.shape[0], head.class_weights.shape[0]
    best = q.argmax(1)
    counts = torch.zeros(J, K, dtype=torch.long)
    counts.index_put_((best, torch.tensor(labels)), torch.ones(len(labels), dtype=torch.long), True)
    near = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
    return counts, near.indices, near.values.float()


def export_drumond(
    run_dir: Path,
    tag: str = "best",
    name: str | None = None,
    store_root: str | Path | None = None,
    aliases: list[str] | None = None,
) -> DrumondManifest:
    """Publish checkpoint ``tag`` of a Drumond run, with each prototype's class
    association and nearest training images (measured on a stratified sample of the
    training split)."""
    run_dir = Path(run_dir)
    model, cfg, meta = read_drumond(run_dir, tag)
    prep = Preprocessing.model_validate(meta["preprocessing"])
    class_names = list(meta["class_names"])
    splits = build_splits(cfg.data, cfg.train.seed)
    device = pick_device(cfg.train.device, "train.device")
    train = splits.train
    sample = train.subset(sorted(stratified_order(train.labels, cfg.train.seed)[:NEAREST_IMAGES]))
    x = embed(model.to(device), sample, prep, cfg, device)
    model.cpu()
    counts, near_i, near_d = prototype_neighbourhoods(model, x, list(sample.labels))
    w = model.head.class_weights.detach().T  # (J, K)
    records, strips = [], {}
    for j in range(model.head.prototypes.shape[0]):
        idx = near_i[j].tolist()
        tiles: list[np.ndarray] = []
        for i in idx:
            view = Image.fromarray(model_view(sample.load(i), prep))
            tiles.append(np.asarray(view.resize((NEAREST_TILE, NEAREST_TILE))))
            tiles.append(np.full((NEAREST_TILE, 2, 3), 255, dtype=np.uint8))
        strips[j] = np.ascontiguousarray(np.concatenate(tiles[:-1], axis=1))
        records.append(
            DrumondPrototype(
                index=j,
                class_weights=[float(v) for v in w[j]],
                matched_images=int(counts[j].sum()),
                matched_classes=counts[j].tolist(),
                nearest_image_ids=[sample.image_id(i) for i in idx],
                nearest_classes=[int(sample.labels[i]) for i in idx],
                nearest_distances=[float(v) for v in near_d[j]],
            )
        )
    metrics: dict[str, Any] = {
        "val_accuracy": meta.get("val_accuracy"),
        "checkpoint_epoch": meta.get("epoch"),
    }
    if metrics["val_accuracy"] is not None and metrics["val_accuracy"] < 0:
        metrics["val_accuracy"] = None
    summary = run_dir / "summary.json"
    if tag == "best" and summary.is_file():
        best = json.loads(summary.read_text()).get("best", {})
        metrics.update({k: v for k, v in best.items() if k.startswith("test_")})
    else:
        loader = eval_loader(splits.test, prep, cfg)
        test = evaluate_drumond(model, loader, torch.device("cpu"), len(class_names))
        metrics.update(metrics_from_test(test, class_names))
    store = ModelStore(store_root if store_root is not None else cfg.export.store)
    return store.publish_drumond(
        name or cfg.export.name or cfg.name,
        model,
        prep,
        class_names,
        records,
        nearest=strips,
        training_config={**cfg.to_plain(), "checkpoint": tag, "run_dir": str(run_dir)},
        metrics=metrics,
        aliases=tuple(aliases if aliases is not None else cfg.export.aliases),
        embedded_images=len(sample),
    )
