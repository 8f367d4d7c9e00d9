"""Drumond et al.'s few-shot experiment, reproduced in kind.

    python -m bench.drumond                 # 10 class subsets for N = 2, 5, 10, both datasets
    python -m bench.drumond --subsets 2     # a quick look

The paper (NIPS 2017 TIML workshop, Table 1) embeds Omniglot with a frozen ImageNet
Inception V3 and compares, 5-shot N-way over 10 random class subsets: its soft-max
prototype model with an L1 or an L2 penalty on w, one prototype per class (class means,
nearest by Euclidean distance, as prototypical networks), and a soft-max classifier with
L2. Omniglot cannot be fetched here, so the embeddings are the frozen EfficientNet-Lite0
that ships offline (1280-d, average-pooled), of Fashion-MNIST's test images and
scikit-learn's 8 x 8 digits, both upsampled to ``--img-size``. Hyper-parameters (the
penalty weight and the number of prototypes; C for the soft-max classifier) are chosen
by cross-validation on the 5 shots, as in the paper. Every image of a chosen class that
is not one of its shots is a test image (up to ``--pool`` per class).

On these embeddings squared distances run to thousands, so the paper's
q = softmax(-||x - p||^2 / 2) is nearly one-hot and the model is a nearest-prototype rule
(the penalty then changes nothing). The model is therefore also run on embeddings divided
by a scale taken from the shots (``*_scaled``: the median ||x - x'||^2 / 2 becomes 1),
where q is soft.

Writes bench/results/drumond.json: mean and standard deviation of test accuracy per
dataset, N and method, beside the paper's figures.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import numpy as np
import torch

from bench.common import device_name, write_result
from protopnet.backbones import create_backbone, get_backbone_spec
from protopnet.drumond import Penalty, fit_head

# The paper's Table 1 (Omniglot, Inception V3): N -> accuracy.
PAPER = {
    "l1": {2: 0.80, 5: 0.81, 20: 0.52},
    "l2": {2: 0.91, 5: 0.90, 20: 0.74},
    "class_means": {2: 0.93, 5: 0.91, 20: 0.77},
    "softmax": {2: 0.79, 5: 0.96, 20: 0.89},
}
SHOTS = 5
ALPHAS = (1e-3, 1e-2, 1e-1)
PROTOTYPES_PER_CLASS = (1, 2, 3)
SOFTMAX_C = (0.01, 0.1, 1.0, 10.0)


def load_images(dataset: str, pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``pool`` greyscale images per class as uint8 (n, h, w), and their labels."""
    if dataset == "fashion_mnist":
        from training.data import fashion_mnist_splits

        _, test = fashion_mnist_splits(None, download=False)
        x, y = test.arrays, np.asarray(test.labels)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = (d.images * (255 / 16)).round().astype(np.uint8), d.target
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:pool] for c in np.unique(y)])
    return np.asarray(x)[keep], np.asarray(y)[keep]


@torch.no_grad()
def embed(images: np.ndarray, img_size: int, batch: int = 64) -> torch.Tensor:
    """Frozen EfficientNet-Lite0 embeddings (n, 1280) of greyscale uint8 images."""
    spec = get_backbone_spec("efficientnet_lite0")
    trunk = create_backbone("efficientnet_lite0", "imagenet", img_size).eval()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).float().div(255).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear")
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        out.append(trunk(x).mean(dim=(2, 3)))
    return torch.cat(out)


