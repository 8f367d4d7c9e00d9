"""The explainer's two paths side by side: numpy on the CPU, image by image, against
batched torch ops where the model runs (``PrototypeExplainer.explain_maps``).

    python -m bench.explain_paths [--quick] [--device cuda]

Times everything after the forward (maps placed and upsampled, 95th percentiles, boxes,
peaks, top classes and prototypes) from the same forward outputs, alternating the two
paths, at batch 1 and 16, for the demo's scale (100 prototypes, 28 px) and CUB's (2000
prototypes, 7 x 7 maps shown at 224 px). On the CPU the service uses the faster one; on a
GPU, the device path (its inputs never leave the device).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import device_name, write_result
from protopnet import Preprocessing, ProtoPNetConfig, PrototypeExplainer, create_model

SCALES = {"demo": (100, 10, 28), "cub": (2000, 200, 224)}  # prototypes, classes, pixels


def _time(fn: Any, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def measure(scale: str, batch: int, repeats: int, dev: torch.device) -> dict[str, float]:
    protos, classes, side = SCALES[scale]
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn", num_classes=classes, prototypes_per_class=protos // classes,
        prototype_depth=8, img_size=side,
    )  # fmt: skip
    model = create_model(cfg).eval().to(dev)
    explainer = PrototypeExplainer(model, Preprocessing(img_size=side), frozen=True)
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(batch, protos, 7, 7, generator=g).to(dev)
    logits, min_d = torch.rand(batch, classes).to(dev), torch.rand(batch, protos).to(dev)
    sizes = [(side, side)] * batch
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for on_device in (False, True):
            times[on_device].append(
                _time(
                    lambda o=on_device: explainer.explain_maps(
                        sim, logits, min_d, sizes, 3, 10, on_device=o
                    ),
                    dev,
                )
            )
    numpy_ms, torch_ms = min(times[False]) * 1e3, min(times[True]) * 1e3
    return {"numpy_ms": numpy_ms, "device_ms": torch_ms, "device_over_numpy": torch_ms / numpy_ms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as on the service's worker threads
    repeats = 3 if args.quick else 30
    out: dict[str, Any] = {"device": device_name(dev), "cases": {}}
    for scale in SCALES:
        for batch in (1, 16):
            r = measure(scale, batch, repeats if batch == 1 else max(2, repeats // 5), dev)
            out["cases"][f"{scale}_batch{batch}"] = r
            print(
                f"{scale:5s} batch {batch:2d}: numpy {r['numpy_ms']:8.2f} ms, "
                f"device path {r['device_ms']:8.2f} ms (x{r['device_over_numpy']:.2f})"
            )
    write_result("explain_paths", out)
    return out


if __name__ == "__main__":
    main()
