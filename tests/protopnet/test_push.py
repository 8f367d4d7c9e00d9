"""Push's streaming nearest-patch search against an exhaustive search over every patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopnet import ProtoPNetConfig, create_model
from protopnet.model import l2_distances
from protopnet.push import NearestPatchSearch
from tests.protopnet.reference import patch_distances


def exhaustive_nearest(
    feats: np.ndarray,
    labels: list[int],
    protos: np.ndarray,
    classes: list[int],
    class_specific: bool,
) -> list[tuple[float, int, int, int]]:
    """For every prototype: (distance, image, h, w) of the nearest eligible patch, or
    (inf, -1, 0, 0) when no image is eligible. Loops over images, rows, columns."""
    d = patch_distances(feats, protos)  # (N, P, H', W')
    out = []
    for j, c in enumerate(classes):
        best = (float("inf"), -1, 0, 0)
        for n, y in enumerate(labels):
            if class_specific and y != c:
                continue
            for h in range(d.shape[2]):
                for w in range(d.shape[3]):
                    if d[n, j, h, w] < best[0]:
                        best = (float(d[n, j, h, w]), n, h, w)
        out.append(best)
    return out


def stream(
    search: NearestPatchSearch,
    feats: torch.Tensor,
    labels: torch.Tensor,
    protos: torch.Tensor,
    batch_sizes: list[int],
) -> None:
    start = 0
    for bs in batch_sizes:
        sl = slice(start, start + bs)
        d = l2_distances(feats[sl], protos)
        search.update(d, feats[sl], labels[sl], torch.arange(start, start + bs) + 100)
        start += bs
    assert start == feats.shape[0]


@pytest.mark.parametrize("proto_size", [(1, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("class_specific", [True, False])
def test_streamed_search_equals_exhaustive_search(
    proto_size: tuple[int, int], class_specific: bool
) -> None:
    h1, w1 = proto_size
    N, D, H, W = 10, 5, 4, 5
    feats = torch.rand(N, D, H, W, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0, 0, 2])
    classes = [0, 0, 1, 2, 2, 1]
    protos = torch.rand(len(classes), D, h1, w1, dtype=torch.float64)
    search = NearestPatchSearch(torch.tensor(classes), (D, h1, w1), class_specific)
    stream(search, feats, labels, protos, [3, 1, 4, 2])
    res = search.result()
    ref = exhaustive_nearest(
        feats.numpy(), labels.tolist(), protos.numpy(), classes, class_specific
    )
    for j, (dist, n, h, w) in enumerate(ref):
        assert float(res.distance[j]) == pytest.approx(dist, rel=1e-5, abs=1e-6)
        assert int(res.image_index[j]) == n + 100  # dataset indices, not batch positions
        assert res.patch_hw[j].tolist() == [h, w]
        # The stored vector is the latent patch itself ...
        np.testing.assert_allclose(
            res.vector[j].numpy(), feats[n, :, h : h + h1, w : w + w1].numpy(), rtol=1e-6
        )
        # ... and the stored map is the prototype's distance map over its source image.
        src = patch_distances(feats[n : n + 1].numpy(), protos[j : j + 1].numpy())[0, 0]
        np.testing.assert_allclose(res.distance_map[j].numpy(), src, rtol=1e-5, atol=1e-6)
        if class_specific:
            assert int(labels[n]) == classes[j]
    assert res.missing() == []


def test_class_without_images_is_reported_missing_not_zeroed() -> None:
    feats = torch.rand(4, 3, 3, 3)
    labels = torch.tensor([0, 0, 1, 1])  # no image of class 2
    classes = torch.tensor([0, 1, 2, 2, 1])
    protos = torch.rand(5, 3, 1, 1)
    search = NearestPatchSearch(classes, (3, 1, 1))
    stream(search, feats, labels, protos, [2, 2])
    res = search.result()
    assert res.missing() == [2, 3]
    assert bool(torch.isinf(res.distance[[2, 3]]).all())
    assert res.image_index[[2, 3]].tolist() == [-1, -1]
    assert bool(torch.isfinite(res.distance[[0, 1, 4]]).all())


def test_empty_dataset_is_a_clear_error() -> None:
    search = NearestPatchSearch(torch.tensor([0, 1]), (3, 1, 1))
    with pytest.raises(ValueError, match="push saw no images"):
        search.result()


def test_push_through_a_real_model_puts_each_prototype_on_its_patch() -> None:
    """After push, every prototype's own source image has distance ~0 at the recorded cell,
    and its similarity there is the maximum, log(1 / eps)."""
    model = create_model(
        ProtoPNetConfig(
            backbone="tiny_cnn",
            num_classes=3,
            prototypes_per_class=2,
            prototype_depth=8,
            prototype_size=(2, 1),
            img_size=16,
        )
    ).eval()
    images = torch.randn(9, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    search = NearestPatchSearch(model.prototype_classes, (8, 2, 1))
    with torch.no_grad():
        for start in range(0, 9, 4):
            out = model.forward_full(images[start : start + 4])
            search.update(
                out.distances, out.features, labels[start : start + 4], torch.arange(start, 9)[:4]
            )
        res = search.result()
        model.prototype_vectors.copy_(res.vector)
        for j in range(model.num_prototypes):
            n = int(res.image_index[j])
            assert int(labels[n]) == int(model.prototype_classes[j])
            d = model.forward_full(images[n : n + 1]).distances[0, j]
            h, w = res.patch_hw[j].tolist()
            assert float(d[h, w]) < 1e-4
            sim = model.similarity(d[h, w])
            assert float(sim) > 8.0  # close to the maximum, 9.21
