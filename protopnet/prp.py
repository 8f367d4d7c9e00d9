"""Prototypical relevance propagation (PRP; Gautam et al., "This looks more like that",
Pattern Recognition 2023): where on the input a prototype's similarity comes from, by
layer-wise relevance propagation (LRP) from the similarity back to the pixels.

The relevance to explain is prototype j's log similarity at one latent cell (its best
cell by default, the number the scoring sheet shows). It is propagated

1. through the prototype layer by PRP's own rule, written here because no LRP library has
   a rule for an L2-distance layer: the cell's relevance R is shared among the latent
   values of the patch in proportion to 1 / ((z - p)^2)^2, the values that match the
   prototype best getting the most (each patch position and channel of the (D, h1, w1)
   patch is one share; the shares sum to R);
2. through the add-on layers and the trunk by zennit's rules: ZPlus (LRP-alpha1-beta0,
   PRP's choice) for every convolution and Epsilon for linear layers, ZBox for the first
   layer, bounded by what the preprocessing can produce from pixels in [0, 1]; ReLU,
   ReLU6 and Sigmoid pass relevance through; batch norms are merged into the convolution
   before them (zennit's canonizers, ResNet's residual sums too). Biases are left out of
   every rule, so no relevance is absorbed by them.

So the map conserves relevance: it sums to the similarity it explains (within the rules'
stabilisers, and what the first layer gives to zero padding). The one residual network
zennit has no canonizer for, the EfficientNet-Lite trunk, gets a small one here
(``_MBConvCanonizer``): its blocks add their input to their output with ``+``, which
would hand the full relevance to both summands.

The (N, S, S) map is the relevance summed over colour channels; it may be negative where
a pixel argues against the match, and the q-th percentile box of it is the box the
service draws, like any other map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from protopnet.config import Preprocessing
from protopnet.faithfulness import _argmin_hw, _check_inputs, _eval_mode, _log_similarity
from protopnet.model import ProtoPNet

# PRP's stabiliser for 1 / ((z - p)^2)^2: a latent value exactly equal to the prototype's
# (a prototype on its own training patch) takes the cell's relevance rather than dividing
# by zero.
PROTOTYPE_STABILISER = 1e-12


def prototype_relevance(
    z: torch.Tensor, prototype: torch.Tensor, cell: tuple[int, int], relevance: torch.Tensor
) -> torch.Tensor:
    """PRP's rule for the prototype layer. z: (B, D, H, W) latent features; prototype:
    (D, h1, w1); cell: (h, w), the patch's top-left latent cell; relevance: (B,) the
    relevance of the similarity there. Returns (B, D, H, W): zero outside the patch, and
    inside it ``relevance`` shared in proportion to 1 / ((z - p)^2)^2."""
    _, h1, w1 = prototype.shape
    h, w = cell
    patch = z[:, :, h : h + h1, w : w + w1]  # (B, D, h1, w1)
    share = 1.0 / (((patch - prototype) ** 2) ** 2 + PROTOTYPE_STABILISER)
    share = share / share.flatten(1).sum(dim=1).view(-1, 1, 1, 1)
    out = torch.zeros_like(z)
    out[:, :, h : h + h1, w : w + w1] = share * relevance.view(-1, 1, 1, 1)
    return out


def _mbconv_forward(self: Any, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> Any:
    """efficientnet_lite_pytorch's MBConvBlock forward at inference (the Lite variants have
    no squeeze-excitation), with the skip connection as zennit's ``Sum`` module."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
    return x


# Batch norms of efficientnet_lite_pytorch's modules, by the convolution they follow. Its
# convolutions have a padding child, so zennit's SequentialMergeBatchNorm, which pairs
# adjacent leaves, does not see them.
_EFFICIENTNET_BN = {
    "EfficientNet": (("_conv_stem", "_bn0"), ("_conv_head", "_bn1")),
    "MBConvBlock": (
        ("_expand_conv", "_bn0"),
        ("_depthwise_conv", "_bn1"),
        ("_project_conv", "_bn2"),
    ),
}


