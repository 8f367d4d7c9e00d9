"""The training objective's terms (the paper's section 2.2 and the reference's extras)."""

from __future__ import annotations

import torch


def cluster_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of the image's own class.

    min_distances: (B, P); labels: (B,); identity: (P, K) one-hot. Images of a class left
    without prototypes (all pruned) contribute nothing, rather than a huge constant.
    """
    own = identity[:, labels].t().bool()  # (B, P)
    inf = torch.finfo(min_distances.dtype).max
    per_image = min_distances.masked_fill(~own, inf).amin(dim=1)
    has_own = own.any(dim=1)
    if not bool(has_own.any()):
        return min_distances.new_zeros(())
    return per_image[has_own].mean()


def separation_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of another class.

    Enters the loss with a negative coefficient: other classes' prototypes pushed away.
    Images whose classes own every prototype contribute nothing.
    """
    other = ~identity[:, labels].t().bool()  # (B, P)
    inf = torch.finfo(min_distances.dtype).max
    per_image = min_distances.masked_fill(~other, inf).amin(dim=1)
    has_other = other.any(dim=1)
    if not bool(has_other.any()):
        return min_distances.new_zeros(())
    return per_image[has_other].mean()


def average_separation_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    """Mean over images of the mean distance to other classes' prototypes (logged only)."""
    other = (~identity[:, labels].t().bool()).float()  # (B, P)
    count = other.sum(dim=1).clamp(min=1)
    return ((min_distances * other).sum(dim=1) / count).mean()


def last_layer_l1(weight: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """L1 norm of the last layer's wrong-class connections. weight: (K, P)."""
    return (weight * (1 - identity.t())).abs().sum()
