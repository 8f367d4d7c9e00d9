"""Deletion test, SmoothGrad maps and prototype-collapse check against loops and a model
whose prototype is a known texture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protopnet import ProtoPNetConfig, ShapeError, create_model
from protopnet.explain import percentile_boxes, place_maps
from protopnet.faithfulness import (
    FAITHFUL_SHARE,
    SmoothGrad,
    _random_boxes,
    collapsed_prototypes,
    deletion_scores,
    deletion_test,
    receipts,
    upsampled_input_maps,
)
from protopnet.preprocess import eval_transform
from protopnet.push import NearestPatchSearch
from tests.protopnet.scenes import IMG, PREP, red_square_image, texture_model

# A 64 x 64 photo with a red square at (32, 0)-(64, 32): (16, 0)-(32, 16) in input pixels,
# wider than tiny_cnn's 14 px receptive field, so some latent cells see only red.
SQUARE = (32, 0, 64, 32)
SQUARE_IN = (16, 0, 32, 16)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return texture_model()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return eval_transform(PREP)(red_square_image(64, 64, SQUARE))  # (3, 32, 32)


def log_sim(d: float, eps: float = 1e-4) -> float:
    return math.log((d + 1) / (d + eps))


# ---------------------------------------------------------------------------------------
# Deletion


def test_deletion_matches_one_image_at_a_time(model: torch.nn.Module, image: torch.Tensor) -> None:
    protos = [0, 3, 5, 0]
    boxes = torch.tensor([[16, 4, 28, 16], [0, 0, 10, 10], [5, 20, 31, 32], [0, 0, 32, 32]])
    res = deletion_scores(model, image, protos, boxes, batch_size=3)  # two batches
    with torch.no_grad():
        d_clean = model.forward_full(image[None]).distances[0]  # (P, H', W')
    for i, j in enumerate(protos):
        flat = d_clean[j].flatten()
        k = int(flat.argmin())
        h, w = k // d_clean.shape[2], k % d_clean.shape[2]
        assert res.locations[i].tolist() == [h, w]
        assert float(res.before[i]) == pytest.approx(log_sim(float(flat[k])), rel=1e-5)
        blanked = image.clone()
        x0, y0, x1, y1 = boxes[i].tolist()
        for y in range(y0, y1):
            for x in range(x0, x1):
                blanked[:, y, x] = 0.0  # the preprocessing's mean after normalisation
        with torch.no_grad():
            d = model.forward_full(blanked[None]).distances[0, j, h, w]
        assert float(res.after[i]) == pytest.approx(log_sim(float(d)), rel=1e-5)
        assert float(res.ratio[i]) == pytest.approx(float(res.after[i] / res.before[i]))
    assert res.prototypes == protos


def test_true_box_is_far_more_faithful_than_a_wrong_box(
    model: torch.nn.Module, image: torch.Tensor
) -> None:
    """Prototype 0 is the red texture: blanking the red square kills its similarity,
    blanking an equally large grey box elsewhere does not."""
    true_box, wrong_box = list(SQUARE_IN), [0, 16, 16, 32]  # same size, bottom left
    res = deletion_scores(model, image, [0, 0], torch.tensor([true_box, wrong_box]))
    assert float(res.before[0]) > 8.0  # the square holds the exact texture
    true_ratio, wrong_ratio = res.ratio.tolist()
    assert true_ratio < 0.3
    assert wrong_ratio > 0.95
    assert true_ratio < 0.3 * wrong_ratio


def test_deletion_boxes_are_clipped_and_checked(
    model: torch.nn.Module, image: torch.Tensor
) -> None:
    res = deletion_scores(model, image, [1], torch.tensor([[-5, -5, 100, 40]]))
    assert res.boxes.tolist() == [[0, 0, 32, 32]]
    with pytest.raises(ShapeError, match=r"expected \(2, 4\) boxes for 2 prototypes"):
        deletion_scores(model, image, [0, 1], torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[6\] outside 0..5"):
        deletion_scores(model, image, [6], torch.zeros(1, 4))
    with pytest.raises(ShapeError, match=r"\(3, S, S\), got \(2, 3, 32, 32\)"):
        deletion_scores(model, torch.stack([image, image]), [0], torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------
# SmoothGrad


def test_smoothgrad_matches_per_sample_gradients(
    model: torch.nn.Module, image: torch.Tensor
) -> None:
    sg = SmoothGrad(model, samples=3, noise=0.1, batch_size=4, seed=7)
    protos = [0, 2, 5]
    maps = sg.attribute(image, protos)
    assert maps.shape == (3, IMG, IMG) and float(maps.min()) >= 0.0
    # Same noise (captum's draw: torch.normal from the global generator, seeded), one
    # image and one prototype at a time, by autograd, summed by loops.
    sigma = 0.1 * float(image.max() - image.min())
    with torch.random.fork_rng():
        torch.manual_seed(7)
        noise = torch.normal(0, torch.tensor(sigma).repeat((3, 3, IMG, IMG)))
    with torch.no_grad():
        d_clean = model.forward_full(image[None]).distances[0]
    for i, j in enumerate(protos):
        k = int(d_clean[j].flatten().argmin())
        h, w = k // d_clean.shape[2], k % d_clean.shape[2]
        acc = torch.zeros(IMG, IMG)
        for s in range(3):
            x = (image + noise[s]).unsqueeze(0).requires_grad_(True)
            d = model.forward_full(x).distances[0, j, h, w]
            sim = torch.log((d + 1) / (d + 1e-4))
            (g,) = torch.autograd.grad(sim, x)
            acc += g[0].abs().sum(dim=0)
        # float32 convs differ slightly between batch sizes: 1e-3 relative.
        torch.testing.assert_close(maps[i], acc / 3, rtol=1e-3, atol=1e-5)


def test_smoothgrad_leaves_the_model_as_it_found_it(
    model: torch.nn.Module, image: torch.Tensor
) -> None:
    model.train()
    try:
        SmoothGrad(model, samples=2).attribute(image, [0])
        assert model.training  # restored after running in eval mode
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())  # no gradients accumulated
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    again = SmoothGrad(model, samples=2).attribute(image, [0])
    torch.testing.assert_close(again, SmoothGrad(model, samples=2).attribute(image, [0]))


def test_smoothgrad_box_lands_on_the_red_square(
    model: torch.nn.Module, image: torch.Tensor
) -> None:
    """Input-resolution maps go through the explainer's own placement and box code."""
    maps = SmoothGrad(model, samples=8).attribute(image, [0])
    x0, y0, x1, y1 = percentile_boxes(maps)[0].tolist()
    sx0, sy0, sx1, sy1 = SQUARE_IN
    assert sx0 - 2 <= x0 < x1 <= sx1 + 2 and sy0 - 2 <= y0 < y1 <= sy1 + 2
    # Same maps on the original 64 x 64 image, through place_maps like the explainer's.
    canvas, window = place_maps(maps, (64, 64), (64, 64), PREP)
    assert canvas.shape == (1, 64, 64) and window == (0, 0, 64, 64)
    bx0, by0, bx1, by1 = percentile_boxes(canvas)[0].tolist()
    assert SQUARE[0] - 4 <= bx0 < bx1 <= SQUARE[2] + 4
    assert SQUARE[1] - 4 <= by0 < by1 <= SQUARE[3] + 4


