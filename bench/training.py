"""Training speed: images per second of the joint stage, beside the plain baseline.

    python -m bench.training              # demo, synthetic and VGG-19 (224 px) cases
    python -m bench.training --steps 10   # fewer steps per measurement

For each case two numbers are measured on the same device, batch and input size, in
alternation (one step of each per round):
``protopnet``: one joint-stage SGD step (trunk + add-on + prototype distances + the full
loss: CE, cluster, separation, L1) and ``baseline``: the same trunk with global average
pooling and a linear head (CE only), so ``protopnet_over_baseline`` is the cost of the
prototype layer. ``epoch``: a real joint epoch through ``training.engine.train_epoch``
with the DataLoader and online augmentation (demo and synthetic only). On CUDA the
steps run under mixed precision as the trainer does. Results: bench/results/training.json.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench.accuracy import Baseline
from bench.common import device_name, p50, seconds_of, write_result
from protokit.devices import pick_device
from protopnet.model import create_model
from tests.support.serving import cub_vgg19_config
from training import engine
from training.config import LossCoefficients, load_config
from training.data import TransformedImages, build_splits
from training.transforms import TrainTransform


def _cases() -> dict[str, dict[str, Any]]:
    demo = load_config("fashion_mnist")
    syn = load_config("synthetic")
    return {
        "demo": {"cfg": demo, "batch": demo.train.batch_size},
        "synthetic": {"cfg": syn, "batch": syn.train.batch_size},
        "vgg19_224": {
            "arch": cub_vgg19_config(),
            "batch": 8,
        },
    }


def _interleaved_step_times(
    steps: dict[str, Any], x: torch.Tensor, y: torch.Tensor, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of each named step function, taken in alternation (one of each
    per round), so a change in the shared machine's speed affects all of them alike."""
    for step in steps.values():
        for _ in range(2):
            step(x, y)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(seconds_of(lambda step=step: step(x, y), device))
    return times


def measure(name: str, case: dict[str, Any], steps: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = case.get("cfg")
    if cfg is not None:
        splits = build_splits(cfg.data, cfg.train.seed)
        arch = cfg.model.architecture(len(splits.class_names))
    else:
        arch = case["arch"]
    B, S = case["batch"], arch.img_size
    amp = engine.amp_dtype_for(device, True)
    coefs = LossCoefficients()
    memory_format = torch.channels_last

    model = create_model(arch).to(device).to(memory_format=memory_format)
    engine.set_stage(model, "joint")
    forward = engine.TrainForward(model, amp)
    opt = engine.joint_optimizer(model, load_config("synthetic").train.lr)

    def proto_step_with(fwd: engine.TrainForward) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            logits, min_d = fwd(x)
            terms = engine.loss_terms(model, logits, min_d, y, coefs, "joint")
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            opt.step()

        return step

    base = Baseline(arch.backbone, arch.num_classes).to(device).to(memory_format=memory_format)
    base_opt = torch.optim.Adam(base.parameters(), lr=1e-4)

    def base_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(base(x), y)
        base_opt.zero_grad(set_to_none=True)
        loss.backward()
        base_opt.step()

    steps_by_name = {"protopnet": proto_step_with(forward), "baseline": base_step}
    if amp is not None:  # the same step in float32, to show what mixed precision buys
        steps_by_name["protopnet_fp32"] = proto_step_with(engine.TrainForward(model, None))

    x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=memory_format)
    y = torch.arange(B, device=device) % arch.num_classes
    times = _interleaved_step_times(steps_by_name, x, y, steps, device)
    proto, baseline = times["protopnet"], times["baseline"]
    out: dict[str, Any] = {
        "case": name,
        "backbone": arch.backbone,
        "img_size": S,
        "batch": B,
        "prototypes": arch.num_prototypes,
        "amp": str(amp) if amp else None,
        "protopnet_images_per_s": round(B / p50(proto), 1),
        "baseline_images_per_s": round(B / p50(baseline), 1),
        "protopnet_over_baseline": round(p50(proto) / p50(baseline), 2),
    }
    if "protopnet_fp32" in times:
        fp32 = p50(times["protopnet_fp32"])
        out["protopnet_fp32_images_per_s"] = round(B / fp32, 1)
        out["amp_speedup"] = round(fp32 / p50(proto), 2)
    if cfg is not None:  # a real epoch slice: DataLoader, augmentation, the engine's loop
        n = min(len(splits.train), B * steps * 2)
        ds = TransformedImages(
            splits.train.subset(range(n)),
            TrainTransform(cfg.model.preprocessing(), cfg.data.augment),
        )
        loader = DataLoader(ds, batch_size=B, shuffle=True, num_workers=cfg.data.num_workers)
        stats = engine.train_epoch(
            model, forward, loader, opt, coefs, "joint", device, True, None, progress=False
        )
        out["epoch_images_per_s"] = round(stats["images_per_s"], 1)
        out["epoch_workers"] = cfg.data.num_workers
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cases", nargs="*", default=list(_cases()))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device("auto", "train.device")
    cases = _cases()
    results = []
    for name in args.cases:
        steps = (
            max(3, args.steps // 4)
            if name.startswith("vgg") and device.type == "cpu"
            else args.steps
        )
        case = cases[name]
        if name.startswith("vgg") and device.type == "cuda":
            case = {**case, "batch": 80}  # the reference's training batch; 8 starves a GPU
        r = measure(name, case, steps, device)
        results.append(r)
        epoch = f", epoch {r['epoch_images_per_s']:.0f} img/s" if "epoch_images_per_s" in r else ""
        if "amp_speedup" in r:
            epoch += (
                f", float32 {r['protopnet_fp32_images_per_s']:.1f} img/s (AMP x{r['amp_speedup']})"
            )
        print(
            f"{name:10s} joint step {r['protopnet_images_per_s']:8.1f} img/s | baseline "
            f"{r['baseline_images_per_s']:8.1f} img/s | x{r['protopnet_over_baseline']}{epoch}",
            flush=True,
        )
    write_result("training", {"device": device_name(device), "cases": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
