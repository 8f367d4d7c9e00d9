"""The training run: warm-up, joint, push and last-layer stages on a schedule, resumable.

The schedule is a flat list of units (``plan_units``): an SGD epoch ("warm" or "joint"),
then on push epochs a "push" and a "last_layer" unit. After every unit the run saves
the "last" checkpoint (model, optimisers, history, push records), rewrites
metrics.jsonl and the curves PNG; after every last-layer unit whose validation accuracy
is the best so far it saves "best" (always a pushed model). A killed run restarted with
``--resume`` continues with the first unit not yet saved, with the same random state it
would have had.

Run directory:

    config.yaml        the resolved configuration
    metrics.jsonl      one line per unit: stage, epoch, loss terms, accuracy, timings
    curves.png         accuracy and loss terms per epoch
    checkpoints/       last.*, best.*, pruned.* (see training.checkpoint)
    summary.json       validation and test accuracy of the selected checkpoints
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from model_store import PrototypeRecord
from protokit.atomic import atomic_write
from protokit.devices import pick_device
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.errors import ProtoPNetError
from protopnet.model import ProtoPNet, create_model
from protopnet.preprocess import eval_transform
from training import engine
from training.checkpoint import (
    flatten_optimizer,
    has_checkpoint,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    unflatten_optimizer,
)
from training.config import RunConfig, TrainConfig, dump_config, load_raw, validate_config
from training.data import ImageSet, Splits, TransformedImages, build_splits
from training.distributed import DistInfo, barrier, broadcast_module, ddp_cuda_device
from training.plots import plot_curves
from training.push import push_prototypes
from training.transforms import TrainTransform


class RunError(ProtoPNetError):
    """A run directory that cannot be used as asked (exists, or differs on resume)."""


@dataclass(frozen=True)
class Unit:
    kind: str  # "warm" | "joint" | "push" | "last_layer"
    epoch: int


def is_push_epoch(epoch: int, train: TrainConfig) -> bool:
    """Push after epoch e when e >= push_start and (e - push_start) % push_every == 0,
    and always after the last epoch."""
    if epoch == train.epochs - 1:
        return True
    return epoch >= train.push_start and (epoch - train.push_start) % train.push_every == 0


def plan_units(train: TrainConfig) -> list[Unit]:
    """The whole schedule, in order (a pure function of the config)."""
    units: list[Unit] = []
    for e in range(train.epochs):
        units.append(Unit("warm" if e < train.warm_epochs else "joint", e))
        if is_push_epoch(e, train):
            units += [Unit("push", e), Unit("last_layer", e)]
    return units


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_tensors(model: ProtoPNet) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def model_from_tensors(arch: ProtoPNetConfig, tensors: dict[str, torch.Tensor]) -> ProtoPNet:
    """Rebuild a model from a checkpoint's architecture and weights (strict load)."""
    model = create_model(arch, weights=None)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model and everything export, push and prune need."""

    model: ProtoPNet
    config: RunConfig
    preprocessing: Preprocessing
    class_names: list[str]
    records: list[PrototypeRecord] | None
    activation_maps: torch.Tensor | None
    meta: dict[str, Any]


def read_checkpoint(run_dir: Path, tag: str) -> LoadedCheckpoint:
    tensors, meta = load_checkpoint(Path(run_dir) / "checkpoints", tag)
    if meta.get("kind") == "drumond":
        raise RunError(
            f"{run_dir} holds a Drumond model (model.kind: drumond): evaluate, push and prune "
            "apply to ProtoPNet runs; `python -m training export` publishes it"
        )
    arch = ProtoPNetConfig.model_validate(meta["architecture"])
    model = model_from_tensors(arch, tensors)
    push = meta.get("push")
    records = [PrototypeRecord.model_validate(r) for r in push["records"]] if push else None
    return LoadedCheckpoint(
        model=model,
        config=validate_config(meta["config"], source=f"{run_dir}/checkpoints/{tag}.json"),
        preprocessing=Preprocessing.model_validate(meta["preprocessing"]),
        class_names=list(meta["class_names"]),
        records=records,
        activation_maps=tensors.get("push.maps"),
        meta=meta,
    )


def write_model_checkpoint(
    run_dir: Path,
    tag: str,
    model: ProtoPNet,
    cfg: RunConfig,
    prep: Preprocessing,
    class_names: list[str],
    records: list[PrototypeRecord] | None,
    maps: torch.Tensor | None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    tensors = model_tensors(model)
    if maps is not None:
        tensors["push.maps"] = maps
    tensors.update(extra_tensors or {})
    meta: dict[str, Any] = {
        "tag": tag,
        "architecture": model.config.model_dump(mode="json"),
        "preprocessing": prep.model_dump(mode="json"),
        "class_names": class_names,
        "config": cfg.to_plain(),
        "push": {"records": [r.model_dump(mode="json") for r in records]} if records else None,
        **(extra or {}),
    }
    return save_checkpoint(Path(run_dir) / "checkpoints", tag, tensors, meta)


def eval_loader(images: ImageSet, prep: Preprocessing, cfg: RunConfig) -> DataLoader:
    return DataLoader(
        TransformedImages(images, eval_transform(prep)),
        batch_size=cfg.train.eval_batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
    )


class Trainer:
    """Runs (or resumes) one training run in ``run_dir``."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None = None,
        progress: bool = True,
        dist: DistInfo | None = None,
        splits: Splits | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.runs_dir / cfg.name
        self.progress = progress
        self.dist = dist or DistInfo()
        t = cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)
        self.splits = splits or build_splits(cfg.data, t.seed)
        self.class_names = self.splits.class_names
        self.arch = cfg.model.architecture(len(self.class_names))
        self.prep = cfg.model.preprocessing()
        self.device = pick_device(t.device, "train.device")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = ddp_cuda_device(self.dist.local_rank, torch.cuda.device_count())
        self.channels_last = t.channels_last
        self.class_weights = class_weights_for(cfg, self.splits, self.device)
        # What picks the best checkpoint on the validation split.
        self.select_by = "accuracy" if self.class_weights is None else "balanced_accuracy"
        self.model = create_model(self.arch, cfg.model.weights).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = engine.amp_dtype_for(self.device, t.amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.optimizers = {
            "warm": engine.warm_optimizer(self.model, t.lr),
            "joint": engine.joint_optimizer(self.model, t.lr),
        }
        self.joint_base_lr = [g["lr"] for g in self.optimizers["joint"].param_groups]
        self.units = plan_units(t)
        self.done = 0  # units completed
        self.history: list[dict[str, Any]] = []
        self.records: list[PrototypeRecord] | None = None
        self.maps: torch.Tensor | None = None
        self.pushed = False
        self.best_val = -1.0
        self.started = time.time()
        self._last_plot = time.monotonic()

    # -- files ------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def prepare_run_dir(self, resume: bool) -> None:
        """Create the run directory, or check it for --resume."""
        cfg_path = self.run_dir / "config.yaml"
        if resume:
            if cfg_path.is_file():
                saved = validate_config(load_raw(cfg_path), str(cfg_path))
                if saved != self.cfg:
                    diff = _diff(saved.to_plain(), self.cfg.to_plain())
                    raise RunError(
                        f"--resume: the config differs from {cfg_path}: {', '.join(diff[:10])}"
                    )
            if has_checkpoint(self.ckpt_dir, "last"):
                self.load_last()
        elif has_checkpoint(self.ckpt_dir, "last"):
            raise RunError(
                f"run directory {str(self.run_dir)!r} already holds a checkpoint; pass "
                "--resume to continue it, or choose another --run-dir"
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.ckpt_dir)
            atomic_write(cfg_path, dump_config(self.cfg))

    def save_last(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        optim_meta = {}
        for name, opt in self.optimizers.items():
            t, m = flatten_optimizer(name, opt)
            tensors.update(t)
            optim_meta[name] = m
        write_model_checkpoint(
            self.run_dir,
            "last",
            self.model,
            self.cfg,
            self.prep,
            self.class_names,
            self.records,
            self.maps,
            extra={
                "units_done": self.done,
                "epoch": self.units[self.done - 1].epoch if self.done else -1,
                "optimizers": optim_meta,
                "history": self.history,
                "pushed": self.pushed,
                "best_val": self.best_val,
                "seed": self.cfg.train.seed,
            },
            extra_tensors=tensors,
        )

    def load_last(self) -> None:
        tensors, meta = load_checkpoint(self.ckpt_dir, "last")
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(state, strict=True)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(unflatten_optimizer(name, tensors, meta["optimizers"][name]))
        self.done = int(meta["units_done"])
        self.history = list(meta["history"])
        self.pushed = bool(meta["pushed"])
        self.best_val = float(meta["best_val"])
        push = meta.get("push")
        self.records = (
            [PrototypeRecord.model_validate(r) for r in push["records"]] if push else None
        )
        self.maps = tensors.get("push.maps")

    def write_metrics(self, plot: bool = True) -> None:
        """metrics.jsonl after every unit; the curves PNG after each push cycle and at
        most every 30 s otherwise (drawing costs a fraction of a second)."""
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write(self.run_dir / "metrics.jsonl", lines)
        if plot:
            plot_curves(self.history, self.run_dir / "curves.png")
            self._last_plot = time.monotonic()

    def _plot_due(self) -> bool:
        return time.monotonic() - self._last_plot > 30.0

    # -- stages -----------------------------------------------------------------------
    def _train_loader(self, epoch: int) -> tuple[DataLoader, DistributedSampler | None]:
        ds = TransformedImages(self.splits.train, TrainTransform(self.prep, self.cfg.data.augment))
        bs = self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        sampler: DistributedSampler | None = None
        if self.dist.enabled:
            sampler = DistributedSampler(
                ds, self.dist.world_size, self.dist.rank, shuffle=True, seed=self.cfg.train.seed
            )
            sampler.set_epoch(epoch)
        loader = DataLoader(
            ds,
            batch_size=bs,
            shuffle=sampler is None,
            sampler=sampler,
            generator=gen,
            num_workers=self.cfg.data.num_workers,
            drop_last=len(ds) > bs * self.dist.world_size,  # no batch of one for BatchNorm
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        return loader, sampler

    def _validate(self) -> dict[str, Any] | None:
        """Accuracy, balanced accuracy and the loss terms on the validation split."""
        if len(self.splits.val) == 0:
            return None
        out = engine.evaluate(
            self.model,
            eval_loader(self.splits.val, self.prep, self.cfg),
            self.cfg.train.loss,
            self.device,
            self.channels_last,
            confusion=True,
        )
        confusion = out.pop("confusion")
        out["balanced_accuracy"] = engine.class_report(confusion, self.class_names)[
            "balanced_accuracy"
        ]
        return out

    def _sgd_unit(self, unit: Unit) -> dict[str, Any]:
        t = self.cfg.train
        stage: engine.Stage = "warm" if unit.kind == "warm" else "joint"
        opt = self.optimizers[stage]
        lr_factor = 1.0
        if stage == "joint":
            lr_factor = engine.joint_lr_factor(
                unit.epoch - t.warm_epochs, t.lr.joint_step_size, t.lr.joint_gamma
            )
            engine.set_lr(opt, self.joint_base_lr, lr_factor)
        engine.set_stage(self.model, stage)
        forward: torch.nn.Module = engine.TrainForward(self.model, self.amp_dtype)
        if self.dist.enabled:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        loader, _ = self._train_loader(unit.epoch)
        train = engine.train_epoch(
            self.model,
            forward,
            loader,
            opt,
            t.loss,
            stage,
            self.device,
            self.channels_last,
            self.scaler,
            self.progress and self.dist.is_main,
            desc=f"epoch {unit.epoch} {stage}",
            class_weights=self.class_weights,
        )
        self.pushed = False
        return {"train": train, "lr_factor": lr_factor, "val": self._validate()}

    def _push_unit(self, unit: Unit) -> dict[str, Any]:
        t = self.cfg.train
        result = push_prototypes(
            self.model,
            self.splits.train,
            self.prep,
            batch_size=t.push_batch_size,
            num_workers=self.cfg.data.num_workers,
            device=self.device,
            precision=t.push_precision,
            channels_last=self.channels_last,
            visualize=False,  # pictures are drawn once, at export, for the chosen model
            progress=self.progress,
        )
        self.records, self.maps = result.records, result.activation_maps
        self.pushed = True
        dist = torch.tensor([r.distance or 0.0 for r in result.records])
        return {
            "push": {
                "seconds": result.seconds,
                "images": result.images_seen,
                "mean_distance": float(dist.mean()),
                "max_distance": float(dist.max()),
                "source_images": len(set(result.image_indices)),
                "precision": result.precision,  # "bf16": source_images ran again in float32
            },
            "val": self._validate(),
        }

    def _last_layer_unit(self, unit: Unit, epochs: int | None = None) -> dict[str, Any]:
        t = self.cfg.train
        loader = eval_loader(self.splits.train, self.prep, self.cfg)
        sims, labels = engine.collect_similarities(
            self.model, loader, self.device, self.channels_last, self.progress, "scores"
        )
        last = engine.train_last_layer(
            self.model,
            sims,
            labels,
            t.last_layer_epochs if epochs is None else epochs,
            t.lr.last_layer,
            t.loss,
            t.last_layer_batch_size,
            seed=t.seed * 7919 + unit.epoch,
            class_weights=self.class_weights,
        )
        return {"train": last, "val": self._validate()}

    # -- the loop ---------------------------------------------------------------------
    def run(self, resume: bool = False, max_units: int | None = None) -> dict[str, Any]:
        """Run the remaining units (at most ``max_units``), then select and report."""
        self.prepare_run_dir(resume)
        ran = 0
        while self.done < len(self.units):
            if max_units is not None and ran >= max_units:
                return {"stopped_after_units": self.done, "run_dir": str(self.run_dir)}
            unit = self.units[self.done]
            seed_everything(self.cfg.train.seed * 1_000_003 + self.done)
            start = time.perf_counter()
            if unit.kind in ("warm", "joint"):
                out = self._sgd_unit(unit)
            elif self.dist.is_main:
                out = self._push_unit(unit) if unit.kind == "push" else self._last_layer_unit(unit)
            else:
                out = {}
            if unit.kind in ("push", "last_layer"):
                broadcast_module(self.model, self.dist)
            entry = {"unit": self.done, "epoch": unit.epoch, "stage": unit.kind, **out}
            entry["seconds"] = time.perf_counter() - start
            self.history.append(entry)
            self.done += 1
            ran += 1
            if self.dist.is_main:
                val = (out.get("val") or {}).get(self.select_by)
                if unit.kind == "last_layer" and (val is None or val > self.best_val):
                    self.best_val = -1.0 if val is None else val
                    self.save_best(unit)
                self.save_last()
                self.write_metrics(plot=unit.kind == "last_layer" or self._plot_due())
                self._log(entry)
            barrier(self.dist)
        summary = self.finish() if self.dist.is_main else {}
        barrier(self.dist)
        return summary

    def save_best(self, unit: Unit) -> None:
        write_model_checkpoint(
            self.run_dir,
            "best",
            self.model,
            self.cfg,
            self.prep,
            self.class_names,
            self.records,
            self.maps,
            extra={
                "epoch": unit.epoch,
                "val_accuracy": (self.history[-1].get("val") or {}).get("accuracy", -1.0),
                "selected_by": {"metric": self.select_by, "value": self.best_val},
            },
        )

    def _log(self, entry: dict[str, Any]) -> None:
        if not self.progress:
            return
        parts = [f"[{entry['unit'] + 1}/{len(self.units)}] epoch {entry['epoch']} {entry['stage']}"]
        tr = entry.get("train") or {}
        if "accuracy" in tr:
            parts.append(f"train acc {tr['accuracy']:.4f}")
        if "ce" in tr:
            parts.append(f"ce {tr['ce']:.4f}")
        if "cluster" in tr:
            parts.append(f"clst {tr['cluster']:.3f} sep {tr['separation']:.3f}")
        val = entry.get("val") or {}
        if "accuracy" in val:
            parts.append(f"val acc {val['accuracy']:.4f}")
        parts.append(f"{entry['seconds']:.1f}s")
        print(" | ".join(parts), flush=True)

    def finish(self) -> dict[str, Any]:
        """Evaluate the selected checkpoints on the test split; prune if configured."""
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "units": len(self.units)}
        best = read_checkpoint(self.run_dir, "best")
        best.model.to(self.device)
        summary["best"] = {
            "epoch": best.meta["epoch"],
            "val_accuracy": best.meta["val_accuracy"] if best.meta["val_accuracy"] >= 0 else None,
            **self.measure_test(best.model),
            "prototypes": best.model.num_prototypes,
        }
        if self.cfg.prune.enabled:
            pruned = prune_checkpoint(self.run_dir, "best", "pruned", self.splits, self.progress)
            summary["pruned"] = pruned
        summary["seconds"] = sum(h["seconds"] for h in self.history)
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def measure_test(self, model: ProtoPNet) -> dict[str, Any]:
        loader = eval_loader(self.splits.test, self.prep, self.cfg)
        out = engine.evaluate(model, loader, self.cfg.train.loss, self.device, confusion=True)
        return metrics_from_test(out, self.class_names)


def class_weights_for(cfg: RunConfig, splits: Splits, device: torch.device) -> torch.Tensor | None:
    """The CE class weights ``cfg`` asks for (train.loss.class_weights), from the
    training split's class counts; None for plain CE."""
    if cfg.train.loss.class_weights != "balanced":
        return None
    return engine.balanced_class_weights(splits.train.class_counts()).to(device)


def refit_last_layer(
    model: ProtoPNet, splits: Splits, prep: Preprocessing, cfg: RunConfig, device: torch.device
) -> tuple[dict[str, float], dict[str, Any] | None, dict[str, Any]]:
    """The convex last-layer stage on the training split's similarity scores (after
    pruning or revision removed prototypes), then the validation (None without one) and
    test evaluations, the test's with its confusion matrix."""
    sims, labels = engine.collect_similarities(model, eval_loader(splits.train, prep, cfg), device)
    last = engine.train_last_layer(
        model,
        sims,
        labels,
        cfg.prune.last_layer_epochs,
        cfg.train.lr.last_layer,
        cfg.train.loss,
        cfg.train.last_layer_batch_size,
        seed=cfg.train.seed,
        class_weights=class_weights_for(cfg, splits, device),
    )
    loss = cfg.train.loss
    val = (
        engine.evaluate(model, eval_loader(splits.val, prep, cfg), loss, device)
        if len(splits.val)
        else None
    )
    test = engine.evaluate(model, eval_loader(splits.test, prep, cfg), loss, device, confusion=True)
    return last, val, test


def metrics_from_test(evaluated: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """A test evaluation (with its confusion matrix) as the metrics a model is published
    with: accuracy, balanced accuracy, and per class its images, recall and precision."""
    report = engine.class_report(evaluated["confusion"], class_names)
    return {
        "test_accuracy": evaluated["accuracy"],
        "test_balanced_accuracy": report["balanced_accuracy"],
        "test_per_class": report["per_class"],
        "test_confusion": evaluated["confusion"],
    }


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def prune_checkpoint(
    run_dir: Path,
    source_tag: str,
    target_tag: str,
    splits: Splits | None = None,
    progress: bool = False,
    k: int | None = None,
    tau: int | None = None,
) -> dict[str, Any]:
    """Prune checkpoint ``source_tag``, retrain its last layer, save it as ``target_tag``."""
    from training.prune import prune, reindex_records

    ck = read_checkpoint(run_dir, source_tag)
    cfg = ck.config
    k = cfg.prune.k if k is None else k
    tau = cfg.prune.tau if tau is None else tau
    splits = splits or build_splits(cfg.data, cfg.train.seed)
    device = pick_device(cfg.train.device, "train.device")
    model = ck.model.to(device)
    before = model.num_prototypes
    result = prune(
        model,
        splits.train,
        ck.preprocessing,
        k=k,
        tau=tau,
        batch_size=cfg.train.eval_batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
        progress=progress,
    )
    records, maps = ck.records, ck.activation_maps
    if records is not None:
        records, maps = reindex_records(records, maps, result.pruned)
    last, val, test = refit_last_layer(model, splits, ck.preprocessing, cfg, device)
    info = {
        "source": source_tag,
        "k": k,
        "tau": tau,
        "prototypes_before": before,
        "prototypes_after": model.num_prototypes,
        "pruned": result.pruned,
        "classes_without_prototypes": result.classes_left_without_prototypes,
        "last_layer": last,
        "val_accuracy": None if val is None else val["accuracy"],
        **metrics_from_test(test, ck.class_names),
    }
    write_model_checkpoint(
        run_dir,
        target_tag,
        model,
        cfg,
        ck.preprocessing,
        ck.class_names,
        records,
        maps,
        extra={"epoch": ck.meta.get("epoch"), "val_accuracy": info["val_accuracy"], "prune": info},
    )
    return info
