"""The pruning rule (paper section 2.6): drop prototypes whose nearest patches are mostly
from other classes."""

from __future__ import annotations

import torch


def prototypes_to_prune(
    nearest_labels: torch.Tensor, prototype_classes: torch.Tensor, tau: int = 3
) -> list[int]:
    """Indices of prototypes with fewer than ``tau`` own-class images among their k nearest.

    nearest_labels: (P, k) class of the image of each of a prototype's k nearest training
    patches (one patch per image); prototype_classes: (P,).
    """
    own = (nearest_labels == prototype_classes.view(-1, 1)).sum(dim=1)  # (P,)
    return torch.nonzero(own < tau).flatten().tolist()


class KNearestImages:
    """Streaming k nearest training images per prototype (one patch per image, any class)."""

    def __init__(self, num_prototypes: int, k: int = 6):
        self.k = k
        self.distance = torch.full((num_prototypes, 0), float("inf"))  # (P, <=k)
        self.labels = torch.zeros((num_prototypes, 0), dtype=torch.long)  # (P, <=k)

    @torch.no_grad()
    def update(self, min_distances: torch.Tensor, labels: torch.Tensor) -> None:
        """min_distances (B, P): each image's closest-patch distance; labels (B,)."""
        d = torch.cat([self.distance, min_distances.float().cpu().t()], dim=1)  # (P, k + B)
        lab = torch.cat([self.labels, labels.cpu().view(1, -1).expand(d.shape[0], -1)], dim=1)
        k = min(self.k, d.shape[1])
        # A stable sort, not topk (whose order among equals is unspecified): at equal
        # distances the earlier image wins, since kept ones come first, so the same
        # images give the same prune in any batch size.
        d, idx = d.sort(dim=1, stable=True)
        self.distance, idx = d[:, :k], idx[:, :k]
        self.labels = lab.gather(1, idx)
