"""Drumond, Viéville and Alexandre's soft-max prototype model (NIPS 2017 TIML workshop).

After a trunk's whole-image embedding x = f(I) (the trunk's feature map, average-pooled),
J prototypes p_j, **not** assigned to classes, each take the probability

    q_j(x) = softmax_j(-||x - p_j||^2 / 2)

and a second soft-max maps those to classes, c_l(x) = softmax_l(w_l^T q(x)). Training
minimises cross-entropy plus alpha ||w||_1 (``penalty="l1"``) or alpha ||w||_2^2
(``"l2"``). A prototype is a neighbourhood of the embedding space, so one may serve
several classes; its class association is its column of w.

The paper updates a prototype by a proximity-weighted k-means step. Here prototypes are
k-means-initialised (:func:`kmeans_prototypes`) and then follow the gradient of the same
loss, whose derivative with respect to p_j is that proximity-weighted pull: the sum over
images of q_j(x) (g_j - sum_i q_i g_i) (x - p_j), g = W^T (c - y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from protopnet.backbones import Trunk, create_backbone

Penalty = Literal["l1", "l2"]


class DrumondConfig(BaseModel):
    """The architecture of a :class:`DrumondNet`: saved with its checkpoints and in its
    store manifest (``kind`` tells it from a ProtoPNet's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["drumond"] = "drumond"
    backbone: str = "small_cnn"
    num_classes: int = Field(ge=1)
    num_prototypes: int = Field(ge=1)
    img_size: int = Field(224, ge=8, le=2048)
    penalty: Penalty = "l1"
    alpha: float = Field(1e-3, ge=0)
    train_trunk: bool = False

    @model_validator(mode="after")
    def _enough_prototypes(self) -> DrumondConfig:
        if self.num_prototypes < self.num_classes:
            raise ValueError(
                f"num_prototypes ({self.num_prototypes}) must be at least num_classes "
                f"({self.num_classes}): the paper takes J >= K"
            )
        return self


class PrototypeSoftmax(nn.Module):
    """The two soft-max layers on an embedding: q (prototype probabilities) and the class
    logits w^T q. Used alone on precomputed embeddings (a frozen trunk) or in
    :class:`DrumondNet`."""

    def __init__(self, num_prototypes: int, num_classes: int, dim: int):
        super().__init__()
        if num_prototypes < num_classes:
            raise ValueError(
                f"num_prototypes ({num_prototypes}) must be at least num_classes ({num_classes})"
            )
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.01)
        self.class_weights = nn.Parameter(torch.zeros(num_classes, num_prototypes))

    def prototype_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """q: (B, D) embeddings -> (B, J), each row summing to 1."""
        # ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2; ||x||^2 is the same for every j, so it
        # cancels in the soft-max and is left out (it is also the term that would lose
        # precision on large embeddings).
        logits = x @ self.prototypes.T - 0.5 * (self.prototypes**2).sum(1)
        return torch.softmax(logits, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits w^T q (B, K), q (B, J)); softmax of the first is c."""
        q = self.prototype_probabilities(x)
        return q @ self.class_weights.T, q

    def penalty(self, kind: Penalty) -> torch.Tensor:
        w = self.class_weights
        return w.abs().sum() if kind == "l1" else (w**2).sum()

    def loss(
        self, x: torch.Tensor, labels: torch.Tensor, alpha: float, kind: Penalty
    ) -> torch.Tensor:
        """Mean cross-entropy of c against ``labels`` plus alpha times the penalty on w."""
        logits, _ = self(x)
        return F.cross_entropy(logits, labels) + alpha * self.penalty(kind)


class DrumondNet(nn.Module):
    """A trunk, global average pooling, and :class:`PrototypeSoftmax`. ``train_trunk``
    says whether training moves the trunk (fine-tuned) or only the head (frozen)."""

    def __init__(
        self,
        trunk: Trunk,
        num_prototypes: int,
        num_classes: int,
        train_trunk: bool = False,
        config: DrumondConfig | None = None,
    ):
        super().__init__()
        self.features = trunk
        self.head = PrototypeSoftmax(num_prototypes, num_classes, trunk.out_channels)
        self.train_trunk = train_trunk
        self.config = config
        trunk.requires_grad_(train_trunk)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.embed(images))


def create_drumond(config: DrumondConfig, weights: str | None = None) -> DrumondNet:
    """A :class:`DrumondNet` for ``config``; ``weights`` as for the trunk (None, "imagenet"
    or a state_dict file)."""
    trunk = create_backbone(config.backbone, weights, config.img_size)
    return DrumondNet(
        trunk, config.num_prototypes, config.num_classes, config.train_trunk, config=config
    )


@dataclass(frozen=True)
class MatchedPrototype:
    """One prototype an image matched: its probability q_j and the classes of the
    training images whose best prototype it is (its neighbourhood), as shares."""

    index: int
    q: float
    class_shares: np.ndarray  # (K,), sums to 1, or all zero for an empty neighbourhood


# The matched prototypes are the fewest whose q adds up to this much of the image.
MATCHED_MASS = 0.9
# An answer is ambiguous when less than this share of its matched neighbourhoods' training
# images (weighted by q) belong to the answered class.
AMBIGUOUS_BELOW = 0.75


def matched_prototypes(
    q: np.ndarray, class_shares: np.ndarray, limit: int, mass: float = MATCHED_MASS
) -> list[MatchedPrototype]:
    """The most probable prototypes of one image, fewest first to ``mass`` of q (at most
    ``limit``); ``class_shares`` (J, K) is each prototype's neighbourhood."""
    order = np.argsort(-q, kind="stable")
    out: list[MatchedPrototype] = []
    total = 0.0
    for j in order[:limit].tolist():
        out.append(MatchedPrototype(j, float(q[j]), class_shares[j]))
        total += float(q[j])
        if total >= mass:
            break
    return out


