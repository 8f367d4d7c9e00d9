"""An ensemble is one scoring sheet with more prototypes: summed logits."""

from __future__ import annotations

import pytest
import torch

from protopnet import ProtoPNetConfig, create_model
from protopnet.ensemble import ProtoPNetEnsemble


def member(backbone: str, img_size: int, per_class: int, classes: int = 3) -> torch.nn.Module:
    model = create_model(
        ProtoPNetConfig(
            backbone=backbone, num_classes=classes, prototypes_per_class=per_class,
            prototype_depth=8, img_size=img_size,
        )
    ).eval()  # fmt: skip
    with torch.no_grad():
        model.last_layer.weight.normal_()
    return model


def test_logits_are_the_sum_and_the_sheet_adds_up() -> None:
    a, b = member("tiny_cnn", 16, 2), member("small_cnn", 24, 1)
    ens = ProtoPNetEnsemble([a, b]).eval()
    xa, xb = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 24)  # each its own preprocessing
    with torch.no_grad():
        logits = ens([xa, xb])
        want = a(xa)[0] + b(xb)[0]
    torch.testing.assert_close(logits, want)
    sheets = ens.scoring_sheet([xa, xb])
    assert [s.shape for s in sheets] == [(2, 3, 6), (2, 3, 3)]
    total = sum(s.sum(dim=2) for s in sheets)  # over members and their prototypes
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-4)


def test_one_batch_is_shared_by_all_members() -> None:
    a, b = member("tiny_cnn", 16, 1), member("tiny_cnn", 16, 2)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ProtoPNetEnsemble([a, b])(x), a(x)[0] + b(x)[0])


def test_members_must_agree_on_classes_and_exist() -> None:
    with pytest.raises(ValueError, match=r"disagree on the number of classes: \[2, 3\]"):
        ProtoPNetEnsemble([member("tiny_cnn", 16, 1), member("tiny_cnn", 16, 1, classes=2)])
    with pytest.raises(ValueError, match="at least one model"):
        ProtoPNetEnsemble([])
    ens = ProtoPNetEnsemble([member("tiny_cnn", 16, 1), member("tiny_cnn", 16, 1)])
    with pytest.raises(ValueError, match="1 input batches for 2 members"):
        ens([torch.randn(1, 3, 16, 16)])
