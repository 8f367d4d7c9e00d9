"""Checks on how faithful an explanation is, beyond the paper's upsampled activation maps.

Tools beyond the default explanation path (the receipt runs in the service when a
request asks for ``faithfulness=true``; the rest are offline):

- ``receipts``: each shown box's deletion test beside boxes of its size placed at random,
  with a verdict (``FAITHFUL_SHARE``).

- ``deletion_scores``: blank the pixels of a prototype's box on the model input (set them
  to the preprocessing's mean, i.e. 0 after normalisation), re-run the model and report
  the similarity after / before at the same latent location. A box that really holds what
  drives the similarity makes it drop: lower is more faithful (Xu-Darme et al., "Sanity
  checks for patch visualisation in prototype-based image classification", 2023).
- ``SmoothGrad``: the gradient of a prototype's similarity score with respect to the
  input, averaged over noisy copies of the image. An alternative activation map with the
  (N, S, S) shape of ``upsampled_input_maps``, so ``explain.place_maps``,
  ``explain.percentile_boxes`` and ``visualize`` take either.
- ``collapsed_prototypes``: pairs of same-class prototypes whose vectors are (nearly)
  identical, typically because push projected both onto the same training patch.

Shapes: S model input side, P prototypes, N prototypes asked about, (H', W') latent grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from protopnet.errors import ShapeError
from protopnet.explain import percentile_boxes, upsample_maps
from protopnet.model import ProtoPNet, distance_to_similarity


def _check_inputs(model: ProtoPNet, image: torch.Tensor, prototypes: Sequence[int]) -> torch.Tensor:
    """(3, S, S) or (1, 3, S, S) -> (1, 3, S, S) on the model's device; indices checked."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ShapeError(
            f"expected one preprocessed image of shape (3, S, S), got {tuple(image.shape)}"
        )
    P = model.num_prototypes
    bad = [j for j in prototypes if not 0 <= int(j) < P]
    if bad:
        raise ValueError(f"prototype indices {bad[:5]} outside 0..{P - 1}")
    if len(prototypes) == 0:
        raise ValueError("no prototypes given")
    return image.unsqueeze(0).to(model.ones.device)


@contextmanager
def _eval_mode(model: ProtoPNet) -> Iterator[None]:
    """Batch norm must use its running statistics: a batch of noisy or blanked copies of
    one image would otherwise normalise by its own statistics."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _log_similarity(model: ProtoPNet, d: torch.Tensor) -> torch.Tensor:
    """The paper's log similarity of distances, whatever the model's own activation, so
    ratios are positive and comparable across models ("linear" gives -d < 0)."""
    return distance_to_similarity(d, "log", model.config.epsilon)


# ---------------------------------------------------------------------------------------
# Maps at the model's input resolution


@torch.no_grad()
def upsampled_input_maps(
    model: ProtoPNet, image: torch.Tensor, prototypes: Sequence[int]
) -> torch.Tensor:
    """The paper's activation maps at input resolution: each prototype's (H', W')
    similarity map, bicubically upsampled to (S, S). Returns (N, S, S) on the CPU."""
    x = _check_inputs(model, image, prototypes)
    with _eval_mode(model):
        d = model.distances(model.conv_features(x))[0]  # (P, H', W')
    sim = model.similarity(d[list(prototypes)]).float().cpu()  # (N, H', W')
    return upsample_maps(sim, (x.shape[2], x.shape[3]))


class SmoothGrad:
    """SmoothGrad (Smilkov et al. 2017) of prototype similarity scores, through captum:
    ``NoiseTunnel`` over ``Saliency`` of the prototype's log similarity at one cell.

    For prototype j read at latent cell (h, w), the map is the mean over ``samples`` noisy
    copies x + e, e ~ N(0, sigma^2), of |d sim_j(h, w) / d x|, summed over colour channels.
    sigma = ``noise`` x (max - min of the input), as in the SmoothGrad paper. The cell is
    the prototype's closest patch on the clean image unless given, so the map explains the
    same number as the scoring sheet. Every prototype sees the same noise draws (captum
    draws from torch's global generator; it is seeded with ``seed`` in a forked RNG state
    for each prototype, so the caller's random state is untouched), so maps of one image
    are comparable and reproducible.

    Cost: N x samples forward and backward passes, ``batch_size`` noisy copies at a time.
    """

    def __init__(
        self,
        model: ProtoPNet,
        samples: int = 16,
        noise: float = 0.15,
        batch_size: int = 32,
        seed: int = 0,
    ):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0 (a fraction of the input range), got {noise}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.samples = samples
        self.noise = noise
        self.batch_size = batch_size
        self.seed = seed

    def attribute(
        self,
        image: torch.Tensor,
        prototypes: Sequence[int],
        locations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image: (3, S, S) preprocessed; locations: (N, 2) latent (h, w) or None.
        Returns (N, S, S) float maps on the CPU (>= 0)."""
        from captum.attr import NoiseTunnel, Saliency

        model = self.model
        x = _check_inputs(model, image, prototypes)
        protos = [int(j) for j in prototypes]
        sigma = self.noise * float(x.max() - x.min())
        maps = torch.zeros((len(protos), x.shape[2], x.shape[3]))
        devices = [x.device] if x.device.type == "cuda" else []
        with _eval_mode(model):
            if locations is None:
                with torch.no_grad():
                    d = model.distances(model.conv_features(x))[0]  # (P, H', W')
                locations = _argmin_hw(d[torch.tensor(protos, device=d.device)])
            cells = locations.to(torch.long).cpu().tolist()  # (N, 2)
            for i, (j, (h, w)) in enumerate(zip(protos, cells, strict=True)):

                def similarity(batch: torch.Tensor, j: int = j, h: int = h, w: int = w):
                    d = model.distances(model.conv_features(batch))[:, j, h, w]  # (b,)
                    return _log_similarity(model, d)

                tunnel = NoiseTunnel(Saliency(similarity))
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed)
                    grads = tunnel.attribute(
                        x,
                        nt_type="smoothgrad",
                        nt_samples=self.samples,
                        nt_samples_batch_size=self.batch_size,
                        stdevs=sigma,
                    )  # (1, 3, S, S): the mean over the noisy copies of |gradient|
                maps[i] = grads[0].abs().sum(dim=0).float().cpu()
        return maps