def test_deletion_test_compares_map_kinds(model: torch.nn.Module, image: torch.Tensor) -> None:
    up = upsampled_input_maps(model, image, [0])
    sg = SmoothGrad(model, samples=8).attribute(image, [0])
    assert up.shape == sg.shape == (1, IMG, IMG)
    for maps in (up, sg):
        res = deletion_test(model, image, [0], maps)
        assert float(res.ratio[0]) < 0.5  # both find the red square here
    with pytest.raises(ShapeError, match="pass maps at input resolution"):
        deletion_test(model, image, [0], torch.zeros(1, 16, 16))
    with pytest.raises(ShapeError, match="one per prototype"):
        deletion_test(model, image, [0, 1], up)


def test_smoothgrad_rejects_bad_settings(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        SmoothGrad(model, samples=0)
    with pytest.raises(ValueError, match=r"noise must be >= 0.*got -0.1"):
        SmoothGrad(model, noise=-0.1)


# ---------------------------------------------------------------------------------------
# Prototype collapse


def brute_force_pairs(v: torch.Tensor, classes: list[int], tol: float) -> list[tuple[int, int]]:
    out = []
    flat = v.flatten(1).double().numpy()
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            if classes[i] == classes[j] and float(np.sum((flat[i] - flat[j]) ** 2)) <= tol:
                out.append((i, j))
    return sorted(out, key=lambda p: (classes[p[0]], p))


def test_collapsed_pairs_match_brute_force() -> None:
    classes = [0, 0, 0, 1, 1, 2, 1, 0]
    v = torch.rand(8, 16, 1, 2)
    v[1] = v[0]  # exact duplicates (same push patch)
    v[7] = v[0]
    v[6] = v[3] + 1e-4  # near duplicate: squared distance 32 * 1e-8
    v[5] = v[0]  # same vector, other class: not a collapse
    got = collapsed_prototypes(v, torch.tensor(classes))
    assert [(p.first, p.second) for p in got] == brute_force_pairs(v, classes, 1e-6)
    assert [(p.class_index, p.first, p.second) for p in got] == [
        (0, 0, 1), (0, 0, 7), (0, 1, 7), (1, 3, 6)
    ]  # fmt: skip
    assert got[0].distance == 0.0 and got[3].distance == pytest.approx(32e-8, rel=1e-3)
    assert collapsed_prototypes(v, torch.tensor(classes), max_distance=0.0)[-1].class_index == 0
    with pytest.raises(ShapeError, match="8 prototype vectors but 3 classes"):
        collapsed_prototypes(v, torch.tensor([0, 1, 2]))


def test_push_onto_a_plain_image_collapses_its_class() -> None:
    """Class 0's two prototypes learnt the same concept (both near plain grey) and its only
    training image is plain grey: push projects both onto the same grey texture, which the
    check reports; class 1's prototypes, pushed onto varied images, stay distinct."""
    model = create_model(
        ProtoPNetConfig(
            backbone="tiny_cnn", num_classes=2, prototypes_per_class=2, prototype_depth=8,
            img_size=IMG,
        )
    ).eval()  # fmt: skip
    grey = eval_transform(PREP)(red_square_image(IMG, IMG, (0, 0, 0, 0)))
    images = torch.stack([grey, torch.randn(3, IMG, IMG), torch.randn(3, IMG, IMG)])
    labels = torch.tensor([0, 1, 1])
    search = NearestPatchSearch(model.prototype_classes, (8, 1, 1))
    with torch.no_grad():
        out = model.forward_full(images)
        grey_latent = out.features[0, :, 8, 8].view(1, 8, 1, 1)  # an interior cell
        model.prototype_vectors[:2] = grey_latent + 0.01 * torch.randn(2, 8, 1, 1)
        out = model.forward_full(images)
        search.update(out.distances, out.features, labels, torch.arange(3))
        model.prototype_vectors.copy_(search.result().vector)
    pairs = collapsed_prototypes(model.prototype_vectors, model.prototype_classes)
    assert [(p.class_index, p.first, p.second) for p in pairs] == [(0, 0, 1)]


# ---------------------------------------------------------------------------------------
# The receipt


def test_a_receipt_confirms_the_box_on_the_part_and_doubts_one_elsewhere() -> None:
    """Prototype 0 is "red": blanking the red square takes its match away (a low ratio,
    well below random boxes of that size), blanking a grey corner leaves it whole."""
    model = texture_model()
    x = eval_transform(PREP)(red_square_image(32, 32, (10, 10, 22, 22)))
    with torch.no_grad():
        d = model.distances(model.conv_features(x[None]))[0, 0]
    idx = int(d.flatten().argmin())
    cell = torch.tensor([[idx // d.shape[1], idx % d.shape[1]]])
    on, corner = (
        receipts(model, x, [0], torch.tensor([box]), cell, seed=7)[0]
        for box in ([10, 10, 22, 22], [0, 0, 8, 8])
    )
    assert on.deletion_ratio < 0.3 and on.verdict == "faithful"
    assert on.deletion_ratio <= FAITHFUL_SHARE * on.random_deletion_ratio
    assert corner.deletion_ratio == pytest.approx(1.0, abs=1e-3)
    assert corner.verdict == "doubtful"
    # The box's own ratio is the deletion test's; the same seed, the same answer.
    plain = deletion_scores(model, x, [0], torch.tensor([[10, 10, 22, 22]]), cell)
    assert on.deletion_ratio == pytest.approx(float(plain.ratio[0]), rel=1e-5)
    again = receipts(model, x, [0], torch.tensor([[10, 10, 22, 22]]), cell, seed=7)[0]
    assert again == on


def test_random_boxes_keep_the_size_and_stay_inside() -> None:
    boxes = torch.tensor([[3, 4, 13, 9], [0, 0, 32, 32], [30, 30, 32, 32]])
    rand = _random_boxes(boxes, 32, 32, 50, seeds=[3, 4, 5])
    assert rand.shape == (3, 50, 4)
    assert ((rand[..., 2] - rand[..., 0]) == (boxes[:, 2] - boxes[:, 0])[:, None]).all()
    assert ((rand[..., 3] - rand[..., 1]) == (boxes[:, 3] - boxes[:, 1])[:, None]).all()
    assert (rand[..., :2] >= 0).all() and (rand[..., 2] <= 32).all() and (rand[..., 3] <= 32).all()
    assert len({tuple(b) for b in rand[0].tolist()}) > 10  # placed all over
    assert torch.equal(rand, _random_boxes(boxes, 32, 32, 50, seeds=[3, 4, 5]))
    # A box's placements depend on its own seed only, not on the others asked with it.
    assert torch.equal(rand[1], _random_boxes(boxes[1:2], 32, 32, 50, seeds=[4])[0])
