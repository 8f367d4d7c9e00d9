"""Images unlike Fashion-MNIST, available offline: scikit-learn's handwritten digits,
random crops of scikit-image's photographs, scikit-image's LFW faces and pixel noise.
Seeded, as PIL greyscale images (the service and the model convert them as any upload)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def digits(n: int = 300) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    # 8 x 8, ink 0..16 on a dark ground, like Fashion-MNIST's light-on-dark.
    imgs = load_digits().images[:n]
    return [Image.fromarray((d / 16 * 255).astype(np.uint8), "L") for d in imgs]


def _photographs() -> list[np.ndarray]:
    from skimage import data

    grey = [data.camera(), data.coins(), data.moon(), data.page(), data.text(), data.clock()]
    grey += [data.grass(), data.gravel(), data.brick()]
    colour = [data.rocket(), data.astronaut(), data.chelsea(), data.coffee()]
    colour += [data.hubble_deep_field(), data.immunohistochemistry()]
    return grey + [c.mean(axis=2).astype(np.uint8) for c in colour]


def photo_crops(n: int = 300, seed: int = 0) -> list[Image.Image]:
    """Square crops of random size (28 px to half the photograph) at random places."""
    rng = np.random.default_rng(seed)
    photos = _photographs()
    out = []
    for k in range(n):
        p = photos[k % len(photos)]
        H, W = p.shape[:2]
        s = int(rng.integers(28, min(H, W) // 2))
        y, x = int(rng.integers(0, H - s)), int(rng.integers(0, W - s))
        out.append(Image.fromarray(np.ascontiguousarray(p[y : y + s, x : x + s]), "L"))
    return out


def faces() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray((f * 255).astype(np.uint8), "L") for f in data.lfw_subset()]


def noise(n: int = 200, seed: int = 0, size: int = 28) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(n)]


def all_sets() -> dict[str, list[Image.Image]]:
    return {"digits": digits(), "photo_crops": photo_crops(), "faces": faces(), "noise": noise()}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of telling ``inside`` (scored higher) from ``outside``."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))
