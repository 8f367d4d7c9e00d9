"""Model store benchmark: publish, verify and load times, with their bare baselines.

    python -m bench.store            # demo-scale and CUB-scale (VGG-19, 2000 prototypes)
    python -m bench.store --quick    # demo-scale only

Ratios side by side: ``load`` (hash every file, rebuild, strict load) against a bare
rebuild + safetensors read with no hashing; ``publish`` against writing the same bytes
with no hashing, temp folder or rename. Results: bench/results/store.json (bench.common.write_result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import device_name, write_result
from model_store import ModelStore, PrototypeRecord, PrototypeVisuals
from model_store.store import WEIGHTS
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.explain import upsample_maps
from protopnet.model import create_model
from protopnet.visualize import crop, draw_boxes, encode_png, overlay
from tests.support.serving import cub_vgg19_config


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _inputs(config: ProtoPNetConfig, photo_size: tuple[int, int]) -> dict[str, Any]:
    """Records and real-photograph visuals for every prototype (one photo, many boxes)."""
    from PIL import Image
    from skimage import data

    pic = np.asarray(Image.fromarray(data.chelsea()).resize(photo_size))  # (H, W, 3)
    H, W = pic.shape[:2]
    rng = np.random.default_rng(0)
    classes = config.classes_of_prototypes()
    records, visuals = [], {}
    # A smooth map like a real one: a 7 x 7 grid upsampled bicubically to the photo.
    heat = upsample_maps(torch.rand(1, 7, 7), (H, W))[0].numpy()
    for j, k in enumerate(classes):
        x0, y0 = int(rng.integers(0, W // 2)), int(rng.integers(0, H // 2))
        box = (x0, y0, x0 + W // 4, y0 + H // 4)
        records.append(
            PrototypeRecord(
                index=j, class_index=k, source_path=f"{k}/img.jpg", source_size=(W, H), box=box
            )
        )
        visuals[j] = PrototypeVisuals(
            patch=crop(pic, box), source=draw_boxes(pic, [box]), activation=overlay(pic, heat)
        )
    grid = 7 if config.img_size == 224 else config.img_size // 2
    return {
        "class_names": [f"class_{k:03d}" for k in range(config.num_classes)],
        "prototypes": records,
        "visuals": visuals,
        "activation_maps": torch.rand(len(classes), grid, grid),
    }


def bench_case(label: str, config: ProtoPNetConfig, photo: tuple[int, int], repeat: int) -> dict:
    print(f"[{label}] building {config.backbone} with {config.num_prototypes} prototypes ...")
    model = create_model(config).eval()
    prep = Preprocessing(img_size=config.img_size)
    args = _inputs(config, photo)
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        store = ModelStore(tmp / "store")

        publish_s = _best(lambda: store.publish("m", model, prep, **args), repeat)
        folder = store.path("m")

        def bare_write() -> None:  # the same files, no hashing, no temp folder, no rename
            out = tmp / f"bare-{time.perf_counter_ns()}"
            (out / "prototypes").mkdir(parents=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
            for j, v in args["visuals"].items():
                for kind in ("patch", "source", "activation"):
                    (out / "prototypes" / f"{j}_{kind}.png").write_bytes(
                        encode_png(getattr(v, kind))
                    )

        bare_write_s = _best(bare_write, repeat)
        verify_s = _best(lambda: store.verify("m"), repeat)
        load_s = _best(lambda: store.load("m"), repeat)

        def bare_load() -> None:  # rebuild + read weights, no hashing or manifest checks
            from safetensors.torch import load_file

            m = create_model(config)
            m.load_state_dict(load_file(folder / WEIGHTS), strict=True)

        bare_load_s = _best(bare_load, repeat)
        build_s = _best(lambda: create_model(config), repeat)
        manifest = store.manifest("m")
        size = sum((folder / rel).stat().st_size for rel in manifest.files)
        weights_mb = (folder / WEIGHTS).stat().st_size / 1e6
        row = {
            "case": label,
            "backbone": config.backbone,
            "prototypes": config.num_prototypes,
            "files": len(manifest.files) + 2,
            "artifact_mb": round(size / 1e6, 1),
            "weights_mb": round(weights_mb, 1),
            "publish_s": round(publish_s, 3),
            "bare_write_s": round(bare_write_s, 3),
            "publish_over_bare": round(publish_s / bare_write_s, 2),
            "verify_s": round(verify_s, 3),
            "load_s": round(load_s, 3),
            "bare_load_s": round(bare_load_s, 3),
            "load_over_bare": round(load_s / bare_load_s, 2),
            "create_model_s": round(build_s, 3),
        }
        print(json.dumps(row))
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo-scale case only")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (CUB scale: 1)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cases = [
        (
            "demo_fashion_mnist",
            ProtoPNetConfig(backbone="small_cnn", num_classes=10, prototype_depth=64, img_size=28),
            (28, 28),
            args.repeat,
        )
    ]
    if not args.quick:
        cases.append(
            (
                "cub_vgg19",
                cub_vgg19_config(),
                (500, 375),  # a typical CUB-200-2011 image
                1,  # 1.2 GB per copy: one run of each step
            )
        )
    rows = [bench_case(label, cfg, photo, n) for label, cfg, photo, n in cases]
    path = write_result(
        "store",
        {
            "device": device_name("cpu"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "note": "best of N wall-clock seconds; *_over_bare = store step / bare step",
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
