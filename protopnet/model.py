"""The ProtoPNet module: trunk f, add-on layers, prototype layer g_p, last layer h.

Shapes: B images, C trunk channels, D prototype depth, P prototypes, K classes,
(H, W) latent grid, (h1, w1) prototype size, (H', W') = (H - h1 + 1, W - w1 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from protopnet.backbones import Trunk, create_backbone
from protopnet.config import ProtoPNetConfig
from protopnet.errors import ShapeError
from protopnet.receptive_field import (
    PatchField,
    compute_patch_field,
    compute_receptive_field,
    layer_geometry,
)


def build_add_on_layers(in_channels: int, depth: int, kind: str) -> nn.Sequential:
    """1x1 convs from C to D ending in a Sigmoid, so latent features lie in (0, 1).

    "regular": conv C->D, ReLU, conv D->D, Sigmoid.
    "bottleneck": halve the width block by block until it reaches D; each block is
    conv, ReLU, conv, then ReLU (Sigmoid for the last block).
    """
    layers: list[nn.Module] = []
    if kind == "regular":
        layers = [
            nn.Conv2d(in_channels, depth, 1),
            nn.ReLU(),
            nn.Conv2d(depth, depth, 1),
            nn.Sigmoid(),
        ]
    elif kind == "bottleneck":
        c_in = in_channels
        while True:
            c_out = max(depth, c_in // 2)
            layers += [nn.Conv2d(c_in, c_out, 1), nn.ReLU(), nn.Conv2d(c_out, c_out, 1)]
            if c_out == depth:
                layers.append(nn.Sigmoid())
                break
            layers.append(nn.ReLU())
            c_in = c_out
    else:
        raise ValueError(f"unknown add_on {kind!r}; valid: bottleneck, regular")
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            assert m.bias is not None
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def class_identity(classes: list[int], num_classes: int) -> torch.Tensor:
    """One-hot (P, K) matrix: row j marks the class of prototype j."""
    ident = torch.zeros(len(classes), num_classes)
    ident[torch.arange(len(classes)), torch.tensor(classes, dtype=torch.long)] = 1.0
    return ident


def last_layer_init(identity: torch.Tensor, incorrect_strength: float = -0.5) -> torch.Tensor:
    """(K, P) weights: 1 for a prototype's own class, ``incorrect_strength`` elsewhere."""
    pos = identity.t()
    return pos + incorrect_strength * (1 - pos)


def patch_columns(z: torch.Tensor, h1: int, w1: int) -> torch.Tensor:
    """(B, D, H, W) -> (B, D*h1*w1, L): every h1 x w1 patch as a column, its values in a
    prototype's (D, h1, w1) order; L = (H - h1 + 1) * (W - w1 + 1), row-major."""
    B, D, H, W = z.shape
    return z.reshape(B, D, H * W) if h1 == w1 == 1 else F.unfold(z, (h1, w1))


