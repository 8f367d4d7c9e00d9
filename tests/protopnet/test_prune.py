"""The pruning rule (k = 6 nearest images, tau = 3) and prototype removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopnet import ProtoPNetConfig, create_model
from protopnet.prune import KNearestImages, prototypes_to_prune
from tests.protopnet.reference import logits_from_min_distances, patch_distances


def brute_force_prune(
    min_d: np.ndarray, labels: list[int], classes: list[int], k: int, tau: int
) -> tuple[list[list[float]], list[list[int]], list[int]]:
    """Sort every image by distance for each prototype, count own-class images in the
    first k, and list the prototypes with fewer than tau."""
    dists, labs, prune = [], [], []
    for j, c in enumerate(classes):
        order = sorted(range(len(labels)), key=lambda n: min_d[n, j])[:k]
        dists.append([float(min_d[n, j]) for n in order])
        labs.append([labels[n] for n in order])
        if sum(1 for n in order if labels[n] == c) < tau:
            prune.append(j)
    return dists, labs, prune


def test_k_nearest_images_and_pruning_rule_match_brute_force() -> None:
    N, K, k, tau = 40, 4, 6, 3
    classes = [0, 0, 1, 1, 2, 2, 3, 3]
    labels = torch.randint(0, K, (N,))
    # Make half the prototypes close to their own class so both outcomes occur.
    min_d = torch.rand(N, len(classes)) * 10
    for j in range(0, len(classes), 2):
        own = labels == classes[j]
        min_d[own, j] *= 0.2
    knn = KNearestImages(len(classes), k=k)
    for start in (0, 5, 6, 19, 33):  # uneven batches, one of a single image
        end = {0: 5, 5: 6, 6: 19, 19: 33, 33: 40}[start]
        knn.update(min_d[start:end], labels[start:end])
    dists, labs, ref_prune = brute_force_prune(min_d.numpy(), labels.tolist(), classes, k, tau)
    np.testing.assert_allclose(knn.distance.numpy(), np.array(dists), rtol=1e-6)
    assert knn.labels.tolist() == labs
    got = prototypes_to_prune(knn.labels, torch.tensor(classes), tau=tau)
    assert got == ref_prune
    assert 0 < len(got) < len(classes)  # the test exercises both keep and prune


def test_equal_distances_go_to_the_earlier_image_in_any_batching() -> None:
    """Images 1 to 4 are equally near the prototype and k = 2 holds image 0 and one of
    them: the earliest, image 1 (label 1), whether they come in one batch or one by one.
    (An untrained model's distances to a pushed prototype tied exactly like this.)"""
    d = torch.tensor([[0.5], [1.0], [1.0], [1.0], [1.0]])  # (N, P = 1)
    labels = torch.tensor([0, 1, 2, 3, 4])
    for batch in (5, 2, 1):
        knn = KNearestImages(1, k=2)
        for i in range(0, 5, batch):
            knn.update(d[i : i + batch], labels[i : i + batch])
        assert knn.labels.tolist() == [[0, 1]], batch
        assert knn.distance.tolist() == [[0.5, 1.0]]


def test_pruning_rule_threshold_is_strictly_fewer_than_tau() -> None:
    nearest = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert prototypes_to_prune(nearest, torch.tensor([0, 0, 1]), tau=3) == [1]


def test_fewer_images_than_k_keeps_all_of_them() -> None:
    knn = KNearestImages(2, k=6)
    knn.update(torch.tensor([[3.0, 1.0], [2.0, 5.0]]), torch.tensor([1, 0]))
    assert knn.distance.tolist() == [[2.0, 3.0], [1.0, 5.0]]
    assert knn.labels.tolist() == [[0, 1], [1, 0]]


def test_prune_prototypes_removes_rows_and_columns_and_keeps_the_sheet() -> None:
    cfg = ProtoPNetConfig(
        backbone="tiny_cnn", num_classes=3, prototypes_per_class=3, prototype_depth=5, img_size=16
    )
    model = create_model(cfg).eval()
    with torch.no_grad():
        model.last_layer.weight.normal_()
    before_v = model.prototype_vectors.detach().clone()
    before_w = model.last_layer.weight.detach().clone()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = model.conv_features(x).double().numpy()
    drop = [1, 4, 5, 8]
    keep = [0, 2, 3, 6, 7]
    model.prune_prototypes(drop)
    assert model.num_prototypes == 5
    assert torch.equal(model.prototype_vectors.detach(), before_v[keep])
    assert torch.equal(model.last_layer.weight.detach(), before_w[:, keep])
    assert model.ones.shape == (5, 5, 1, 1)
    assert model.prototype_classes.tolist() == [0, 0, 1, 2, 2]
    assert model.config.prototype_classes == (0, 0, 1, 2, 2)
    assert model.config.num_prototypes == 5
    # Logits of the pruned model = the scoring sheet of the remaining prototypes only.
    with torch.no_grad():
        logits, _ = model(x)
    ref_min = patch_distances(z, before_v[keep].double().numpy()).reshape(2, 5, -1).min(axis=2)
    ref = logits_from_min_distances(ref_min, before_w[:, keep].double().numpy(), "log")
    np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-3, atol=1e-3)
    # The updated config rebuilds a model that takes the pruned state_dict unchanged.
    rebuilt = create_model(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.prototype_classes.tolist() == [0, 0, 1, 2, 2]
    # Gradients still reach the new parameters (training continues after pruning).
    model.train()
    model(x)[0].sum().backward()
    assert model.prototype_vectors.grad is not None


def test_prune_prototypes_rejects_bad_indices_and_pruning_everything() -> None:
    model = create_model(
        ProtoPNetConfig(backbone="tiny_cnn", num_classes=2, prototypes_per_class=2, img_size=16)
    )
    with pytest.raises(ValueError, match=r"\[7\] outside 0..3"):
        model.prune_prototypes([0, 7])
    assert model.num_prototypes == 4  # a refused call changes nothing
    with pytest.raises(ValueError, match="every prototype"):
        model.prune_prototypes([0, 1, 2, 3])
    assert model.num_prototypes == 4
