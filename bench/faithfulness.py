"""Can a reader trust the explanation? The familiarity score's separation of in- and
out-of-distribution images, beside the scores a ProtoPNet gives for free, and the
in-distribution abstention rate against the calibrated one.

    python -m bench.faithfulness [--store store] [--model fashion-mnist@production]

Needs the demo model (``make demo`` publishes it) and Fashion-MNIST. In: 3000
Fashion-MNIST test images. Out: scikit-learn's digits, crops of scikit-image's
photographs, its LFW faces and noise (``tests/support/ood.py``). Baselines, all from the
same forward: the top logit, the top probability, the best similarity of any prototype,
the answered class's best own prototype similarity, and a k-nearest-neighbour distance
(k = 10) between L2-normalised similarity vectors and 5000 training images'. Writes
bench/results/faithfulness.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import device_name, p50, seconds_of, write_result
from model_store import ModelStore
from protokit.threads import use_torch_threads
from protopnet import familiarity
from protopnet.model import ProtoPNetOutput
from protopnet.preprocess import eval_transform, to_model_mode
from tests.support import ood
from training.config import load_config
from training.data import build_splits


def _outputs(model: Any, prep: Any, images: list[Image.Image]) -> ProtoPNetOutput:
    tf = eval_transform(prep)
    x = torch.stack([tf(to_model_mode(im, prep)) for im in images])
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 500):
            outs.append(model.forward_full(x[i : i + 500]))
    return ProtoPNetOutput(
        logits=torch.cat([o.logits for o in outs]),
        min_distances=torch.cat([o.min_distances for o in outs]),
        distances=torch.cat([o.distances for o in outs]),
        features=torch.cat([o.features for o in outs]),
    )


MAP_CASES = {
    "parts_32px_tiny_cnn": "synthetic",
    "parts_224px_efficientnet_lite0": "synthetic_224",
}


def _maps_on_parts(config: str, images: int, reuse: str | None = None) -> dict[str, Any]:
    """A synthetic parts set (a class-coloured part on clutter, its box known) and a
    shipped config trained here: for each test image, the answered class's most activated
    own prototype; per map method, whether the map's maximum falls on the part (pointing
    game), and the receipt of the map's 95th-percentile box (the similarity left with it
    blanked, and with random boxes of its size blanked). ``reuse``: a folder whose
    ``store`` already holds the trained model (to measure the maps again)."""
    import subprocess
    import sys
    import tempfile
    import time

    from protopnet.explain import percentile_boxes, upsample_maps
    from protopnet.faithfulness import SmoothGrad, receipts
    from protopnet.prp import PRP

    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        if reuse is not None:
            tmp = reuse
        t0 = time.perf_counter()
        cmd = [
            sys.executable, "-m", "training", "--no-progress", "train", "--config", config,
            "--run-dir", f"{tmp}/run", "--set", f"export.store={tmp}/store", "--export",
        ]  # fmt: skip
        if reuse is None:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"training {config} failed:\n{proc.stderr[-3000:]}")
        train_s = time.perf_counter() - t0
        loaded = ModelStore(f"{tmp}/store").load(cfg.export.name)
    model, prep = loaded.model.eval(), loaded.manifest.preprocessing
    test = build_splits(cfg.data, cfg.train.seed).test
    tf = eval_transform(prep)
    makers: dict[str, Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]]
    sg, prp = SmoothGrad(model), PRP(model, prep)
    S = prep.img_size
    makers = {
        "upsample": lambda x, j, cell, d: upsample_maps(model.similarity(d)[None].float(), (S, S)),
        "smoothgrad": lambda x, j, cell, d: sg.attribute(x, [j], cell),
        "prp": lambda x, j, cell, d: prp.attribute(x, [j], cell),
    }
    hits: dict[str, list[bool]] = {k: [] for k in makers}
    hits_right: dict[str, list[bool]] = {k: [] for k in makers}  # where the answer is right
    own: dict[str, list[float]] = {k: [] for k in makers}
    rnd: dict[str, list[float]] = {k: [] for k in makers}
    cost: dict[str, list[float]] = {k: [] for k in makers}
    right = 0
    classes = model.prototype_class_identity.argmax(dim=1)
    n = min(images, len(test))
    for i in range(n):
        x = tf(to_model_mode(test.load(i), prep))
        with torch.no_grad():
            out = model.forward_full(x[None])
        k = int(out.logits.argmax())
        correct = k == test.labels[i]
        right += int(correct)
        mine = torch.nonzero(classes == k).flatten()
        j = int(mine[out.min_distances[0, mine].argmin()])
        d = out.distances[0, j]
        cell = torch.tensor([divmod(int(d.argmin()), d.shape[1])])
        x0, y0, x1, y1 = test.part_box(i)  # type: ignore[attr-defined]
        for name, make in makers.items():
            t0 = time.perf_counter()
            m = make(x, j, cell, d)
            cost[name].append(time.perf_counter() - t0)
            py, px = divmod(int(m[0].argmax()), S)
            hits[name].append(x0 <= px < x1 and y0 <= py < y1)
            if correct:
                hits_right[name].append(hits[name][-1])
            r = receipts(model, x, [j], percentile_boxes(m), cell, seed=i)[0]
            own[name].append(r.deletion_ratio)
            rnd[name].append(r.random_deletion_ratio)
    mean = lambda v: round(float(np.mean(v)), 4)  # noqa: E731
    return {
        "config": config,
        "backbone": cfg.model.backbone,
        "img_size": S,
        "train_seconds": round(train_s, 1),
        "test_accuracy": round(right / n, 4),
        "images": n,
        "pointing_game": {k: mean(v) for k, v in hits.items()},
        "pointing_game_answer_right": {k: mean(v) for k, v in hits_right.items()},
        "deletion_ratio": {k: mean(v) for k, v in own.items()},
        "random_deletion_ratio": {k: mean(v) for k, v in rnd.items()},
        "map_ms": {k: round(1e3 * float(np.median(v)), 3) for k, v in cost.items()},
    }


def receipts_cost() -> dict[str, Any]:
    """``cost_ratio`` per variant (bare forward, plain /explain, with the receipt, with
    each map method) against the bare forward, as ``bench.receipts`` measured them side
    by side through the service's own objects (demo and VGG-19 224 px): that benchmark
    runs the service, this one only the model."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "results" / "receipts.json"
    if not path.is_file():
        return {"cost_ratio": None, "cost_source": "run python -m bench.receipts first"}
    data = json.loads(path.read_text())
    return {
        "cost_ratio": {k: v.get("cost_ratio") for k, v in data["models"].items()},
        "cost_source": f"bench/results/receipts.json, written {data.get('written_at')}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="store")
    p.add_argument("--model", default="fashion-mnist@production")
    p.add_argument("--part-images", type=int, default=80, help="synthetic test images")
    args = p.parse_args(argv)
    use_torch_threads(2)
    loaded = ModelStore(args.store).load(args.model)
    fam = loaded.familiarity()
    if fam is None:
        raise SystemExit(f"{args.model} has no familiarity calibration: re-export it")
    model, prep = loaded.model.eval(), loaded.manifest.preprocessing
    cfg = load_config("fashion_mnist")
    splits = build_splits(cfg.data, cfg.train.seed)
    rng = np.random.default_rng(0)

    def sample(images: Any, n: int) -> list[Image.Image]:
        idx = rng.choice(len(images), min(n, len(images)), replace=False)
        return [images.load(int(i)) for i in sorted(idx)]

    bank = _outputs(model, prep, sample(splits.train, 5000))
    inside = _outputs(model, prep, sample(splits.test, 3000))
    outside = {k: _outputs(model, prep, v) for k, v in ood.all_sets().items()}
    classes = model.prototype_class_identity.argmax(dim=1)
    scorer = fam.scorer()

    def own_best(o: ProtoPNetOutput) -> torch.Tensor:
        s = model.similarity(o.min_distances)
        mine = classes[None, :] == o.logits.argmax(dim=1)[:, None]
        return s.masked_fill(~mine, -torch.inf).amax(dim=1)

    bank_v = torch.nn.functional.normalize(model.similarity(bank.min_distances), dim=1)

    def knn(o: ProtoPNetOutput) -> torch.Tensor:
        q = torch.nn.functional.normalize(model.similarity(o.min_distances), dim=1)
        return -torch.cdist(q, bank_v).topk(10, largest=False).values[:, -1]

    scores: dict[str, Callable[[ProtoPNetOutput], torch.Tensor]] = {
        "familiarity (latent-mahalanobis)": lambda o: scorer.scores(o.features),
        "top_logit": lambda o: o.logits.amax(dim=1),
        "top_probability": lambda o: o.logits.softmax(dim=1).amax(dim=1),
        "best_prototype_similarity": lambda o: model.similarity(o.min_distances).amax(dim=1),
        "answered_class_best_own_similarity": own_best,
        "knn_similarity_vectors": knn,
    }
    auroc: dict[str, dict[str, float]] = {}
    for name, fn in scores.items():
        i = fn(inside).double().numpy()
        per = {k: ood.auroc(i, fn(o).double().numpy()) for k, o in outside.items()}
        per["all"] = ood.auroc(
            i, np.concatenate([fn(o).double().numpy() for o in outside.values()])
        )
        auroc[name] = {k: round(v, 4) for k, v in per.items()}
        print(f"{name:36s} " + " ".join(f"{k}={v:.3f}" for k, v in per.items()))
    threshold = fam.threshold(1.0)
    fam_in = scorer.scores(inside.features).numpy()
    abstain_in = float((fam_in < threshold).mean())
    abstain_out = {
        k: round(float((scorer.scores(o.features).numpy() < threshold).mean()), 4)
        for k, o in outside.items()
    }
    print(f"abstention at the 1st percentile: in {abstain_in:.4f}; out {abstain_out}")
    # The score's cost on the request path: a batch of 16, beside the demo's forward of
    # it, and at CUB scale (200 classes, 128 channels, a 7 x 7 grid).
    x16 = torch.stack(
        [eval_transform(prep)(to_model_mode(im, prep)) for im in sample(splits.test, 16)]
    )
    with torch.no_grad():
        forward_s = p50([seconds_of(lambda: model.forward_full(x16)) for _ in range(50)])
        z16 = model.forward_full(x16).features
        score_s = p50([seconds_of(lambda: scorer.scores(z16)) for _ in range(50)])
        g = torch.Generator().manual_seed(0)
        big = familiarity.fit(
            torch.randn(2000, 128, generator=g), torch.arange(2000) % 200, 200,
            torch.randn(100, 128, generator=g),
        ).scorer()  # fmt: skip
        zc = torch.randn(16, 128, 7, 7, generator=g)
        cub_s = p50([seconds_of(lambda: big.scores(zc)) for _ in range(50)])
    cost = {
        "demo_forward_batch16_ms": round(forward_s * 1e3, 3),
        "demo_score_batch16_ms": round(score_s * 1e3, 3),
        "demo_score_over_forward": round(score_s / forward_s, 4),
        "cub_scale_score_batch16_ms": round(cub_s * 1e3, 3),
    }
    print(f"familiarity cost: {cost}")
    maps = {case: _maps_on_parts(config, args.part_images) for case, config in MAP_CASES.items()}
    for case, m in maps.items():
        print(f"maps, {case}: {m}")
    deep = maps["parts_224px_efficientnet_lite0"]  # the regime the goal is set in
    path = write_result(
        "faithfulness",
        {
            "device": device_name(torch.device("cpu")),
            "model": loaded.ref,
            "in_images": len(fam_in),
            "out_images": {k: int(o.logits.shape[0]) for k, o in outside.items()},
            "ood_auroc": auroc["familiarity (latent-mahalanobis)"]["all"],
            "ood_auroc_by_score": auroc,
            "calibrated_percentile": 1.0,
            "abstention_rate_in": round(abstain_in, 4),
            "abstention_rate_out": abstain_out,
            "familiarity_cost": cost,
            "maps": maps,
            "pointing_game": deep["pointing_game"],
            "deletion_ratio": deep["deletion_ratio"],
            "random_deletion_ratio": deep["random_deletion_ratio"],
            **receipts_cost(),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