def l2_distances(z: torch.Tensor, prototypes: torch.Tensor, precise: bool = False) -> torch.Tensor:
    """Squared L2 distance of every prototype to every h1 x w1 patch of z.

    ||z - p||^2 = sum_patch(z^2) - 2 <z, p> + ||p||^2, the cross term a matrix product.
    z: (B, D, H, W); prototypes: (P, D, h1, w1) -> (B, P, H', W'), clamped at 0.

    ``precise``: the same sum in float64. Where a patch matches a prototype (and push
    puts every prototype on a training patch) the float32 sum is all cancellation, a
    residue of about 1e-7 of |z|^2 that depends on the batch size, memory layout and
    device; the log similarity's slope there is 1 / eps = 1e4, so the same image scored
    up to 0.13 apart in a logit at batch 1 and 16, or NCHW and channels-last, and the
    closest of several near matches changed with them. In float64 the residue is about
    1e-14 at every patch. The products are a small part of a forward pass (for VGG-19
    with 2000 prototypes 12.5 MFLOP an image against the trunk's 20 GFLOP).

    The cross term is a matrix product rather than a convolution on purpose: on a GPU,
    cuDNN runs float32 convolutions in TF32 by default (10 mantissa bits), and near a
    match the three terms cancel, so TF32 moved d by about 5e-4 where the similarity
    log((d + 1) / (d + 1e-4)) is steepest: on an H100 a patch identical to a prototype
    scored 7.4 instead of 9.2. Matrix products stay in true float32 unless a caller
    lowers ``torch.set_float32_matmul_precision`` itself.
    """
    B, _, H, W = z.shape
    P, _, h1, w1 = prototypes.shape
    Ho, Wo = H - h1 + 1, W - w1 + 1
    if precise:
        # Float32 features are exact in float64, where the three terms cancel to ~1e-14
        # instead of ~1e-5 (see the docstring); the result goes back to float32.
        return l2_distances(z.double(), prototypes.double()).to(z.dtype)
    cols = patch_columns(z, h1, w1)  # (B, D*h1*w1, L)
    flat = prototypes.reshape(P, -1)  # (P, D*h1*w1)
    z2 = (cols * cols).sum(dim=1, keepdim=True)  # (B, 1, L)
    zp = torch.matmul(flat, cols)  # (B, P, L)
    p2 = (flat * flat).sum(dim=1).view(1, P, 1)  # (1, P, 1)
    return F.relu(z2 - 2 * zp + p2).view(B, P, Ho, Wo)


def distance_to_similarity(d: torch.Tensor, activation: str, epsilon: float = 1e-4) -> torch.Tensor:
    """The paper's "log" activation log((d + 1) / (d + eps)), or "linear": -d."""
    if activation == "log":
        return torch.log((d + 1) / (d + epsilon))
    if activation == "linear":
        return -d
    raise ValueError(f"unknown activation {activation!r}; valid: linear, log")


@dataclass
class ProtoPNetOutput:
    """Everything one forward computes, for explanations and push."""

    logits: torch.Tensor  # (B, K)
    min_distances: torch.Tensor  # (B, P)
    distances: torch.Tensor  # (B, P, H', W')
    features: torch.Tensor  # (B, D, H, W), latent z

    @property
    def min_indices(self) -> torch.Tensor:
        """(B, P) flat index into (H', W') of each prototype's closest patch."""
        return self.distances.flatten(2).argmin(dim=2)


