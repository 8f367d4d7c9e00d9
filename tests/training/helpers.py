"""A tiny model and images for the training tests (push, prune, the GPU checks)."""

from __future__ import annotations

import numpy as np
import torch

from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.model import ProtoPNet, create_model
from training.data import ArrayImages

PREP = Preprocessing(img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def model_and_images(
    num_classes: int = 3, proto_size: tuple[int, int] = (2, 2), seed: int = 0
) -> tuple[ProtoPNet, ArrayImages]:
    torch.manual_seed(seed)
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn",
        num_classes=num_classes,
        prototypes_per_class=2,
        prototype_depth=8,
        img_size=16,
        prototype_size=proto_size,
    )
    model = create_model(cfg).eval()
    rng = np.random.default_rng(seed)
    # Sources larger than the model input and not square: boxes live in source pixels.
    images = rng.integers(0, 256, size=(4 * num_classes, 20, 26, 3), dtype=np.uint8)
    labels = np.arange(len(images)) % num_classes
    return model, ArrayImages(images, labels, [f"c{k}" for k in range(num_classes)], "rand")
