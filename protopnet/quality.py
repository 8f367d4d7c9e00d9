"""How good a model's prototypes are, measured offline (at export) for the person who signs
the model off.

- **Duplicates**: prototypes projected onto the same training patch (the same source
  image and latent cell) or onto identical vectors; only the first of each group counts
  as unique.
- **Background**: a prototype whose source patch is nearly flat (the standard deviation
  of its luminance below ``BACKGROUND_STD``, 6 % of the pixel range): a corner of black
  background, a blank sky, an empty scanner bed; or, where the data has part or object
  boxes, whose source box does not overlap its source image's (``boxes_overlap``): it sits
  off the object, on clutter or a confound.
- **Sparsity**: the share of the last layer's weight mass (sum of |w|) on each class's own
  prototypes; 1 when every class's logit comes from its own prototypes alone.
- **Stability** (EvalProtoPNet, Huang et al. ICCV 2023): on images of its class, whether
  a prototype's box says the same after Gaussian noise (std ``NOISE_STD`` on the
  normalised input): with part keypoints, whether the same visible parts are inside the
  box both times, else whether the box's latent cell is the same. Each prototype's share
  of images; the model's figure is the mean over prototypes.
- **Consistency** (EvalProtoPNet), where part keypoints exist (CUB's 15 parts; the
  synthetic set's one part, its centre): the share of prototypes whose most frequent
  part is inside their box on at least ``CONSISTENT_SHARE`` of their class's images.

A prototype's box on an image is the one the service draws: the 95th-percentile box of
its upsampled similarity map.

Shapes: N images, S input side, P prototypes, K classes, (H', W') latent grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protopnet.explain import percentile_boxes, upsample_maps
from protopnet.model import ProtoPNet

# Of the 0..1 pixel range: below it a patch is flat background. On the demo model the
# patches' luminance std runs 0 (20 patches) to 0.025, then 0.038-0.049 (6 patches of
# black with a few grey pixels: background to the eye), then 0.074 and up (garment).
BACKGROUND_STD = 0.06
NOISE_STD = 0.2  # EvalProtoPNet's noise on the normalised input, for stability
CONSISTENT_SHARE = 0.8  # EvalProtoPNet's threshold for a consistent prototype


def duplicate_of(
    sources: Sequence[tuple[str | None, tuple[int, int] | None]], vectors: torch.Tensor
) -> list[int | None]:
    """For each prototype, the lowest index of an earlier prototype with the same source
    patch ((source image id, latent cell), both known) or the same vector (exactly, as
    push leaves two prototypes projected onto one patch), else None. vectors: (P, ...)."""
    flat = vectors.detach().flatten(1).cpu()
    out: list[int | None] = []
    seen: dict[tuple[str, tuple[int, int]], int] = {}
    for j, (image, cell) in enumerate(sources):
        first = None
        if image is not None and cell is not None:
            first = seen.setdefault((image, tuple(cell)), j)  # type: ignore[arg-type]
            first = None if first == j else first
        if first is None:
            same = torch.nonzero((flat[:j] == flat[j]).all(dim=1)).flatten()
            first = int(same[0]) if len(same) else None
        out.append(first)
    return out


def patch_flatness(patch: np.ndarray) -> float:
    """(H, W, 3) uint8 patch -> the standard deviation of its luminance, in 0..1."""
    rgb = patch.astype(np.float64) / 255.0
    lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return float(lum.std())


def boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether boxes (x0, y0, x1, y1), end exclusive, share any pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def last_layer_sparsity(weight: torch.Tensor, classes: torch.Tensor) -> float:
    """weight: (K, P) last layer; classes: (P,) each prototype's class. The share of
    sum |w| that sits on (class k, prototype of class k) entries."""
    w = weight.detach().abs().double().cpu()
    own = w[classes.cpu().long(), torch.arange(w.shape[1])].sum()
    total = w.sum()
    return float(own / total) if total > 0 else 1.0


@dataclass(frozen=True)
class BoxAgreement:
    """Per prototype, over the images of its class it was measured on."""

    images: list[int]  # (P,) how many images of its class
    stability: list[float | None]  # (P,) share of images whose answer survives the noise
    part_share: list[float | None]  # (P,) share of images whose box holds the part


def _boxes_and_cells(
    model: ProtoPNet, x: torch.Tensor, protos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (n, 3, S, S), protos: (m,) -> boxes (n, m, 4) and best cells (n, m) flat."""
    with torch.no_grad():
        d = model.distances(model.conv_features(x))[:, protos]  # (n, m, H', W')
    n, m, H, W = d.shape
    sim = model.similarity(d).float().reshape(n * m, H, W)
    boxes = percentile_boxes(upsample_maps(sim, (x.shape[2], x.shape[3]))).view(n, m, 4)
    return boxes.cpu(), d.flatten(2).argmin(dim=2).cpu()


