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