class ProtoPNet(nn.Module):
    """f (trunk) -> add-on layers -> prototype layer g_p -> last layer h (no bias)."""

    # (P, D, h1, w1) of ones: the reference's buffer, kept so state_dicts load both ways
    # (and as the model's device); the distances no longer use it.
    ones: torch.Tensor
    prototype_class_identity: torch.Tensor  # (P, K) one-hot, not saved

    def __init__(self, config: ProtoPNetConfig, trunk: Trunk):
        super().__init__()
        self.config = config
        P, D = config.num_prototypes, config.prototype_depth
        h1, w1 = config.prototype_size
        self.features = trunk
        self.add_on_layers = build_add_on_layers(trunk.out_channels, D, config.add_on)
        self.prototype_vectors = nn.Parameter(torch.rand(P, D, h1, w1))
        # A buffer rather than a frozen Parameter: same state_dict key as the reference.
        self.register_buffer("ones", torch.ones(P, D, h1, w1))
        ident = class_identity(config.classes_of_prototypes(), config.num_classes)
        self.register_buffer("prototype_class_identity", ident, persistent=False)  # (P, K)
        self.last_layer = nn.Linear(P, config.num_classes, bias=False)
        with torch.no_grad():
            self.last_layer.weight.copy_(last_layer_init(ident))

    # -- shapes ---------------------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        return int(self.prototype_vectors.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.last_layer.weight.shape[0])

    @property
    def prototype_classes(self) -> torch.Tensor:
        """(P,) class index of each prototype."""
        return self.prototype_class_identity.argmax(dim=1)

    def receptive_field(self) -> PatchField:
        """Input pixels seen by a prototype-sized window of the latent grid (the trunk's
        geometry; the add-on layers are 1 x 1)."""
        return compute_patch_field(
            layer_geometry(self.features), self.config.img_size, self.config.prototype_size
        )

    # -- forward --------------------------------------------------------------------
    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H_img, W_img) -> latent z (B, D, H, W) in (0, 1)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ShapeError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        return self.add_on_layers(self.features(x))

    def distances(self, z: torch.Tensor, precise: bool = True) -> torch.Tensor:
        """(B, D, H, W) -> (B, P, H', W') squared L2 distances (``l2_distances``; every
        number a user sees is ``precise``)."""
        return l2_distances(z, self.prototype_vectors, precise)

    def similarity(self, d: torch.Tensor) -> torch.Tensor:
        return distance_to_similarity(d, self.config.activation, self.config.epsilon)

    def forward_full(self, x: torch.Tensor) -> ProtoPNetOutput:
        """Logits plus the full distance maps (for explanations and push)."""
        z = self.conv_features(x)
        d = self.distances(z)  # (B, P, H', W')
        min_d = d.flatten(2).amin(dim=2)  # (B, P)
        logits = self.last_layer(self.similarity(min_d))  # (B, K)
        return ProtoPNetOutput(logits=logits, min_distances=min_d, distances=d, features=z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, K), min distances (B, P)."""
        out = self.forward_full(x)
        return out.logits, out.min_distances

    # -- editing --------------------------------------------------------------------
    def prune_prototypes(self, indices: list[int]) -> None:
        """Remove prototypes (and their last-layer columns) in place; updates config."""
        drop = set(indices)
        bad = [j for j in drop if not 0 <= j < self.num_prototypes]
        if bad:
            raise ValueError(f"prototype indices {bad[:5]} outside 0..{self.num_prototypes - 1}")
        keep = [j for j in range(self.num_prototypes) if j not in drop]
        if not keep:
            raise ValueError("pruning would remove every prototype")
        idx = torch.tensor(keep, dtype=torch.long, device=self.ones.device)
        classes = [int(c) for c in self.prototype_classes[idx].tolist()]
        self.prototype_vectors = nn.Parameter(self.prototype_vectors.data[idx].clone())
        self.ones = self.ones[idx].clone()
        self.prototype_class_identity = self.prototype_class_identity[idx].clone()
        new_last = nn.Linear(len(keep), self.num_classes, bias=False).to(self.ones.device)
        with torch.no_grad():
            new_last.weight.copy_(self.last_layer.weight.data[:, idx])
        self.last_layer = new_last
        self.config = self.config.model_copy(update={"prototype_classes": tuple(classes)})


def create_model(config: ProtoPNetConfig, weights: str | None = None) -> ProtoPNet:
    """Build a ProtoPNet from its architecture config.

    ``weights`` initialises the trunk only (None, "imagenet" or a local file); a whole
    trained model loads through ``model.load_state_dict`` afterwards.
    """
    trunk = create_backbone(config.backbone, weights, config.img_size)
    model = ProtoPNet(config, trunk)
    # Latent grid side H = W before the prototype window; both h1 and w1 must fit in it.
    grid = compute_receptive_field(layer_geometry(trunk), config.img_size, 1).size
    h1, w1 = config.prototype_size
    if grid < max(h1, w1):
        raise ShapeError(
            f"{config.backbone} at {config.img_size} px gives a {grid} x {grid} latent grid, "
            f"too small for {h1} x {w1} prototypes"
        )
    return model


def max_similarity(activation: str, epsilon: float = 1e-4) -> float:
    """Similarity at distance 0 (about 9.21 for "log")."""
    return math.log(1 / epsilon) if activation == "log" else 0.0