def _canonizers(latent: nn.Module) -> list:  # type: ignore[type-arg]
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm, SequentialMergeBatchNorm
    from zennit.layer import Sum
    from zennit.torchvision import ResNetCanonizer

    def mbconv(name: str, module: nn.Module) -> dict | None:  # type: ignore[type-arg]
        if type(module).__name__ != "MBConvBlock":
            return None
        if getattr(module, "has_se", False):
            raise NotImplementedError("PRP: MBConv blocks with squeeze-excitation")
        return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": Sum()}

    kinds = {type(m).__name__ for m in latent.modules()}
    if "MBConvBlock" in kinds:
        pairs = [
            ((f"{name}.{conv}",), f"{name}.{bn}")
            for name, m in latent.named_modules()
            for conv, bn in _EFFICIENTNET_BN.get(type(m).__name__, ())
            if hasattr(m, conv)
        ]
        return [NamedMergeBatchNorm(pairs), AttributeCanonizer(mbconv)]
    if kinds & {"BasicBlock", "Bottleneck"}:
        return [ResNetCanonizer()]  # merges the batch norms too
    return [SequentialMergeBatchNorm()]


class _Latent(nn.Module):
    """The trunk and the add-on layers as one module, for zennit to hook."""

    def __init__(self, model: ProtoPNet):
        super().__init__()
        self.features = model.features
        self.add_on_layers = model.add_on_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_on_layers(self.features(x))


class PRP:
    """Prototypical relevance propagation maps of prototype similarities (module doc).

    ``prep`` is the preprocessing that made the input: its per-channel bounds for pixels
    in [0, 1] bound the first layer's ZBox rule.
    Cost: one forward and one backward of a batch of N copies of the image.
    """

    def __init__(self, model: ProtoPNet, prep: Preprocessing, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.model = model
        self.low = (0.0 - mean) / std
        self.high = (1.0 - mean) / std
        self.batch_size = batch_size

    def _composite(self, latent: nn.Module):  # type: ignore[no-untyped-def]
        from zennit.composites import SpecialFirstLayerMapComposite
        from zennit.layer import Sum
        from zennit.rules import Epsilon, Norm, Pass, ZBox, ZPlus
        from zennit.types import Activation, AvgPool, Convolution
        from zennit.types import Linear as LinearType

        nobias = ["bias"]
        dev = self.model.ones.device
        return SpecialFirstLayerMapComposite(
            layer_map=[
                (Activation, Pass()),
                (Sum, Norm()),  # the canonizers' residual sums: shared by contribution
                (AvgPool, Norm()),
                (Convolution, ZPlus(zero_params=nobias)),
                (LinearType, Epsilon(zero_params=nobias)),
            ],
            first_map=[
                (Convolution, ZBox(self.low.to(dev), self.high.to(dev), zero_params=nobias))
            ],
            canonizers=_canonizers(latent),
        )

    def attribute(
        self,
        image: torch.Tensor,
        prototypes: Sequence[int],
        locations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image: (3, S, S) preprocessed; locations: (N, 2) latent (h, w) or None (each
        prototype's best cell). Returns (N, S, S) float relevance maps on the CPU, each
        summing to (about) its prototype's log similarity at that cell."""
        return self.relevance(image, prototypes, locations).sum(dim=1)

    def relevance(
        self,
        image: torch.Tensor,
        prototypes: Sequence[int],
        locations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``attribute``, per colour channel: (N, 3, S, S)."""
        model = self.model
        x = _check_inputs(model, image, prototypes)
        protos = [int(j) for j in prototypes]
        out = torch.zeros((len(protos), *x.shape[1:]))
        with _eval_mode(model):
            with torch.no_grad():
                d0 = model.distances(model.conv_features(x))[0]  # (P, H', W')
            idx = torch.tensor(protos, device=d0.device)
            cells = (_argmin_hw(d0[idx]) if locations is None else locations.long().cpu()).tolist()
            rel = _log_similarity(model, d0[idx, [c[0] for c in cells], [c[1] for c in cells]])
            latent = _Latent(model)
            with self._composite(latent).context(latent) as hooked:
                for start in range(0, len(protos), self.batch_size):
                    stop = min(start + self.batch_size, len(protos))
                    xb = x.expand(stop - start, -1, -1, -1).clone().requires_grad_(True)
                    z = hooked(xb)  # (n, D, H, W)
                    r_z = torch.cat(
                        [
                            prototype_relevance(
                                z[i - start : i - start + 1].detach(),
                                model.prototype_vectors[protos[i]].detach(),
                                (cells[i][0], cells[i][1]),
                                rel[i].detach().view(1),
                            )
                            for i in range(start, stop)
                        ]
                    )
                    (r_x,) = torch.autograd.grad(z, xb, grad_outputs=r_z)
                    out[start:stop] = r_x.float().cpu()
        return out