def neighbourhood_classes(matched: list[MatchedPrototype]) -> np.ndarray:
    """(K,) the q-weighted shares of the matched neighbourhoods' training images per
    class (empty neighbourhoods weigh nothing; all zero when every one is empty).
    ``matched`` is never empty: ``matched_prototypes`` keeps at least one for limit >= 1."""
    pooled = sum((m.q * m.class_shares for m in matched), np.zeros_like(matched[0].class_shares))
    total = float(pooled.sum())
    return pooled / total if total > 0 else pooled


def kmeans_prototypes(embeddings: torch.Tensor, num_prototypes: int, seed: int = 0) -> torch.Tensor:
    """k-means centres of ``embeddings`` (N, D), the paper's suggested initialisation."""
    from sklearn.cluster import KMeans

    x = embeddings.detach().double().cpu().numpy()
    if num_prototypes > len(x):
        raise ValueError(f"{num_prototypes} prototypes need at least as many images, got {len(x)}")
    km = KMeans(n_clusters=num_prototypes, n_init=4, random_state=seed).fit(x)
    return torch.from_numpy(np.asarray(km.cluster_centers_)).to(embeddings.dtype)


def fit_head(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    num_prototypes: int,
    alpha: float,
    penalty: Penalty,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> PrototypeSoftmax:
    """Train :class:`PrototypeSoftmax` on fixed embeddings (a frozen trunk): k-means
    prototypes and w = 0, then full-batch Adam on the loss. Deterministic for a given
    ``seed``.

    Adam moves every coordinate by about ``lr`` per step whatever the data's scale, so the
    prototypes' rate is ``lr`` times the embeddings' mean coordinate spread: a step is the
    same share of the data's extent on raw or rescaled embeddings. With one rate for all
    (bench/drumond.py, 10-way, embeddings rescaled so the median ||x - x'||^2 / 2 is 1) the
    prototypes jumped out of the data, one took every image with q = 1 and accuracy fell
    to chance (0.33 mean over 4 episodes; 0.68 with the relative rate; raw embeddings,
    whose spread is about 0.8, unchanged at 0.55)."""
    torch.manual_seed(seed)
    x = embeddings.float()
    head = PrototypeSoftmax(num_prototypes, num_classes, x.shape[1])
    with torch.no_grad():
        head.prototypes.copy_(kmeans_prototypes(x, num_prototypes, seed))
    spread = float(x.std(0).mean()) if len(x) > 1 else 1.0
    opt = torch.optim.Adam(
        [
            {"params": [head.prototypes], "lr": lr * max(spread, 1e-8)},
            {"params": [head.class_weights], "lr": lr},
        ]
    )
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        head.loss(x, labels, alpha, penalty).backward()
        opt.step()
    return head.eval()