def _folds(y: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds, each holding out the same number of shots of every class."""
    per_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    folds = []
    for f in range(k):
        held = np.concatenate([idx[f::k] for idx in per_class])
        folds.append((np.setdiff1d(np.arange(len(y)), held), held))
    return folds


def _head_accuracy(
    xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, n: int, j: int,
    alpha: float, penalty: Penalty, seed: int,
) -> float:  # fmt: skip
    head = fit_head(xtr, ytr, n, j, alpha, penalty, steps=200, seed=seed)
    with torch.no_grad():
        return float((head(xte)[0].argmax(1) == yte).float().mean())


def _softmax_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, c: float) -> float:  # fmt: skip
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def episode(
    emb: torch.Tensor, labels: np.ndarray, classes: np.ndarray, seed: int, folds: int = 3
) -> dict[str, Any]:
    """One 5-shot N-way episode on ``classes``: each method's test accuracy and the
    hyper-parameters cross-validation chose for it."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:SHOTS])
        test.append(idx[SHOTS:])
    tr, te = np.concatenate(train), np.concatenate(test)
    remap = {int(c): i for i, c in enumerate(classes)}
    ytr = np.array([remap[int(v)] for v in labels[tr]])
    yte = np.array([remap[int(v)] for v in labels[te]])
    xtr, xte = emb[tr], emb[te]
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    n = len(classes)
    split = _folds(ytr, folds)
    out: dict[str, Any] = {}
    # The paper's q on raw embeddings is nearly one-hot here (squared distances run to
    # thousands), so the model also runs on embeddings divided by a scale, taken from the
    # shots, that brings the median ||x - x'||^2 / 2 to 1: q is then soft.
    d2 = torch.cdist(xtr, xtr) ** 2
    scale = float(torch.sqrt(d2[d2 > 0].median() / 2))
    for penalty, s in itertools.product(("l1", "l2"), (1.0, scale)):
        method = penalty if s == 1.0 else f"{penalty}_scaled"
        xtr_s, xte_s = xtr / s, xte / s
        best, best_cv = None, -1.0
        for alpha, per in itertools.product(ALPHAS, PROTOTYPES_PER_CLASS):
            j = n * per
            if j > (len(ytr) * (folds - 1)) // folds:
                continue
            cv = np.mean(
                [
                    _head_accuracy(
                        xtr_s[a], ytr_t[a], xtr_s[b], ytr_t[b], n, j, alpha, penalty, seed
                    )  # type: ignore[arg-type]
                    for a, b in split
                ]
            )
            if cv > best_cv:
                best, best_cv = (alpha, j), float(cv)
        assert best is not None
        acc = _head_accuracy(xtr_s, ytr_t, xte_s, yte_t, n, best[1], best[0], penalty, seed)  # type: ignore[arg-type]
        out[method] = {"acc": acc, "alpha": best[0], "num_prototypes": best[1], "scale": s}
    means = torch.stack([xtr[ytr_t == c].mean(0) for c in range(n)])
    out["class_means"] = {"acc": float((torch.cdist(xte, means).argmin(1) == yte_t).float().mean())}
    xtr_n, xte_n = xtr.numpy(), xte.numpy()
    cvs = {
        c: np.mean([_softmax_accuracy(xtr_n[a], ytr[a], xtr_n[b], ytr[b], c) for a, b in split])
        for c in SOFTMAX_C
    }
    c_best = max(cvs, key=lambda c: cvs[c])
    out["softmax"] = {"acc": _softmax_accuracy(xtr_n, ytr, xte_n, yte, c_best), "C": c_best}
    return out


def summarise(episodes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for method in ("l1", "l2", "l1_scaled", "l2_scaled", "class_means", "softmax"):
        accs = [e[method]["acc"] for e in episodes]
        out[method] = {"mean": float(np.mean(accs)), "std": float(np.std(accs))}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=10)
    ap.add_argument("--ways", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--datasets", nargs="+", default=["fashion_mnist", "digits"])
    ap.add_argument("--pool", type=int, default=100, help="images per class")
    ap.add_argument("--img-size", type=int, default=96)
    args = ap.parse_args(argv)
    record: dict[str, Any] = {"device": device_name(), "paper_omniglot": PAPER, "datasets": {}}
    record["settings"] = {
        "shots": SHOTS, "subsets": args.subsets, "pool_per_class": args.pool,
        "img_size": args.img_size, "alphas": ALPHAS, "prototypes_per_class": PROTOTYPES_PER_CLASS,
        "softmax_C": SOFTMAX_C, "trunk": "efficientnet_lite0 (ImageNet, frozen, average-pooled)",
    }  # fmt: skip
    for dataset in args.datasets:
        t0 = time.perf_counter()
        images, labels = load_images(dataset, args.pool, seed=0)
        emb = embed(images, args.img_size)
        # How peaked q is on these embeddings: squared distances between images run to
        # hundreds, so -||x - p||^2 / 2 makes q close to one-hot.
        d2 = torch.cdist(emb[:200], emb[:200]) ** 2
        per_n: dict[str, Any] = {"embed_s": round(time.perf_counter() - t0, 1)}
        per_n["median_squared_distance"] = float(d2[d2 > 0].median())
        all_classes = np.unique(labels)
        for n in args.ways:
            rng = np.random.default_rng(1000 + n)
            eps = []
            for s in range(args.subsets):
                classes = np.sort(rng.choice(all_classes, size=n, replace=False))
                eps.append(episode(emb, labels, classes, seed=s))
            per_n[str(n)] = {"summary": summarise(eps), "episodes": eps}
            print(dataset, f"{n}-way", {k: round(v["mean"], 3) for k, v in summarise(eps).items()})
        per_n["total_s"] = round(time.perf_counter() - t0, 1)
        record["datasets"][dataset] = per_n
    write_result("drumond", record)
    return record


if __name__ == "__main__":
    main()
