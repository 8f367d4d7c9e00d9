"""Receptive-field arithmetic against the empirical field: the input pixels whose
gradient is nonzero for one latent cell, with every weight positive so no path cancels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from protopnet import ProtoPNetConfig, create_backbone, create_model
from protopnet.receptive_field import ReceptiveField, compute_receptive_field, layer_geometry


def positive_linear_copy(module: nn.Module) -> nn.Module:
    """A float64 copy in which every path from input to output adds up positively:
    convs average their inputs (weights 1 / fan_in, zero bias), batch norms are the
    identity, max pools become average pools of the same geometry (a max passes gradient
    to one pixel only, which would shrink the measured field), and with positive inputs
    every ReLU passes everything."""
    m = copy.deepcopy(module).double().eval()
    for child in list(m.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.MaxPool2d):
                setattr(
                    child,
                    attr,
                    nn.AvgPool2d(sub.kernel_size, sub.stride, sub.padding, sub.ceil_mode),  # type: ignore[arg-type]
                )
        if isinstance(child, nn.Conv2d):
            fan_in = child.weight[0].numel()
            with torch.no_grad():
                child.weight.fill_(1.0 / fan_in)
                if child.bias is not None:
                    child.bias.zero_()
        elif isinstance(child, nn.BatchNorm2d):
            child.reset_parameters()  # running mean 0, var 1, weight 1, bias 0
            child.eps = 1e-12  # x / sqrt(1 + eps): the identity, as near as torch allows
    return m


def empirical_boxes(
    module: nn.Module,
    img_size: int,
    cells: list[tuple[int, int]],
    window: int | tuple[int, int] = 1,
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Grid side (along the width) and, per latent cell (h, w), the bounding box
    (x0, y0, x1, y1) of input pixels with nonzero gradient of the sum over the
    window (h1 x w1, or a side for a square one) of latent cells at (h, w)."""
    wh, ww = window if isinstance(window, tuple) else (window, window)
    m = positive_linear_copy(module)
    x = torch.ones(len(cells), 3, img_size, img_size, dtype=torch.float64, requires_grad=True)
    out = m(x)  # (B, C, H, W); each image's cell is independent of the others'
    total = sum(out[b, :, h : h + wh, w : w + ww].sum() for b, (h, w) in enumerate(cells))
    total.backward()  # type: ignore[union-attr]
    assert x.grad is not None
    boxes = []
    for b in range(len(cells)):
        nz = x.grad[b].abs().sum(dim=0) > 0  # (H_img, W_img)
        ys, xs = torch.nonzero(nz, as_tuple=True)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return out.shape[-1] - ww + 1, boxes


def check(module: nn.Module, img_size: int, rf: ReceptiveField, window: int = 1) -> None:
    n = rf.size
    cells = [(0, 0), (n // 2, n // 3), (n - 1, n - 1)]
    grid, boxes = empirical_boxes(module, img_size, cells, window)
    assert rf.size == grid
    for (h, w), box in zip(cells, boxes, strict=True):
        assert rf.box(h, w, img_size) == box, f"cell {(h, w)}"


@pytest.mark.parametrize(("name", "img_size"), [("tiny_cnn", 40), ("small_cnn", 45)])
def test_small_cnns_match_the_empirical_field(name: str, img_size: int) -> None:
    trunk = create_backbone(name, None, img_size)
    rf = compute_receptive_field(layer_geometry(trunk), img_size)
    assert rf.field < img_size  # some cells see only part of the image: a real check
    check(trunk, img_size, rf)


def test_small_cnn_known_values() -> None:
    trunk = create_backbone("small_cnn", None, 28)
    rf = compute_receptive_field(layer_geometry(trunk), 28)
    # Three blocks of two 3x3 convs, two 2x2 pools: 1 + 4 + 1 + 8 + 2 + 16 = 32 px, jump 4.
    assert (rf.size, rf.jump, rf.field) == (7, 4.0, 32.0)


def test_vgg11_matches_the_empirical_field() -> None:
    trunk = create_backbone("vgg11", None, 160)
    rf = compute_receptive_field(layer_geometry(trunk), 160)
    assert (rf.size, rf.jump, rf.field) == (5, 32.0, 150.0)
    check(trunk, 160, rf)


def test_resnet_stem_to_layer2_matches_the_empirical_field() -> None:
    """The full resnet18 field (435 px) exceeds any cheap test image; its first stages
    (field 99 px) are checked unclipped, then the whole trunk at a small size."""
    trunk = create_backbone("resnet18", None, 64)
    parts = nn.Sequential(
        trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2
    )
    rf = compute_receptive_field(layer_geometry(parts), 128)
    assert (rf.size, rf.jump, rf.field) == (16, 8.0, 99.0)
    check(parts, 128, rf)
    full = compute_receptive_field(layer_geometry(trunk), 64)
    assert (full.size, full.jump, full.field) == (2, 32.0, 435.0)
    check(trunk, 64, full)


@pytest.mark.parametrize("window", [(2, 2), (3, 1), (1, 2)])
def test_model_receptive_field_includes_the_prototype_window(window: tuple[int, int]) -> None:
    """Through the add-on layers and an h1 x w1 prototype window on tiny_cnn: rows and
    columns get their own field when the window is not square."""
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn", num_classes=2, prototype_depth=4, prototype_size=window, img_size=40
    )
    model = create_model(cfg)
    pf = model.receptive_field()
    h1, w1 = window
    # 20 latent cells, a 14 px field and a 2 px jump per extra cell of the window.
    assert pf.grid == (21 - h1, 21 - w1)
    assert (pf.rows.field, pf.cols.field) == (14.0 + 2 * (h1 - 1), 14.0 + 2 * (w1 - 1))
    cells = [(0, 0), (pf.grid[0] // 2, pf.grid[1] // 3), (pf.grid[0] - 1, pf.grid[1] - 1)]
    trunk = nn.Sequential(model.features, model.add_on_layers)
    grid_w, boxes = empirical_boxes(trunk, 40, cells, window)
    assert grid_w == pf.grid[1]
    for (h, w), box in zip(cells, boxes, strict=True):
        assert pf.box(h, w, 40) == box, f"cell {(h, w)}"


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("resnet18", [64, 65, 100]),
        ("densenet121", [64, 97]),
        ("vgg11", [64, 70]),
        ("efficientnet_lite0", [64, 100]),
    ],
)
def test_grid_size_matches_the_trunk_output(name: str, sizes: list[int]) -> None:
    for s in sizes:
        trunk = create_backbone(name, None, s).eval()
        with torch.no_grad():
            out = trunk(torch.zeros(1, 3, s, s))
        assert compute_receptive_field(layer_geometry(trunk), s).size == out.shape[-1], s


def test_vgg19_at_224_gives_7x7_and_268_px() -> None:
    trunk = create_backbone("vgg19", None, 224)
    rf = compute_receptive_field(layer_geometry(trunk), 224)
    assert (rf.size, rf.jump, rf.field) == (7, 32.0, 268.0)
