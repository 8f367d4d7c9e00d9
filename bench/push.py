"""Push speed: prototypes projected per second and peak memory.

    python -m bench.push                 # every case below, each in a fresh process
    python -m bench.push --case vgg19    # one case (prints its JSON line)

Cases:
  demo, demo_bf16   the Fashion-MNIST demo architecture (compact_cnn, 28 px, 100
                    prototypes) over the demo's training split (random weights), float32
                    and bfloat16 search
  synthetic         the parts config over its training split
  vgg19             CUB scale as the reference measured it: VGG-19 trunk (random weights),
                    2000 prototypes (200 classes x 10), D=128, 224 px, 200 random images
                    in a 200-class image folder, read from disk by the DataLoader
  vgg19_30, vgg19_30_bf16
                    VGG-19 with 30 images per class as in CUB (10 classes, 300 images,
                    100 prototypes), float32 and bfloat16 search. A bfloat16 search
                    needs many more images than prototypes to pay (its float32 pass
                    afterwards runs up to one image per prototype), so it is not timed
                    on the 200-image set, where push would run float32 anyway

Everything push does is timed: the batched forward, the nearest-patch search, the
self-activation maps, the boxes and all prototype pictures. The reference
implementation took 159 s for the vgg19 case on these 2-core machines; the result file
puts our time beside it. Results: bench/results/push.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import device_name, peak_rss_mib, write_result
from tests.support.serving import cub_vgg19_config

REFERENCE_VGG19_S = 159.0
CASES = ("demo", "demo_bf16", "synthetic", "vgg19", "vgg19_30", "vgg19_30_bf16")


def _random_image_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        d = root / "train" / f"class_{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png", compress_level=1)
    return root


def run_case(case: str, threads: int) -> dict[str, Any]:
    from protopnet.model import create_model
    from training.config import load_config
    from training.data import build_splits, image_folder
    from training.push import push_prototypes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = 0
    with tempfile.TemporaryDirectory() as tmp:
        precision = "bf16" if case.endswith("_bf16") else "fp32"
        if case in ("demo", "demo_bf16", "synthetic"):
            cfg = load_config("synthetic" if case == "synthetic" else "fashion_mnist")
            splits = build_splits(cfg.data, cfg.train.seed)
            images = splits.train
            arch = cfg.model.architecture(len(splits.class_names))
            prep = cfg.model.preprocessing()
            batch = cfg.train.push_batch_size
        else:
            from protopnet.config import Preprocessing

            classes, per_class = (200, 1) if case == "vgg19" else (10, 30)
            root = _random_image_folder(Path(tmp), classes, per_class, size=(256, 256))
            images = image_folder(root / "train")
            arch = cub_vgg19_config(classes)
            prep = Preprocessing(img_size=224)
            batch = 25
            workers = 1  # decoding overlaps the forward pass
        model = create_model(arch).to(device)
        start = time.perf_counter()
        result = push_prototypes(
            model,
            images,
            prep,
            batch_size=batch,
            num_workers=workers,
            device=device,
            precision=precision,
            visualize=True,
        )
        seconds = time.perf_counter() - start
    P = model.num_prototypes
    out: dict[str, Any] = {
        "case": case,
        "backbone": arch.backbone,
        "img_size": arch.img_size,
        "prototypes": P,
        "images": result.images_seen,
        "trunk_precision": result.precision,
        # Images a bfloat16 search ran again in float32: one per distinct source image.
        "rescanned_images": len(set(result.image_indices)) if result.precision == "bf16" else 0,
        "seconds": round(seconds, 2),
        "forward_seconds": round(result.forward_seconds, 2),
        "visuals_seconds": round(seconds - result.forward_seconds, 2),
        "prototypes_per_s": round(P / seconds, 1),
        "images_per_s": round(result.images_seen / result.forward_seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": device_name(device),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if case == "vgg19":
        out["reference_seconds"] = REFERENCE_VGG19_S
        out["speedup_vs_reference"] = round(REFERENCE_VGG19_S / seconds, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=CASES, help="run one case in this process")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cases", nargs="*", default=list(CASES))
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.threads)), flush=True)
        return 0
    results = []
    for case in args.cases:
        # A fresh process per case, so peak memory is that case's own.
        proc = subprocess.run(
            [sys.executable, "-m", "bench.push", "--case", case, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        extra = (
            f" | reference {REFERENCE_VGG19_S:.0f} s -> x{r['speedup_vs_reference']}"
            if "speedup_vs_reference" in r
            else ""
        )
        print(
            f"{case:11s} {r['prototypes']:5d} prototypes over {r['images']:6d} images: "
            f"{r['seconds']:7.2f} s (forward {r['forward_seconds']:.2f} s, pictures "
            f"{r['visuals_seconds']:.2f} s), {r['prototypes_per_s']:8.1f} prototypes/s, "
            f"peak {r['peak_rss_mib']:.0f} MiB{extra}",
            flush=True,
        )
    by = {r["case"]: r for r in results}
    summary: dict[str, Any] = {"device": results[0]["device"], "cases": results}
    for fp32 in ("demo", "vgg19_30"):
        if fp32 in by and f"{fp32}_bf16" in by:
            summary[f"{fp32}_bf16_over_fp32_speed"] = round(
                by[fp32]["seconds"] / by[f"{fp32}_bf16"]["seconds"], 2
            )
    write_result("push", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
