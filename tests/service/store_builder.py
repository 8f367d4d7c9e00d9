"""Build a real model store for the service tests: two small random-weight ProtoPNets
published through ``ModelStore.publish``, their prototypes projected onto latent patches
of real images (a miniature push), with visuals drawn from those images.

- "fashion": tiny_cnn, 10 Fashion-MNIST classes, 28 px greyscale, 2 prototypes per class,
  prototypes pushed onto training images of their class (needs the Debian package
  dataset-fashion-mnist; ``fashion_available()`` says whether it is there).
- "photo": small_cnn at 64 px RGB, letterboxed ("pad"), 3 classes (cat, person, coffee)
  from scikit-image's photographs, 3 prototypes each.

Because every prototype equals a latent patch of its source image, explaining that
source image gives that prototype the maximal similarity log(1/eps) at the recorded
cell: a check that needs no trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model_store import ModelStore, PrototypeRecord, PrototypeVisuals
from model_store.manifest import Interpretability
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.explain import PrototypeExplainer
from protopnet.model import ProtoPNet, create_model
from protopnet.preprocess import eval_transform
from protopnet.visualize import crop, draw_boxes, overlay
from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

# The test fixtures read Fashion-MNIST the way training does (tests may import training;
# the service itself never does).
FASHION_DIR = FASHION_MNIST_DIR
FASHION_CLASSES = FASHION_MNIST_CLASSES
PHOTO_CLASSES = ["cat", "person", "coffee"]


def fashion_available() -> bool:
    return (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists()


def fashion_test_images(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The first n test images (n, 28, 28) uint8 and labels."""
    imgs = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")[:n]
    return imgs, labels


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"cat": data.chelsea(), "person": data.astronaut(), "coffee": data.coffee()}


def _calibrate(model: ProtoPNet, prep: Preprocessing, images: list[Image.Image]) -> None:
    """Set the trunk's batch-norm statistics from real images (random weights otherwise
    give near-constant latent features, and every distance would be about 0)."""
    tf = eval_transform(prep)
    xs = torch.stack([tf(img) for img in images])  # (N, 3, S, S)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over this one pass
    model.train()
    with torch.no_grad():
        model.features(xs)
    model.eval()


def _push(
    model: ProtoPNet,
    prep: Preprocessing,
    sources: list[tuple[str, Image.Image, int]],  # (image id, picture, class) per prototype
    cells: list[tuple[int, int]],
) -> tuple[list[PrototypeRecord], dict[int, PrototypeVisuals], torch.Tensor]:
    """Set prototype j to the latent vector of its source at cells[j]; draw its visuals."""
    tf = eval_transform(prep)
    with torch.no_grad():
        for j, ((_, img, _), (h, w)) in enumerate(zip(sources, cells, strict=True)):
            z = model.conv_features(tf(img)[None])  # (1, D, H, W)
            model.prototype_vectors[j, :, 0, 0] = z[0, :, h, w]
    explainer = PrototypeExplainer(model, prep, max_map_side=None)
    P = model.num_prototypes
    records, visuals, maps = [], {}, []
    for j, (image_id, img, k) in enumerate(sources):
        rgb = img.convert("RGB")
        x = tf(img)[None]  # (1, 3, S, S)
        with torch.no_grad():
            maps.append(model.similarity(model.forward_full(x).distances)[0, j])  # (H', W')
        # Every prototype shown, so prototype j's map and box are among them.
        exp = explainer.attribute(x, [img.size], top_classes=1, top_prototypes=P)[0]
        i = exp.shown.index(j)
        full, box = exp.maps[i], exp.boxes[i]
        b = tuple(int(v) for v in box.tolist())
        arr = np.asarray(rgb)
        visuals[j] = PrototypeVisuals(
            patch=crop(arr, b),
            source=draw_boxes(arr, [b]),
            activation=overlay(arr, full.numpy()),
        )
        records.append(
            PrototypeRecord(
                index=j,
                class_index=k,
                source_image_id=image_id,
                source_size=img.size,
                patch_hw=cells[j],
                distance=0.0,
                box=b,  # type: ignore[arg-type]
            )
        )
    return records, visuals, torch.stack(maps)


# Made-up test figures, consistent with one confusion matrix (rows: true cat, person,
# coffee): [[3, 1, 0], [2, 2, 0], [0, 3, 1]], 12 images, 6 right.
PHOTO_METRICS = {
    "test_accuracy": 0.5,
    "test_balanced_accuracy": 0.5,
    "test_per_class": [
        {"label": "cat", "images": 4, "recall": 0.75, "precision": 0.6},
        {"label": "person", "images": 4, "recall": 0.5, "precision": 1 / 3},
        {"label": "coffee", "images": 4, "recall": 0.25, "precision": 1.0},
    ],
    "test_confusion": [[3, 1, 0], [2, 2, 0], [0, 3, 1]],
}


def build_photo_model(
    store: ModelStore,
    name: str = "photo",
    seed: int = 1,
    interpretability: Interpretability | None = None,
) -> None:
    torch.manual_seed(seed)
    cfg = ProtoPNetConfig(
        backbone="small_cnn",
        num_classes=3,
        prototypes_per_class=3,
        prototype_depth=32,
        img_size=64,
        add_on="regular",
    )
    prep = Preprocessing(img_size=64, resize="pad")
    model = create_model(cfg).eval()
    pics = photos()
    sources, cells = [], []
    grid = 16  # small_cnn at 64 px
    for k, cls in enumerate(PHOTO_CLASSES):
        img = Image.fromarray(pics[cls])
        for c in [(5, 6), (8, 8), (10, 11)]:
            sources.append((cls, img, k))
            cells.append((min(c[0], grid - 1), min(c[1], grid - 1)))
    _calibrate(model, prep, [Image.fromarray(v) for v in pics.values()])
    records, visuals, maps = _push(model, prep, sources, cells)
    store.publish(
        name,
        model,
        prep,
        PHOTO_CLASSES,
        records,
        visuals=visuals,
        activation_maps=maps,
        metrics=PHOTO_METRICS,
        training_config={"note": "random weights, prototypes pushed onto skimage photos"},
        interpretability=interpretability,
    )


def build_fashion_model(store: ModelStore, name: str = "fashion", seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn",
        num_classes=10,
        prototypes_per_class=2,
        prototype_depth=16,
        img_size=28,
        add_on="regular",
    )
    prep = Preprocessing(img_size=28, mean=(0.5,) * 3, std=(0.5,) * 3, grayscale=True)
    model = create_model(cfg).eval()
    imgs = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:500]
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:500]
    sources, cells = [], []
    for k in range(10):
        idx = np.nonzero(labels == k)[0][:2]
        for n, i in enumerate(idx):
            sources.append((f"train/{int(i)}", Image.fromarray(imgs[i], "L"), k))
            cells.append((5 + 3 * n, 7))  # 14 x 14 grid (tiny_cnn, stride 2)
    _calibrate(model, prep, [Image.fromarray(a, "L") for a in imgs[:200]])
    records, visuals, maps = _push(model, prep, sources, cells)
    store.publish(
        name,
        model,
        prep,
        FASHION_CLASSES,
        records,
        visuals=visuals,
        activation_maps=maps,
        metrics={"val_accuracy": 0.1},
    )


def build_store(root: Path) -> ModelStore:
    store = ModelStore(root)
    build_photo_model(store)
    if fashion_available():
        build_fashion_model(store)
    return store
