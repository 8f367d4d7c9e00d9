"""Pruning (the paper's section 2.6): remove prototypes whose k nearest training patches
(one per image, any class) hold fewer than tau of their own class, then retrain the
last layer. The pruned prototypes take their last-layer columns with them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_store import PrototypeRecord
from protopnet.config import Preprocessing
from protopnet.errors import ProtoPNetError
from protopnet.model import ProtoPNet
from protopnet.preprocess import eval_transform
from protopnet.prune import KNearestImages, prototypes_to_prune
from training.data import ImageSet, TransformedImages


class PruneError(ProtoPNetError):
    """Pruning that cannot be applied."""


@dataclass
class PruneResult:
    pruned: list[int]  # indices in the model before pruning
    nearest_labels: torch.Tensor  # (P, k) classes of each prototype's k nearest images
    classes_left_without_prototypes: list[int]


@torch.inference_mode()
def nearest_image_labels(
    model: ProtoPNet,
    images: ImageSet,
    preprocessing: Preprocessing,
    k: int = 6,
    batch_size: int = 100,
    num_workers: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """(P, k) labels of each prototype's k nearest training images (unaugmented)."""
    device = device or model.prototype_vectors.device
    loader = DataLoader(
        TransformedImages(images, eval_transform(preprocessing)),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    knn = KNearestImages(model.num_prototypes, k)
    was_training = model.training
    model.eval()
    try:
        for x, y, _ in tqdm(loader, desc="prune", leave=False, disable=not progress):
            _, min_d = model(x.to(device))  # (B, P)
            knn.update(min_d, y)
    finally:
        model.train(was_training)
    return knn.labels


def prune(
    model: ProtoPNet,
    images: ImageSet,
    preprocessing: Preprocessing,
    k: int = 6,
    tau: int = 3,
    batch_size: int = 100,
    num_workers: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
) -> PruneResult:
    """Find and remove (in place) the prototypes the rule rejects."""
    labels = nearest_image_labels(
        model, images, preprocessing, k, batch_size, num_workers, device, progress
    )
    classes = model.prototype_classes.cpu()
    drop = prototypes_to_prune(labels, classes, tau)
    if len(drop) == model.num_prototypes:
        raise PruneError(
            f"pruning (k={k}, tau={tau}) would remove all {len(drop)} prototypes: no "
            "prototype has tau own-class images among its k nearest; the model is unchanged"
        )
    if drop:
        model.prune_prototypes(drop)
    left = set(model.prototype_classes.cpu().tolist())
    empty = [c for c in range(model.num_classes) if c not in left]
    return PruneResult(pruned=drop, nearest_labels=labels, classes_left_without_prototypes=empty)


def reindex_records(
    records: list[PrototypeRecord], maps: torch.Tensor | None, pruned: list[int]
) -> tuple[list[PrototypeRecord], torch.Tensor | None]:
    """Push records and self-activation maps of the prototypes that remain, renumbered
    to their new rows."""
    drop = set(pruned)
    keep = [j for j in range(len(records)) if j not in drop]
    new = [records[j].model_copy(update={"index": n}) for n, j in enumerate(keep)]
    return new, (maps[keep] if maps is not None else None)
