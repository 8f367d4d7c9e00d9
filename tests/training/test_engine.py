"""The stages' inner pieces: which parameters train in which stage, the convex last layer."""

from __future__ import annotations

import pytest
import torch

from protopnet.config import ProtoPNetConfig
from protopnet.model import create_model
from training import engine
from training.config import LossCoefficients
from training.engine import set_stage, train_last_layer


def _model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_model(
        ProtoPNetConfig(
            backbone="tiny_cnn",
            num_classes=3,
            prototypes_per_class=2,
            prototype_depth=8,
            img_size=16,
        )
    )


def test_each_stage_trains_only_its_parameters() -> None:
    model = _model()
    groups = {
        "features": list(model.features.parameters()),
        "add_on": list(model.add_on_layers.parameters()),
        "prototypes": [model.prototype_vectors],
        "last": [model.last_layer.weight],
    }
    expected = {
        "warm": {"add_on", "prototypes"},
        "joint": {"features", "add_on", "prototypes"},
        "last": {"last"},
    }
    for stage, trainable in expected.items():
        set_stage(model, stage)  # type: ignore[arg-type]
        for name, params in groups.items():
            assert all(p.requires_grad == (name in trainable) for p in params), (stage, name)


def test_last_layer_l1_drives_wrong_class_weights_to_zero_and_keeps_accuracy() -> None:
    """Scores where each class's own prototypes light up: with the L1 term, the convex
    stage keeps the predictions and shrinks the -0.5 wrong-class connections."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    classes = model.prototype_classes
    sims = 0.5 * torch.rand(300, 6, generator=g)
    sims += 4.0 * (classes.view(1, -1) == labels.view(-1, 1)).float()  # (N, P)
    ident = model.prototype_class_identity
    wrong = (1 - ident.t()).bool()  # (K, P)
    before = model.last_layer.weight.detach()[wrong].abs().mean()
    out = train_last_layer(model, sims, labels, epochs=60, lr=0.01, coefs=LossCoefficients(l1=0.05))
    w = model.last_layer.weight.detach()
    assert out["accuracy"] == 1.0
    assert float(w[wrong].abs().mean()) < 0.1 * float(before)
    assert float(w[~wrong].min()) > 0.5  # own-class connections stay positive
    assert not model.last_layer.weight.requires_grad
    # Without the L1 term nothing pushes the wrong-class weights towards zero.
    model2 = _model()
    train_last_layer(model2, sims, labels, epochs=60, lr=0.01, coefs=LossCoefficients(l1=0.0))
    assert float(model2.last_layer.weight.detach()[wrong].abs().mean()) > 0.3


def test_class_report_against_counting_by_hand() -> None:
    # True classes 0, 0, 0, 1, 1 predicted as 0, 1, 0, 1, 1; class 2 has no image and
    # is never predicted: its rates have nothing to count.
    confusion = [[2, 1, 0], [0, 2, 0], [0, 0, 0]]
    report = engine.class_report(confusion, ["a", "b", "c"])
    assert report["per_class"] == [
        {"label": "a", "images": 3, "recall": 2 / 3, "precision": 1.0},
        {"label": "b", "images": 2, "recall": 1.0, "precision": 2 / 3},
        {"label": "c", "images": 0, "recall": None, "precision": None},
    ]
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_balanced_weights_count_every_class_alike() -> None:
    w = engine.balanced_class_weights([90, 10, 0])
    assert w.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 0.0])
    assert [float(w[0]) * 90, float(w[1]) * 10] == pytest.approx([50.0, 50.0])  # N / K' each
    labels = torch.tensor([0] * 90 + [1] * 10)
    # The weighted CE is the weighted mean of the images' CE, counted by hand.
    model = _model()
    logits = torch.randn(100, 3, generator=torch.Generator().manual_seed(1))
    min_d = torch.rand(100, 6)
    terms = engine.loss_terms(model, logits, min_d, labels, LossCoefficients(), "joint", w)
    each = -logits.log_softmax(1)[torch.arange(100), labels]
    assert float(terms.ce) == pytest.approx(float((w[labels] * each).sum() / w[labels].sum()))


def test_balanced_last_layer_finds_the_rare_class() -> None:
    """900 common and 100 rare images whose scores overlap: plain CE buys accuracy by
    giving the rare class up; balanced weights keep most of it, at the common class's
    expense, the trade a screening model is trained for."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 900 + [1] * 100)
    sims = torch.zeros(1000, 6)
    sims[:, 0] = torch.where(labels == 0, 1.0, 0.4) + 0.5 * torch.randn(1000, generator=g)
    sims[:, 2] = torch.where(labels == 1, 1.0, 0.4) + 0.5 * torch.randn(1000, generator=g)

    def recalls(weights: torch.Tensor | None) -> tuple[float, float]:
        model = _model()
        with torch.no_grad():
            model.last_layer.weight.zero_()
        train_last_layer(
            model, sims, labels, epochs=40, lr=0.05, coefs=LossCoefficients(l1=0.0),
            class_weights=weights,
        )  # fmt: skip
        pred = (sims @ model.last_layer.weight.detach().t()).argmax(1)
        return tuple(float((pred[labels == c] == c).float().mean()) for c in (0, 1))

    (common, rare) = recalls(None)
    (common_b, rare_b) = recalls(engine.balanced_class_weights([900, 100, 0]))
    assert rare_b > rare + 0.25 and common_b > 0.6, (common, rare, common_b, rare_b)
