"""Training-time transforms: online augmentation plus the artifact's own normalisation.

The resize and normalisation steps come from ``protopnet.preprocess`` and the model's
``Preprocessing``, so the stored preprocessing is the single source of truth; only the
augmentation sits between them. Push, validation and test use ``eval_transform``.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from protopnet.config import Preprocessing
from protopnet.preprocess import normalize_steps, resize_geometry, to_model_mode
from training.config import AugmentConfig


def augmentation_steps(aug: AugmentConfig) -> list[v2.Transform]:
    """Rotation (+-r degrees), perspective skew, shear and horizontal flip, on PIL images."""
    if not aug.enabled:
        return []
    steps: list[v2.Transform] = []
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation))
    if aug.perspective > 0 and aug.perspective_p > 0:
        steps.append(v2.RandomPerspective(aug.perspective, p=aug.perspective_p))
    if aug.shear > 0:
        steps.append(v2.RandomAffine(degrees=0, shear=(-aug.shear, aug.shear) * 2))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return steps


class TrainTransform:
    """PIL image (any mode) -> augmented, normalised (3, S, S) float tensor.

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, prep: Preprocessing, aug: AugmentConfig):
        self.prep = prep
        self.pipeline = v2.Compose(
            [*resize_geometry(prep), *augmentation_steps(aug), *normalize_steps(prep)]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.pipeline(to_model_mode(img, self.prep))
