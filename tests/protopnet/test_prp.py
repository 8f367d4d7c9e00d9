"""PRP maps: conservation on real trunks, one propagation against a hand-computed one on a
tiny model, the prototype layer's rule against a loop, and the red-square scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from protopnet import Preprocessing, ProtoPNet, ProtoPNetConfig, create_model
from protopnet.backbones import Trunk
from protopnet.explain import percentile_boxes
from protopnet.faithfulness import _log_similarity
from protopnet.preprocess import eval_transform
from protopnet.prp import PROTOTYPE_STABILISER, PRP, prototype_relevance
from tests.protopnet.scenes import PREP, red_square_image, texture_model


def _best_similarity(model: ProtoPNet, x: torch.Tensor, protos: list[int]) -> torch.Tensor:
    with torch.no_grad():
        d = model.distances(model.conv_features(x[None]))[0][protos]
    return _log_similarity(model, d.flatten(1).min(dim=1).values)


def _shuffle_batch_norms(model: nn.Module, seed: int) -> None:
    """Running statistics away from (0, 1), so merging them into the convolutions matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize(
    ("backbone", "size", "size_of_prototype"),
    [("tiny_cnn", 32, (1, 1)), ("tiny_cnn", 32, (2, 2)), ("resnet18", 64, (1, 1))],
)
def test_relevance_sums_to_the_similarity_it_explains(backbone, size, size_of_prototype) -> None:
    """Conservation: every rule passes on what it receives (biases are left out), so the
    map sums to the log similarity at the prototype's cell. resnet18 checks zennit's
    residual canonizer: with a plain + the sum would be inflated at every block."""
    torch.manual_seed(0)
    cfg = ProtoPNetConfig(
        backbone=backbone, num_classes=3, prototypes_per_class=2, prototype_depth=16,
        prototype_size=size_of_prototype, img_size=size,
    )  # fmt: skip
    model = create_model(cfg).eval()
    _shuffle_batch_norms(model, 1)
    x = torch.randn(3, size, size).clamp(-1.5, 1.5)
    protos = [0, 3, 5, 3]
    maps = PRP(model, Preprocessing(img_size=size), batch_size=3).attribute(x, protos)
    assert maps.shape == (4, size, size)
    want = _best_similarity(model, x, protos)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), want, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(maps[1], maps[3])  # the same prototype, the same map


def test_the_prototype_rule_against_a_loop() -> None:
    torch.manual_seed(3)
    z = torch.rand(2, 4, 3, 5, dtype=torch.float64)
    p = torch.rand(4, 2, 2, dtype=torch.float64)
    rel = torch.tensor([0.7, 2.0], dtype=torch.float64)
    got = prototype_relevance(z, p, (1, 2), rel)
    want = torch.zeros_like(z)
    for b in range(2):
        shares = {}
        for c in range(4):
            for a in range(2):
                for e in range(2):
                    diff = float(z[b, c, 1 + a, 2 + e] - p[c, a, e])
                    shares[c, a, e] = 1 / (diff**4 + PROTOTYPE_STABILISER)
        total = sum(shares.values())
        for (c, a, e), s in shares.items():
            want[b, c, 1 + a, 2 + e] = float(rel[b]) * s / total
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(dim=(1, 2, 3)), rel)


