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
