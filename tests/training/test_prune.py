"""Pruning against a brute-force reference: k nearest images per prototype, tau rule."""

from __future__ import annotations

import pytest
import torch

from protopnet.preprocess import eval_transform
from tests.training.helpers import PREP, model_and_images
from training.prune import PruneError, prune, reindex_records
from training.push import push_prototypes


def brute_force_prune(model, images, k: int, tau: int, batch: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The k nearest images by sorting, the tau rule by counting. The distances come from
    forwards over the same batches as prune's: this untrained model's distances all lie
    within 1e-3 of each other, 1e-7 apart at the k-th, and a forward's last bits depend
    on its batch size, so other batches could order near-ties otherwise."""
    tf = eval_transform(PREP)
    x = torch.stack([tf(images.load(i)) for i in range(len(images))])
    with torch.no_grad():
        min_d = torch.cat([model(x[i : i + batch])[1] for i in range(0, len(x), batch)])  # (N, P)
    drop = []
    for j in range(model.num_prototypes):
        order = sorted(range(len(images)), key=lambda i: float(min_d[i, j]))[:k]
        own = sum(images.labels[i] == int(model.prototype_classes[j]) for i in order)
        if own < tau:
            drop.append(j)
    return drop


@pytest.mark.parametrize(("k", "tau"), [(6, 3), (4, 2), (5, 1)])
def test_prune_matches_brute_force_and_keeps_the_rest(k: int, tau: int) -> None:
    model, images = model_and_images(num_classes=3, seed=1)
    pushed = push_prototypes(model, images, PREP, visualize=False)
    expected = brute_force_prune(model, images, k, tau, batch=5)
    assert len(expected) < model.num_prototypes
    w_before = model.last_layer.weight.detach().clone()
    protos_before = model.prototype_vectors.detach().clone()
    classes_before = model.prototype_classes.clone()
    result = prune(model, images, PREP, k=k, tau=tau, batch_size=5)
    assert result.pruned == expected
    keep = [j for j in range(len(classes_before)) if j not in set(expected)]
    assert model.num_prototypes == len(keep)
    assert torch.equal(model.prototype_vectors.detach(), protos_before[keep])
    assert torch.equal(model.last_layer.weight.detach(), w_before[:, keep])
    assert model.prototype_classes.tolist() == classes_before[keep].tolist()
    assert model.config.classes_of_prototypes() == classes_before[keep].tolist()
    records, maps = reindex_records(pushed.records, pushed.activation_maps, result.pruned)
    assert [r.index for r in records] == list(range(len(keep)))
    assert [r.source_image_id for r in records] == [pushed.records[j].source_image_id for j in keep]
    assert maps is not None and torch.equal(maps, pushed.activation_maps[keep])


def test_pruning_everything_is_refused() -> None:
    model, images = model_and_images(num_classes=3, seed=1)
    # Labelled as a class no prototype has, no image is ever of a prototype's own class.
    before = model.prototype_vectors.detach().clone()
    with pytest.raises(PruneError, match="would remove all 6 prototypes"):
        prune(model, _relabel(images, 5), PREP, k=3, tau=1)
    assert torch.equal(model.prototype_vectors.detach(), before)


def _relabel(images, label: int):  # type: ignore[no-untyped-def]
    """A view of ``images`` whose every label is ``label`` (no prototype's class)."""
    view = images.subset(range(len(images)))
    view.labels = [label] * len(view.labels)
    return view