def _argmin_hw(d: torch.Tensor) -> torch.Tensor:
    """(N, H', W') distances -> (N, 2) (h, w) of each map's minimum."""
    W = d.shape[2]
    idx = d.flatten(1).argmin(dim=1)
    return torch.stack([idx // W, idx % W], dim=1).cpu()


# ---------------------------------------------------------------------------------------
# Deletion test


@dataclass
class DeletionResult:
    """Per prototype asked about: its box, where it was read, and the similarities."""

    prototypes: list[int]
    boxes: torch.Tensor  # (N, 4) blanked box (x0, y0, x1, y1) in input pixels, end exclusive
    locations: torch.Tensor  # (N, 2) latent (h, w) where the similarity is read
    before: torch.Tensor  # (N,) log similarity on the clean image
    after: torch.Tensor  # (N,) log similarity with the box blanked

    @property
    def ratio(self) -> torch.Tensor:
        """(N,) after / before: lower means the box held what drove the similarity."""
        return self.after / self.before


@torch.no_grad()
def deletion_scores(
    model: ProtoPNet,
    image: torch.Tensor,
    prototypes: Sequence[int],
    boxes: torch.Tensor,
    locations: torch.Tensor | None = None,
    batch_size: int = 32,
) -> DeletionResult:
    """Blank each prototype's box (to 0, the normalised mean) and re-run, as one batch.

    image: (3, S, S) preprocessed; boxes: (N, 4) input pixels (x0, y0, x1, y1), end
    exclusive, clipped to the image; locations: (N, 2) latent (h, w), by default each
    prototype's closest patch on the clean image.
    """
    x = _check_inputs(model, image, prototypes)
    N = len(prototypes)
    if boxes.shape != (N, 4):
        raise ShapeError(f"expected ({N}, 4) boxes for {N} prototypes, got {tuple(boxes.shape)}")
    S_h, S_w = x.shape[2], x.shape[3]
    b = boxes.to(torch.long).cpu().clone()
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, S_w)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, S_h)
    protos = torch.tensor([int(j) for j in prototypes], dtype=torch.long)
    with _eval_mode(model):
        d0 = model.distances(model.conv_features(x))[0][protos.to(x.device)]  # (N, H', W')
        loc = _argmin_hw(d0) if locations is None else locations.to(torch.long).cpu()
        before = _log_similarity(model, d0[torch.arange(N), loc[:, 0], loc[:, 1]]).float().cpu()
        # Box masks for all N at once: (N, 1, S, S), True inside the box.
        ys = torch.arange(S_h).view(1, S_h, 1)
        xs = torch.arange(S_w).view(1, 1, S_w)
        inside = (
            (ys >= b[:, 1].view(-1, 1, 1))
            & (ys < b[:, 3].view(-1, 1, 1))
            & (xs >= b[:, 0].view(-1, 1, 1))
            & (xs < b[:, 2].view(-1, 1, 1))
        ).unsqueeze(1)
        after = torch.empty(N)
        for start in range(0, N, batch_size):
            sl = slice(start, min(start + batch_size, N))
            blanked = x.cpu().masked_fill(inside[sl], 0.0).to(x.device)  # (b, 3, S, S)
            d = model.distances(model.conv_features(blanked))  # (b, P, H', W')
            rows = torch.arange(sl.stop - sl.start)
            picked = d[rows, protos[sl], loc[sl, 0], loc[sl, 1]]  # (b,)
            after[sl] = _log_similarity(model, picked).float().cpu()
    return DeletionResult(
        prototypes=protos.tolist(), boxes=b, locations=loc, before=before, after=after
    )


