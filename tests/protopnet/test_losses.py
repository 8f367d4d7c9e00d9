"""Training-objective terms against explicit loops over images and prototypes."""

from __future__ import annotations

import pytest
import torch

from protopnet.losses import (
    average_separation_cost,
    cluster_cost,
    last_layer_l1,
    separation_cost,
)
from protopnet.model import class_identity


def loop_costs(
    min_d: list[list[float]], labels: list[int], classes: list[int]
) -> tuple[float, float, float]:
    """(cluster, separation, average separation) the slow way, images without any other-class
    prototype left out of the separation terms."""
    clst, sep, avg = [], [], []
    for b, y in enumerate(labels):
        own = [min_d[b][j] for j, c in enumerate(classes) if c == y]
        other = [min_d[b][j] for j, c in enumerate(classes) if c != y]
        clst.append(min(own))
        if other:
            sep.append(min(other))
            avg.append(sum(other) / len(other))
    return sum(clst) / len(clst), sum(sep) / len(sep), sum(avg) / len(avg)


@pytest.mark.parametrize("classes", [[0, 0, 1, 1, 2, 2], [2, 0, 1, 0, 2, 2, 1], [0, 1, 2]])
def test_cluster_separation_and_average_separation_match_loops(classes: list[int]) -> None:
    B, K = 9, 3
    min_d = torch.rand(B, len(classes), dtype=torch.float64) * 10
    labels = torch.randint(0, K, (B,))
    ident = class_identity(classes, K).double()
    c_ref, s_ref, a_ref = loop_costs(min_d.tolist(), labels.tolist(), classes)
    assert float(cluster_cost(min_d, labels, ident)) == pytest.approx(c_ref, rel=1e-12)
    assert float(separation_cost(min_d, labels, ident)) == pytest.approx(s_ref, rel=1e-12)
    assert float(average_separation_cost(min_d, labels, ident)) == pytest.approx(a_ref, rel=1e-12)


def test_cluster_cost_ignores_other_classes_and_separation_ignores_own() -> None:
    classes = [0, 0, 1]
    ident = class_identity(classes, 2)
    min_d = torch.tensor([[5.0, 3.0, 0.5]])  # the closest prototype is of the other class
    labels = torch.tensor([0])
    assert float(cluster_cost(min_d, labels, ident)) == 3.0
    assert float(separation_cost(min_d, labels, ident)) == 0.5


def test_separation_skips_images_whose_class_owns_every_prototype() -> None:
    ident = class_identity([0, 0], 2)  # class 1 has no prototype; class 0 owns all
    min_d = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    labels = torch.tensor([0, 1])
    # Image 0 has no other-class prototype: only image 1 counts (min 3.0).
    assert float(separation_cost(min_d, labels, ident)) == 3.0
    assert float(separation_cost(min_d[:1], labels[:1], ident)) == 0.0


def test_cluster_skips_images_whose_class_has_no_prototype() -> None:
    ident = class_identity([0, 0], 2)  # every prototype of class 1 was pruned
    min_d = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    assert float(cluster_cost(min_d, torch.tensor([0, 1]), ident)) == 1.0
    assert float(cluster_cost(min_d[1:], torch.tensor([1]), ident)) == 0.0


def test_costs_are_differentiable_towards_the_right_prototypes() -> None:
    ident = class_identity([0, 1], 2)
    min_d = torch.tensor([[2.0, 1.0]], requires_grad=True)
    cluster_cost(min_d, torch.tensor([0]), ident).backward()
    assert min_d.grad is not None and min_d.grad.tolist() == [[1.0, 0.0]]


def test_last_layer_l1_counts_only_wrong_class_connections() -> None:
    classes = [0, 1, 1, 2]
    ident = class_identity(classes, 3)
    w = torch.randn(3, 4, dtype=torch.float64)
    ref = sum(abs(float(w[k, j])) for k in range(3) for j, c in enumerate(classes) if c != k)
    assert float(last_layer_l1(w, ident.double())) == pytest.approx(ref, rel=1e-12)
    # The reference initialisation has 8 wrong-class weights of -0.5 here: L1 = 4.
    init = torch.where(ident.t().bool(), 1.0, -0.5)
    assert float(last_layer_l1(init, ident)) == 4.0
