"""A ProtoPNet written the way the reference code writes one, not with this project's
classes: the reference's attribute names (so its state_dict has the reference's keys and
shapes), a VGG-11 trunk from plain layers, the reference's 'regular' add-on layers, the
prototype layer as its _l2_convolution (a convolution with a ones kernel, in float64
here) and min-pooling as -max_pool(-d). Its forward is the independent reference that an
imported model's logits are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGGFeatures(nn.Module):
    """The reference's vgg11_features: a ``features`` Sequential, conv + ReLU + pools."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ReferencePPNet(nn.Module):
    def __init__(self, num_classes: int = 3, per_class: int = 2, depth: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        P = num_classes * per_class
        self.features = VGGFeatures()
        self.add_on_layers = nn.Sequential(
            nn.Conv2d(512, depth, 1), nn.ReLU(), nn.Conv2d(depth, depth, 1), nn.Sigmoid()
        )
        self.prototype_vectors = nn.Parameter(torch.rand(P, depth, 1, 1, generator=g))
        self.ones = nn.Parameter(torch.ones(P, depth, 1, 1), requires_grad=False)
        self.last_layer = nn.Linear(P, num_classes, bias=False)
        # A plain attribute in the reference, so not in its state_dict.
        self.prototype_class_identity = torch.zeros(P, num_classes)
        self.prototype_class_identity[torch.arange(P), torch.arange(P) // per_class] = 1
        with torch.no_grad():
            for p in self.parameters():
                if p is not self.ones:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            self.prototype_vectors.uniform_(0, 1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> logits (B, K), the reference's math in float64 after the trunk."""
        z = self.add_on_layers(self.features(x)).double()  # (B, D, H, W)
        p, ones = self.prototype_vectors.double(), self.ones.double()
        x2 = F.conv2d(z**2, ones)  # (B, P, H, W)
        xp = F.conv2d(z, p)
        p2 = (p**2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        d = F.relu(x2 - 2 * xp + p2)
        min_d = -F.max_pool2d(-d, kernel_size=d.shape[2:]).flatten(1)  # (B, P)
        sim = torch.log((min_d + 1) / (min_d + 1e-4))
        return sim @ self.last_layer.weight.double().t()
