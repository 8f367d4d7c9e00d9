"""Accuracy: ProtoPNet against its baseline on Fashion-MNIST.

    python -m bench.accuracy                      # all 60000 training images, 10 epochs
    python -m bench.accuracy --epochs 3 --train-subset 6000   # a quick look

Both models use the same trunk (the demo config's), the same splits (validation carved
from training data selects each model's epoch; the test split is only reported), the
same online augmentation, batch size, epochs and learning-rate decay. The baseline is
the trunk + global average pooling + a linear head. Writes
bench/results/accuracy_fashion_mnist.json with protopnet_test_acc, baseline_test_acc,
gap_points (baseline minus ProtoPNet, in points), backbone, epochs and device.
Goal: gap <= 2.0 points with ProtoPNet test accuracy >= 90%.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bench.common import device_name, write_result
from protokit.devices import pick_device
from protopnet.backbones import create_backbone
from training import engine
from training.config import RunConfig, load_config
from training.data import Splits, TransformedImages, build_splits
from training.run import Trainer, eval_loader
from training.transforms import TrainTransform


class Baseline(nn.Module):
    """The trunk without prototypes: global average pooling and a linear classifier."""

    def __init__(self, backbone: str, num_classes: int, weights: str | None = None):
        super().__init__()
        self.features = create_backbone(backbone, weights)
        self.head = nn.Linear(self.features.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, C) -> (B, K)


@torch.inference_mode()
def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = n = 0
    for x, y, _ in loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        n += int(y.shape[0])
    model.train()
    return correct / max(n, 1)


def train_baseline(cfg: RunConfig, splits: Splits, progress: bool) -> dict[str, Any]:
    """Same data, augmentation, batch, epochs and step decay as the ProtoPNet run."""
    t = cfg.train
    device = pick_device(t.device, "train.device")
    torch.manual_seed(t.seed)
    model = Baseline(cfg.model.backbone, len(splits.class_names), cfg.model.weights).to(device)
    opt = torch.optim.Adam(
        [
            {
                "params": model.features.parameters(),
                "lr": t.lr.joint_features,
                "weight_decay": t.lr.weight_decay,
            },
            {"params": model.head.parameters(), "lr": t.lr.joint_add_on},
        ]
    )
    base = [g["lr"] for g in opt.param_groups]
    prep = cfg.model.preprocessing()
    train_ds = TransformedImages(splits.train, TrainTransform(prep, cfg.data.augment))
    val_loader = eval_loader(splits.val, prep, cfg)
    best_val, best_state, history = -1.0, None, []
    start = time.perf_counter()
    for epoch in range(t.epochs):
        engine.set_lr(
            opt, base, engine.joint_lr_factor(epoch, t.lr.joint_step_size, t.lr.joint_gamma)
        )
        loader = DataLoader(
            train_ds,
            batch_size=t.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(t.seed * 1_000_003 + epoch),
            num_workers=cfg.data.num_workers,
            drop_last=True,
        )
        seen = correct = 0
        e_start = time.perf_counter()
        for x, y, _ in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += int(y.shape[0])
            correct += int((logits.detach().argmax(1) == y).sum())
        val = _accuracy(model, val_loader, device)
        history.append(
            {
                "epoch": epoch,
                "train_accuracy": correct / max(seen, 1),
                "val_accuracy": val,
                "seconds": time.perf_counter() - e_start,
            }
        )
        if progress:
            print(
                f"baseline epoch {epoch}: train {correct / max(seen, 1):.4f} val {val:.4f}",
                flush=True,
            )
        if val > best_val:
            best_val = val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    test = _accuracy(model, eval_loader(splits.test, prep, cfg), device)
    return {
        "test_accuracy": test,
        "val_accuracy": best_val,
        "best_epoch": max(history, key=lambda h: h["val_accuracy"])["epoch"],
        "history": history,
        "seconds": time.perf_counter() - start,
    }


def bench_config(args: argparse.Namespace) -> RunConfig:
    """The demo config scaled up: all data, ``epochs`` epochs, push mid-way and at the end."""
    e = args.epochs
    overrides = [
        f"train.epochs={e}",
        "train.warm_epochs=1",
        f"train.push_start={max(1, e // 2 - 1)}",
        f"train.push_every={e}",
        f"train.lr.joint_step_size={max(1, (2 * (e - 1)) // 3)}",
        f"data.train_subset={'null' if args.train_subset is None else args.train_subset}",
        f"data.test_subset={'null' if args.test_subset is None else args.test_subset}",
        "name=bench_accuracy",
        *args.set,
    ]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None, help="default: all 60000")
    p.add_argument("--test-subset", type=int, default=None, help="default: all 10000")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="more config overrides")
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench_accuracy"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    cfg = bench_config(args)
    progress = not args.no_progress
    splits = build_splits(cfg.data, cfg.train.seed)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, args.run_dir, progress=progress, splits=splits)
    summary = trainer.run()
    proto_s = time.perf_counter() - start
    baseline = train_baseline(cfg, splits, progress)
    proto_acc = float(summary["best"]["test_accuracy"])
    base_acc = float(baseline["test_accuracy"])
    result = {
        "protopnet_test_acc": round(proto_acc, 4),
        "baseline_test_acc": round(base_acc, 4),
        "gap_points": round(100 * (base_acc - proto_acc), 2),
        "goal": "gap_points <= 2.0 and protopnet_test_acc >= 0.90",
        "goal_met": bool(100 * (base_acc - proto_acc) <= 2.0 and proto_acc >= 0.90),
        "backbone": cfg.model.backbone,
        "epochs": cfg.train.epochs,
        "device": device_name(trainer.device),
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "protopnet": {
            "val_accuracy": summary["best"]["val_accuracy"],
            "selected_epoch": summary["best"]["epoch"],
            "prototypes": summary["best"]["prototypes"],
            "seconds": round(proto_s, 1),
            "after_push": [
                {"epoch": h["epoch"], "stage": h["stage"], "val_accuracy": h["val"]["accuracy"]}
                for h in trainer.history
                if h["stage"] in ("push", "last_layer") and h.get("val")
            ],
        },
        "baseline": {k: v for k, v in baseline.items() if k != "history"}
        | {"seconds": round(baseline["seconds"], 1)},
        "config_overrides": args.set,
    }
    path = write_result("accuracy_fashion_mnist", result)
    print(
        f"ProtoPNet {100 * proto_acc:.2f}% | baseline {100 * base_acc:.2f}% | "
        f"gap {result['gap_points']:+.2f} points | {cfg.model.backbone}, {cfg.train.epochs} "
        f"epochs -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