def deletion_test(
    model: ProtoPNet,
    image: torch.Tensor,
    prototypes: Sequence[int],
    maps: torch.Tensor,
    q: float = 95.0,
) -> DeletionResult:
    """The deletion test of a kind of activation map: (N, S, S) maps at input resolution
    (``upsampled_input_maps`` or ``SmoothGrad.attribute``) -> their q-th percentile boxes,
    blanked one at a time."""
    if maps.dim() != 3 or maps.shape[0] != len(prototypes):
        raise ShapeError(
            f"expected ({len(prototypes)}, S, S) maps, one per prototype, got {tuple(maps.shape)}"
        )
    if tuple(maps.shape[1:]) != tuple(image.shape[-2:]):
        raise ShapeError(
            f"maps of size {tuple(maps.shape[1:])} do not match the input "
            f"{tuple(image.shape[-2:])}; pass maps at input resolution"
        )
    return deletion_scores(model, image, prototypes, percentile_boxes(maps.float(), q))


# ---------------------------------------------------------------------------------------
# Prototype collapse


@dataclass(frozen=True)
class CollapsedPair:
    """Two prototypes of one class that are (nearly) the same vector."""

    class_index: int
    first: int
    second: int
    distance: float  # squared L2 between the two prototype vectors


@torch.no_grad()
def collapsed_prototypes(
    vectors: torch.Tensor, classes: torch.Tensor, max_distance: float = 1e-6
) -> list[CollapsedPair]:
    """Same-class pairs (i < j) whose squared L2 distance is <= ``max_distance``.

    vectors: (P, D, h1, w1) prototype vectors (e.g. after push); classes: (P,). Pairs come
    sorted by class, then index. After push, prototypes projected onto the same training
    patch are exactly equal, so any small threshold finds them; a larger one also flags
    near-duplicates (features in (0, 1): squared distances range up to D x h1 x w1).
    """
    if vectors.shape[0] != classes.shape[0]:
        raise ShapeError(f"{vectors.shape[0]} prototype vectors but {classes.shape[0]} classes")
    flat = vectors.detach().flatten(1).double().cpu()  # (P, D h1 w1)
    classes = classes.cpu()
    pairs: list[CollapsedPair] = []
    for k in torch.unique(classes).tolist():
        idx = torch.nonzero(classes == k).flatten()
        if len(idx) < 2:
            continue
        v = flat[idx]  # (m, F)
        # Exact pairwise differences (no |a|^2 - 2ab + |b|^2 cancellation): m is small.
        d = ((v.unsqueeze(1) - v.unsqueeze(0)) ** 2).sum(dim=2)  # (m, m)
        a, b = torch.nonzero(torch.triu(d <= max_distance, diagonal=1), as_tuple=True)
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            pairs.append(CollapsedPair(int(k), int(idx[i]), int(idx[j]), float(d[i, j])))
    return pairs


# ---------------------------------------------------------------------------------------
# The receipt: the deletion test of a shown box against boxes of its size placed at random

# A box is called faithful when blanking it leaves at most this share of what blanking a
# random box of its size leaves of the similarity (ratio <= 0.8 x the random ratio): the
# similarity depends on what the box holds clearly more than on a patch of that size
# anywhere. Otherwise "doubtful": the box may not show what the model matched.
FAITHFUL_SHARE = 0.8
RANDOM_BOXES = 4  # random boxes averaged per shown box


@dataclass(frozen=True)
class Receipt:
    """One shown box's deletion test beside the random-box baseline."""

    deletion_ratio: float  # similarity with the box blanked / before, at the same cell
    random_deletion_ratio: float  # the same, averaged over random boxes of the box's size
    verdict: str  # "faithful" or "doubtful" (``FAITHFUL_SHARE``)