def _holds(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """boxes (n, m, 4), points (n, Q, 3) (x, y, visible) -> (n, m, Q) bool: the visible
    part is inside the box."""
    x = points[:, None, :, 0]
    y = points[:, None, :, 1]
    b = boxes[..., None]  # (n, m, 4, 1)
    inside = (b[:, :, 0] <= x) & (x < b[:, :, 2]) & (b[:, :, 1] <= y) & (y < b[:, :, 3])
    return inside & (points[:, None, :, 2] > 0)


def box_agreement(
    model: ProtoPNet,
    images: torch.Tensor,
    labels: Sequence[int],
    parts: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> BoxAgreement:
    """Stability and (with ``parts``) the part share of every prototype, on the images of
    its class. images: (N, 3, S, S) preprocessed; labels: (N,); parts: (N, Q, 3) part
    keypoints (x, y, visible) in input pixels, or None. The noise is seeded: one answer
    per set.

    With parts (EvalProtoPNet): stable when the set of visible parts inside the box is
    the same with and without noise; the part share is the share of images on which the
    prototype's most frequent part is inside its box."""
    model.eval()
    classes = model.prototype_class_identity.argmax(dim=1).cpu()
    P = len(classes)
    stable = torch.zeros(P)
    held = torch.zeros(P, 0 if parts is None else parts.shape[1])
    count = torch.zeros(P)
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(list(labels))
    dev = model.ones.device
    for k in torch.unique(labels_t).tolist():
        protos = torch.nonzero(classes == k).flatten()
        if len(protos) == 0:
            continue
        idx = torch.nonzero(labels_t == k).flatten()
        for start in range(0, len(idx), batch_size):
            sl = idx[start : start + batch_size]
            x = images[sl]
            noisy = x + NOISE_STD * torch.randn(x.shape, generator=g)
            b0, c0 = _boxes_and_cells(model, x.to(dev), protos.to(dev))
            b1, c1 = _boxes_and_cells(model, noisy.to(dev), protos.to(dev))
            if parts is not None:
                pts = parts[sl].float()
                in0, in1 = _holds(b0, pts), _holds(b1, pts)  # (n, m, Q)
                stable[protos] += (in0 == in1).all(dim=2).float().sum(dim=0)
                held[protos] += in0.float().sum(dim=0)
            else:
                stable[protos] += (c0 == c1).float().sum(dim=0)
            count[protos] += len(sl)

    def share(v: torch.Tensor) -> list[float | None]:
        return [float(a / c) if c > 0 else None for a, c in zip(v, count, strict=True)]

    best = held.amax(dim=1) if held.shape[1] else torch.zeros(P)
    return BoxAgreement(
        images=[int(c) for c in count],
        stability=share(stable),
        part_share=share(best) if parts is not None else [None] * P,
    )


def mean_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def consistency(part_share: Sequence[float | None]) -> float | None:
    """The share of prototypes (measured on some image) whose box holds the part on at
    least ``CONSISTENT_SHARE`` of their class's images."""
    known = [v for v in part_share if v is not None]
    return float(np.mean([v >= CONSISTENT_SHARE for v in known])) if known else None