class _OneByOne(Trunk):
    """conv 1x1 (3 -> 2, with a bias the rules leave out), ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.out_channels = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _zplus(a: np.ndarray, w: np.ndarray, r_out: np.ndarray) -> np.ndarray:
    """LRP-alpha1-beta0 through a 1x1 convolution, one pixel: a (I,) >= 0 inputs, w (O, I),
    r_out (O,) -> (I,)."""
    wp = np.clip(w, 0, None)
    r_in = np.zeros_like(a)
    for o in range(w.shape[0]):
        z = sum(a[i] * wp[o, i] for i in range(len(a)))
        for i in range(len(a)):
            r_in[i] += a[i] * wp[o, i] / z * r_out[o]
    return r_in


def test_one_propagation_by_hand_on_a_tiny_model() -> None:
    """A 2 x 2 px image through conv-ReLU (trunk), conv-ReLU-conv-Sigmoid (add-on) and a
    1 x 1 prototype, every rule written out per pixel in numpy: the prototype rule at the
    best cell, Sigmoid and ReLU passing relevance on, ZPlus through the add-on's
    convolutions, ZBox with the preprocessing's bounds at the first."""
    torch.manual_seed(5)
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn", num_classes=1, prototypes_per_class=1, prototype_depth=2,
        add_on="regular", img_size=8,
    )  # fmt: skip
    model = ProtoPNet(cfg, _OneByOne()).eval()
    with torch.no_grad():
        model.add_on_layers[0].weight.copy_(
            torch.tensor([[1.0, -0.5], [0.3, 0.8]])[..., None, None]
        )
        model.add_on_layers[2].weight.copy_(
            torch.tensor([[0.6, 0.9], [-0.4, 1.1]])[..., None, None]
        )
        model.features.features[0].weight.copy_(torch.tensor(
            [[0.5, -0.2, 0.3], [0.1, 0.4, 0.6]])[..., None, None])  # fmt: skip
    prep = Preprocessing(img_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.tensor(
        [[[0.9, -1.2], [0.3, 2.0]], [[-0.5, 0.8], [1.1, -1.5]], [[0.2, 0.6], [-2.0, 0.4]]]
    )
    got = PRP(model, prep).relevance(x, [0])[0].double().numpy()  # (3, 2, 2)

    W1 = model.features.features[0].weight.detach().double().numpy()[:, :, 0, 0]
    b1 = model.features.features[0].bias.detach().double().numpy()
    A1 = model.add_on_layers[0].weight.detach().double().numpy()[:, :, 0, 0]
    a1b = model.add_on_layers[0].bias.detach().double().numpy()
    A2 = model.add_on_layers[2].weight.detach().double().numpy()[:, :, 0, 0]
    a2b = model.add_on_layers[2].bias.detach().double().numpy()
    p = model.prototype_vectors.detach().double().numpy()[0, :, 0, 0]
    xs = x.double().numpy()
    low = (0 - np.array(prep.mean)) / np.array(prep.std)
    high = (1 - np.array(prep.mean)) / np.array(prep.std)
    # Forward, pixel by pixel, keeping what the rules need.
    t, u, z = {}, {}, {}
    for h in range(2):
        for w in range(2):
            t[h, w] = np.maximum(W1 @ xs[:, h, w] + b1, 0)
            u[h, w] = np.maximum(A1 @ t[h, w] + a1b, 0)
            z[h, w] = 1 / (1 + np.exp(-(A2 @ u[h, w] + a2b)))
    d = {k: float(((v - p) ** 2).sum()) for k, v in z.items()}
    cell = min(d, key=d.__getitem__)
    sim = np.log((d[cell] + 1) / (d[cell] + cfg.epsilon))
    want = np.zeros((3, 2, 2))
    share = 1 / (((z[cell] - p) ** 2) ** 2 + PROTOTYPE_STABILISER)
    r_z = sim * share / share.sum()  # the prototype rule; then Sigmoid passes it on
    r_u = _zplus(u[cell], A2, r_z)  # ReLU passes it on
    r_t = _zplus(t[cell], A1, r_u)  # the trunk's ReLU passes it on
    # ZBox at the first layer: x W - low W+ - high W-, bias left out.
    Wp, Wm = np.clip(W1, 0, None), np.clip(W1, None, 0)
    zb = xs[:, cell[0], cell[1]] * W1 - low * Wp - high * Wm  # (O, I)
    want[:, cell[0], cell[1]] = (zb / zb.sum(axis=1, keepdims=True) * r_t[:, None]).sum(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert abs(got.sum() - sim) < 1e-4 * sim


def test_prp_box_lands_on_the_red_square() -> None:
    """The texture model's prototype 0 is "red": its PRP box on a red square is on it."""
    model = texture_model()
    image = eval_transform(PREP)(red_square_image(64, 64, (32, 0, 64, 32)))  # (3, 32, 32)
    maps = PRP(model, PREP).attribute(image, [0])
    x0, y0, x1, y1 = percentile_boxes(maps, 95.0)[0].tolist()
    # The square is (16, 0)-(32, 16) on the 32 px input.
    assert x0 >= 12 and y1 <= 20, (x0, y0, x1, y1)


def test_prp_leaves_the_model_as_it_found_it() -> None:
    model = texture_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = eval_transform(PREP)(red_square_image(32, 32, (0, 0, 16, 16)))
    PRP(model, PREP).attribute(image, [0, 1])
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # zennit's hooks and the canonizers' replaced forwards are gone.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="batch_size"):
        PRP(model, PREP, batch_size=0)


def test_efficientnet_relevance_is_not_inflated_by_its_skip_connections() -> None:
    """EfficientNet-Lite's blocks add with +; without the canonizer's Sum each skip would
    hand the full relevance to both summands (measured: 69 000 times the similarity at
    224 px). Its merged batch norms carry large shifts that the rules leave out, so part of
    the relevance stops at bias-driven activations: the map sums to at most the similarity."""
    torch.manual_seed(0)
    cfg = ProtoPNetConfig(
        backbone="efficientnet_lite0", num_classes=2, prototypes_per_class=1,
        prototype_depth=8, img_size=64,
    )  # fmt: skip
    model = create_model(cfg).eval()
    _shuffle_batch_norms(model, 2)
    x = torch.randn(3, 64, 64).clamp(-1, 1)
    maps = PRP(model, Preprocessing(img_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)).attribute(
        x, [0, 1]
    )
    total, sim = maps.sum(dim=(1, 2)), _best_similarity(model, x, [0, 1])
    assert torch.isfinite(maps).all() and (total > 0).all() and (total <= sim * 1.001).all(), (
        total,
        sim,
    )
