"""The synthetic "parts" dataset: each class is a distinctive small part on clutter.

Every image is a noisy grey background with ``clutter`` grey distractor shapes and exactly
one coloured part (a shape in a colour; the pair defines the class) at a random
position. The part's box is known, so explanations can be checked against it: a good
prototype should point at the part, not at the clutter.

With ``confound_mark``, every training image also carries a small class-coloured square
(a confound, like a watermark or a ruler; test images have none): a model may learn the
mark instead of the part, and revision can remove the prototypes that did.

Deterministic from the seed: image i of a split depends only on (seed, split, i), so a
test regenerates the same images in any order and on any machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.config import SyntheticConfig

SHAPES = ("square", "ring", "cross", "diamond", "triangle", "x", "bars", "dot")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 30),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
    "purple": (130, 50, 200),
}
_SPLIT_IDS = {"train": 0, "test": 1}


def class_part(k: int) -> tuple[str, str]:
    """(shape, colour) of class k; distinct for k < len(SHAPES) * len(COLORS)."""
    n_s, n_c = len(SHAPES), len(COLORS)
    if not 0 <= k < n_s * n_c:
        raise ValueError(f"class {k} outside 0..{n_s * n_c - 1}")
    shape = SHAPES[k % n_s]
    colour = list(COLORS)[(k + k // n_s) % n_c]
    return shape, colour


def class_names(num_classes: int) -> list[str]:
    return [" ".join(reversed(class_part(k))) for k in range(num_classes)]


def shape_mask(shape: str, s: int) -> np.ndarray:
    """(s, s) bool mask of ``shape`` filling an s x s square (never outside it)."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    c = (s - 1) / 2
    t = max(1.0, s / 4)  # stroke width
    d = np.hypot(x - c, y - c)
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "ring":
        return (d <= s / 2) & (d >= s / 2 - t)
    if shape == "cross":
        return (np.abs(x - c) < t / 2 + 0.25) | (np.abs(y - c) < t / 2 + 0.25)
    if shape == "diamond":
        return np.abs(x - c) + np.abs(y - c) <= s / 2
    if shape == "triangle":
        return np.abs(x - c) <= (y + 1) / 2
    if shape == "x":
        return (np.abs(x - y) <= t / 2) | (np.abs(x + y - (s - 1)) <= t / 2)
    if shape == "bars":
        return (y < t) | (y >= s - t)
    if shape == "dot":
        return d <= s / 3
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def draw_shape(
    canvas: np.ndarray, shape: str, x: int, y: int, s: int, color: tuple[int, int, int]
) -> None:
    """Paint ``shape`` into the s x s square whose top-left corner is (x, y), in place;
    the parts of the square outside the canvas are clipped."""
    mask = shape_mask(shape, s)
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, W), min(y + s, H)
    if x1 <= x0 or y1 <= y0:
        return
    region = canvas[y0:y1, x0:x1]
    region[mask[y0 - y : y1 - y, x0 - x : x1 - x]] = np.asarray(color, dtype=canvas.dtype)


def make_image(
    cfg: SyntheticConfig, split: str, index: int, label: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One (S, S, 3) uint8 image of class ``label`` and its part box (x0, y0, x1, y1)."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
    S, s = cfg.image_size, cfg.part_size
    base = rng.integers(70, 150)
    img = base + rng.normal(0, 12, size=(S, S, 1)).repeat(3, axis=2)  # grey noise texture
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(cfg.clutter):  # grey distractors: same shapes, no colour
        grey = int(rng.integers(20, 235))
        size = int(rng.integers(max(3, s // 2), s * 2))
        x, y = (int(v) for v in rng.integers(-size // 2, S - size // 2, size=2))
        draw_shape(img, SHAPES[int(rng.integers(len(SHAPES)))], x, y, size, (grey,) * 3)
    shape, colour = class_part(label)
    x0, y0 = (int(v) for v in rng.integers(0, S - s + 1, size=2))
    draw_shape(img, shape, x0, y0, s, COLORS[colour])
    c = cfg.confound_mark
    if c and split == "train":  # the confound: drawn after the part, so it is never hidden
        mx, my = (int(v) for v in rng.integers(0, S - c + 1, size=2))
        draw_shape(img, "square", mx, my, c, mark_colour(label))
    return img, (x0, y0, x0 + s, y0 + s)


def mark_colour(k: int) -> tuple[int, int, int]:
    """The confound's colour for class k: half the palette away from the parts' colours
    of the first classes (distinct from every part colour for up to 4 classes)."""
    names = list(COLORS)
    return COLORS[names[(k + len(names) // 2) % len(names)]]


def make_split(cfg: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images of a split: (N, S, S, 3) uint8, labels (N,), part boxes (N, 4).

    Classes interleave (image i has class i % K), so any prefix is balanced.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(_SPLIT_IDS)}")
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    n = per_class * cfg.num_classes
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels = np.arange(n) % cfg.num_classes
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        images[i], boxes[i] = make_image(cfg, split, i, int(labels[i]))
    return images, labels.astype(np.int64), boxes


def write_image_folder(cfg: SyntheticConfig, out: Path) -> Path:
    """Write the dataset as an ImageFolder tree (train/ and test/) plus ``parts.json``.

    parts.json maps each image's path (relative to ``out``) to its class and part box,
    for tools that check explanations against the part.
    """
    import json

    from PIL import Image

    out = Path(out)
    names = class_names(cfg.num_classes)
    parts: dict[str, dict[str, object]] = {}
    for split in ("train", "test"):
        images, labels, boxes = make_split(cfg, split)
        for i in range(len(images)):
            rel = f"{split}/{names[labels[i]].replace(' ', '_')}/{i:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(out / rel)
            parts[rel] = {"class": names[labels[i]], "box": [int(v) for v in boxes[i]]}
    (out / "parts.json").write_text(json.dumps(parts, indent=1))
    return out
