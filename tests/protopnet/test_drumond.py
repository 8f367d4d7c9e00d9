"""Drumond et al.'s soft-max prototype model against loops written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from protopnet.backbones import create_backbone
from protopnet.drumond import DrumondNet, PrototypeSoftmax, fit_head, kmeans_prototypes


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def loop_forward(x: list[float], P: list[list[float]], W: list[list[float]]):
    """q_j = softmax_j(-||x - p_j||^2 / 2) and c_l = softmax_l(w_l . q), the slow way."""
    q = softmax([-sum((a - b) ** 2 for a, b in zip(x, p, strict=True)) / 2 for p in P])
    c = softmax([sum(w_j * q_j for w_j, q_j in zip(w, q, strict=True)) for w in W])
    return q, c


def loop_loss(X, y, P, W, alpha: float, kind: str) -> float:
    ce = [-math.log(loop_forward(x, P, W)[1][label]) for x, label in zip(X, y, strict=True)]
    flat = [a for row in W for a in row]
    pen = sum(abs(a) for a in flat) if kind == "l1" else sum(a * a for a in flat)
    return sum(ce) / len(ce) + alpha * pen


@pytest.fixture
def head() -> PrototypeSoftmax:
    torch.manual_seed(0)
    h = PrototypeSoftmax(num_prototypes=5, num_classes=3, dim=4).double()
    with torch.no_grad():
        h.prototypes.copy_(torch.randn(5, 4, dtype=torch.float64) * 1.5)
        h.class_weights.copy_(torch.randn(3, 5, dtype=torch.float64))
    return h


def test_q_and_c_match_the_formulas(head: PrototypeSoftmax) -> None:
    x = torch.randn(6, 4, dtype=torch.float64) * 2
    logits, q = head(x)
    c = torch.softmax(logits, 1)
    P, W = head.prototypes.tolist(), head.class_weights.tolist()
    for b in range(6):
        q_ref, c_ref = loop_forward(x[b].tolist(), P, W)
        assert q[b].tolist() == pytest.approx(q_ref, rel=1e-12)
        assert c[b].tolist() == pytest.approx(c_ref, rel=1e-12)


def test_q_stays_exact_far_from_the_origin(head: PrototypeSoftmax) -> None:
    # Embeddings of ImageNet trunks have norms in the tens: dropping ||x||^2 (same for every
    # prototype) must not change q.
    x = torch.randn(3, 4, dtype=torch.float64) + 40.0
    with torch.no_grad():
        head.prototypes.add_(40.0)
    _, q = head(x)
    for b in range(3):
        assert q[b].tolist() == pytest.approx(
            loop_forward(x[b].tolist(), head.prototypes.tolist(), head.class_weights.tolist())[0],
            rel=1e-9,
        )


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_the_loss_and_its_gradient_match_the_loop(head: PrototypeSoftmax, kind: str) -> None:
    X = torch.randn(7, 4, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    alpha = 0.05
    loss = head.loss(X, y, alpha, kind)  # type: ignore[arg-type]
    loss.backward()
    Xl, yl = X.tolist(), y.tolist()
    P, W = head.prototypes.tolist(), head.class_weights.tolist()
    assert float(loss.detach()) == pytest.approx(loop_loss(Xl, yl, P, W, alpha, kind), rel=1e-12)
    # Central differences of the loop's loss, parameter by parameter.
    h = 1e-6
    for name, table, grad in (("p", P, head.prototypes.grad), ("w", W, head.class_weights.grad)):
        assert grad is not None
        for i, row in enumerate(table):
            for k in range(len(row)):
                old = row[k]
                row[k] = old + h
                up = loop_loss(Xl, yl, P, W, alpha, kind)
                row[k] = old - h
                down = loop_loss(Xl, yl, P, W, alpha, kind)
                row[k] = old
                assert float(grad[i, k]) == pytest.approx((up - down) / (2 * h), abs=1e-7), (
                    name,
                    i,
                    k,
                )


def test_fewer_prototypes_than_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least num_classes"):
        PrototypeSoftmax(num_prototypes=2, num_classes=3, dim=4)


def test_kmeans_initialisation_finds_the_clusters() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(20, 2, generator=g) for c in centres])
    found = kmeans_prototypes(x, 3)
    dist = torch.cdist(centres, found)
    assert (dist.min(1).values < 0.5).all(), found


def test_a_prototype_can_serve_two_classes() -> None:
    # Classes 0 and 1 share one blob of the embedding space; class 2 has its own. With
    # two prototypes, the shared one must carry weight for both classes and the model must
    # be unsure between them there, sure of class 2 on its blob.
    g = torch.Generator().manual_seed(2)
    a = torch.tensor([0.0, 0.0]) + 0.3 * torch.randn(30, 2, generator=g)
    b = torch.tensor([6.0, 0.0]) + 0.3 * torch.randn(15, 2, generator=g)
    x = torch.cat([a, b])
    y = torch.tensor([0] * 15 + [1] * 15 + [2] * 15)
    head = fit_head(x, y, num_classes=3, num_prototypes=3, alpha=1e-3, penalty="l2")
    with torch.no_grad():
        logits, q = head(x)
        c = torch.softmax(logits, 1)
    shared = int(q[:30].mean(0).argmax())
    w = head.class_weights[:, shared]
    assert w[0] > w[2] and w[1] > w[2], w
    assert c[:30, :2].max(1).values.median() < 0.7  # ambiguous between 0 and 1
    assert (c[30:].argmax(1) == 2).all()


def test_a_frozen_trunk_gets_no_gradient_a_fine_tuned_one_does() -> None:
    for train_trunk in (False, True):
        torch.manual_seed(0)
        net = DrumondNet(create_backbone("tiny_cnn"), 4, 2, train_trunk=train_trunk)
        images = torch.rand(3, 3, 32, 32)
        logits, q = net(images)
        assert logits.shape == (3, 2) and q.shape == (3, 4)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0])).backward()
        grads = [p.grad for p in net.features.parameters()]
        assert all(g is None for g in grads) is (not train_trunk)
        assert net.head.prototypes.grad is not None


def test_matched_prototypes_are_the_fewest_to_the_mass_and_ambiguity_weighs_neighbourhoods() -> (
    None
):
    import numpy as np

    from protopnet.drumond import matched_prototypes, neighbourhood_classes

    q = np.array([0.05, 0.5, 0.3, 0.15])
    shares = np.array([[1.0, 0.0], [1.0, 0.0], [0.2, 0.8], [0.0, 0.0]])  # last: empty
    matched = matched_prototypes(q, shares, limit=10, mass=0.9)
    assert [m.index for m in matched] == [1, 2, 3]  # 0.5 + 0.3 < 0.9, + 0.15 >= 0.9
    assert [m.index for m in matched_prototypes(q, shares, limit=2)] == [1, 2]
    assert [m.index for m in matched_prototypes(q, shares, limit=10, mass=0.5)] == [1]
    # The empty neighbourhood carries no weight: (0.5 * 1 + 0.3 * 0.2) / (0.5 + 0.3).
    assert neighbourhood_classes(matched).tolist() == pytest.approx([0.56 / 0.8, 0.24 / 0.8])
    empty = matched_prototypes(np.array([1.0]), np.zeros((1, 2)), limit=1)
    assert neighbourhood_classes(empty).tolist() == [0.0, 0.0]
