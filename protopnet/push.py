"""Prototype projection ("push") math: the exact nearest latent patch, streamed over batches.

Pure tensor code shared by training's push and the model store's import visualisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NearestPatches:
    """For each prototype j: its nearest patch over everything seen so far."""

    distance: torch.Tensor  # (P,) squared L2; inf if no eligible image was seen
    image_index: torch.Tensor  # (P,) int64 dataset index of the source image; -1 if none
    patch_hw: torch.Tensor  # (P, 2) int64 latent cell (h, w) of the patch's top-left
    vector: torch.Tensor  # (P, D, h1, w1) the latent patch itself
    distance_map: torch.Tensor  # (P, H', W') prototype j's distances over its source image

    def missing(self) -> list[int]:
        """Prototypes that found no eligible patch (e.g. a class with no image)."""
        return torch.nonzero(self.image_index < 0).flatten().tolist()


class NearestPatchSearch:
    """Streaming exact nearest-patch search, vectorised over prototypes.

    Class-specific (the paper's push): prototype j only considers images of its own
    class. ``update`` takes one batch's distance maps and latent features.
    """

    def __init__(
        self,
        prototype_classes: torch.Tensor,
        prototype_shape: tuple[int, int, int],
        class_specific: bool = True,
    ):
        P = prototype_classes.shape[0]
        D, h1, w1 = prototype_shape
        self.classes = prototype_classes  # (P,)
        self.class_specific = class_specific
        self.h1, self.w1 = h1, w1
        self.P, self.D = P, D
        self.best: NearestPatches | None = None

    def _init(self, Hp: int, Wp: int, dev: torch.device) -> NearestPatches:
        P, D, h1, w1 = self.P, self.D, self.h1, self.w1
        return NearestPatches(
            distance=torch.full((P,), float("inf"), device=dev),
            image_index=torch.full((P,), -1, dtype=torch.long, device=dev),
            patch_hw=torch.zeros((P, 2), dtype=torch.long, device=dev),
            vector=torch.zeros((P, D, h1, w1), device=dev),
            distance_map=torch.full((P, Hp, Wp), float("inf"), device=dev),
        )

    @torch.no_grad()
    def update(
        self,
        distances: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        image_indices: torch.Tensor,
        eligible: torch.Tensor | None = None,
    ) -> None:
        """distances (B, P, H', W'), features (B, D, H, W), labels (B,), image_indices (B,).

        ``eligible`` (B, P), when given, says which images each prototype may take
        instead of the class rule (e.g. only the image an earlier search chose).
        """
        B, P, Hp, Wp = distances.shape
        if self.best is None:
            self.best = self._init(Hp, Wp, distances.device)
        d = distances.float()
        if eligible is None and self.class_specific:
            eligible = labels.view(B, 1) == self.classes.view(1, P)  # (B, P)
        if eligible is not None:
            d = d.masked_fill(~eligible.view(B, P, 1, 1), float("inf"))
        flat = d.permute(1, 0, 2, 3).reshape(P, -1)  # (P, B * H' * W')
        dist, arg = flat.min(dim=1)  # (P,)
        better = dist < self.best.distance
        if not bool(better.any()):
            return
        j = torch.nonzero(better).flatten()  # prototypes improved by this batch
        b, rem = arg[j] // (Hp * Wp), arg[j] % (Hp * Wp)
        h, w = rem // Wp, rem % Wp
        # Gather the (D, h1, w1) latent patches at (b, :, h:h+h1, w:w+w1).
        dh = torch.arange(self.h1, device=d.device)
        dw = torch.arange(self.w1, device=d.device)
        rows = (h.view(-1, 1) + dh.view(1, -1)).view(-1, 1, self.h1, 1)
        cols = (w.view(-1, 1) + dw.view(1, -1)).view(-1, 1, 1, self.w1)
        z = features[b]  # (J, D, H, W)
        D = z.shape[1]
        ch = torch.arange(D, device=d.device).view(1, D, 1, 1)
        patch = z[torch.arange(len(j), device=d.device).view(-1, 1, 1, 1), ch, rows, cols]
        self.best.distance[j] = dist[j]
        self.best.image_index[j] = image_indices.to(d.device)[b]
        self.best.patch_hw[j] = torch.stack([h, w], dim=1)
        self.best.vector[j] = patch.float()
        self.best.distance_map[j] = distances[b, j].float()

    def result(self) -> NearestPatches:
        if self.best is None:
            raise ValueError("push saw no images: the dataset is empty")
        return self.best