def _random_boxes(
    boxes: torch.Tensor, side_h: int, side_w: int, count: int, seeds: Sequence[int]
) -> torch.Tensor:
    """(N, 4) boxes -> (N, count, 4) boxes of the same sizes, placed uniformly in the
    input; box n's from its own ``seeds[n]``, so a box's random baseline does not depend
    on which other boxes are tested with it."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(1, side_w)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(1, side_h)
    u = torch.stack(
        [torch.rand(count, 2, generator=torch.Generator().manual_seed(s)) for s in seeds]
    ) if len(seeds) else torch.zeros(0, count, 2)  # fmt: skip
    x0 = (u[..., 0] * (side_w - w + 1)[:, None]).long()
    y0 = (u[..., 1] * (side_h - h + 1)[:, None]).long()
    return torch.stack([x0, y0, x0 + w[:, None], y0 + h[:, None]], dim=2)


@torch.no_grad()
def receipts(
    model: ProtoPNet,
    image: torch.Tensor,
    prototypes: Sequence[int],
    boxes: torch.Tensor,
    cells: torch.Tensor | None,
    seed: int,
    random_boxes: int = RANDOM_BOXES,
    batch_size: int = 32,
) -> list[Receipt]:
    """The receipt of each prototype's box: blank the box on the model input (to 0, the
    normalised mean), read the similarity at the prototype's cell, over its value on the
    clean image; the same for ``random_boxes`` boxes of the box's size placed at random
    (seeded by ``seed`` and the prototype, so one image always gets the same answer,
    whichever other prototypes are tested with it), averaged.

    image: (3, S, S) preprocessed; boxes: (N, 4) input pixels (x0, y0, x1, y1), end
    exclusive; cells: (N, 2) latent (h, w), by default each prototype's closest cell on
    the clean image. The clean copy and all N x (1 + random_boxes)
    blanked copies go through the model in batches of ``batch_size`` (one batched
    forward when they fit).
    """
    x = _check_inputs(model, image, prototypes)
    N, S_h, S_w = len(prototypes), x.shape[2], x.shape[3]
    if boxes.shape != (N, 4) or (cells is not None and cells.shape != (N, 2)):
        raise ShapeError(f"expected ({N}, 4) boxes and ({N}, 2) cells for {N} prototypes")
    b = boxes.to(torch.long).cpu().clone()
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, S_w)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, S_h)
    # One seed per prototype from the image's: (seed, prototype) -> the same boxes.
    seeds = [(seed * 1_000_003 + int(j)) % (1 << 62) for j in prototypes]
    rand = _random_boxes(b, S_h, S_w, random_boxes, seeds)  # (N, R, 4)
    every = torch.cat([b[:, None], rand], dim=1).reshape(-1, 4)  # (N * (1 + R), 4)
    ys = torch.arange(S_h).view(1, S_h, 1)
    xs = torch.arange(S_w).view(1, 1, S_w)
    protos = torch.tensor([int(j) for j in prototypes], dtype=torch.long)
    clean = x.cpu()
    values: list[torch.Tensor] = []
    with _eval_mode(model):
        d0 = model.distances(model.conv_features(x))[0]  # (P, H', W')
        cells = _argmin_hw(d0[protos.to(d0.device)]) if cells is None else cells.long().cpu()
        which = protos.repeat_interleave(1 + random_boxes)  # the prototype each copy tests
        where = cells.repeat_interleave(1 + random_boxes, dim=0)
        before = _log_similarity(model, d0[protos.to(d0.device), cells[:, 0], cells[:, 1]])
        for start in range(0, every.shape[0], batch_size):
            bx = every[start : start + batch_size]
            inside = (
                (ys >= bx[:, 1].view(-1, 1, 1)) & (ys < bx[:, 3].view(-1, 1, 1))
                & (xs >= bx[:, 0].view(-1, 1, 1)) & (xs < bx[:, 2].view(-1, 1, 1))
            ).unsqueeze(1)  # fmt: skip
            blanked = clean.expand(len(bx), -1, -1, -1).masked_fill(inside, 0.0).to(x.device)
            d = model.distances(model.conv_features(blanked))  # (b, P, H', W')
            sl = slice(start, start + len(bx))
            rows = torch.arange(len(bx), device=d.device)
            picked = d[rows, which[sl].to(d.device), where[sl, 0], where[sl, 1]]
            values.append(_log_similarity(model, picked).float().cpu())
    after = torch.cat(values).view(N, 1 + random_boxes)
    ratio = after / before.float().cpu()[:, None]
    out = []
    for own, rnd in zip(ratio[:, 0].tolist(), ratio[:, 1:].mean(dim=1).tolist(), strict=True):
        verdict = "faithful" if own <= FAITHFUL_SHARE * rnd else "doubtful"
        out.append(Receipt(deletion_ratio=own, random_deletion_ratio=rnd, verdict=verdict))
    return out
