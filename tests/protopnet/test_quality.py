"""Prototype quality figures against brute-force loops on tiny cases."""

from __future__ import annotations

import numpy as np
import torch

from protopnet.explain import percentile_boxes, upsample_maps
from protopnet.preprocess import eval_transform
from protopnet.quality import (
    CONSISTENT_SHARE,
    NOISE_STD,
    box_agreement,
    consistency,
    duplicate_of,
    last_layer_sparsity,
    patch_flatness,
)
from tests.protopnet.scenes import PREP, red_square_image, texture_model


def test_duplicates_by_source_patch_or_vector() -> None:
    v = torch.rand(5, 3, 1, 1)
    v[4] = v[1]  # the same vector, sources unknown
    sources = [("a", (1, 2)), ("b", (0, 0)), ("a", (1, 2)), ("a", (2, 1)), (None, None)]
    assert duplicate_of(sources, v) == [None, None, 0, None, 1]


def test_flatness_is_the_luminance_std() -> None:
    flat = np.full((6, 6, 3), 17, dtype=np.uint8)
    assert patch_flatness(flat) < 1e-12
    rng = np.random.default_rng(0)
    p = rng.integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    lum = [
        0.299 * p[y, x, 0] / 255 + 0.587 * p[y, x, 1] / 255 + 0.114 * p[y, x, 2] / 255
        for y in range(5)
        for x in range(7)
    ]
    assert abs(patch_flatness(p) - float(np.std(lum))) < 1e-12


def test_sparsity_is_the_own_class_share_of_weight_mass() -> None:
    w = torch.tensor([[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]])  # (K=2, P=3)
    classes = torch.tensor([0, 1, 1])
    own = abs(1.0) + abs(2.0) + abs(-1.0)
    assert abs(last_layer_sparsity(w, classes) - own / 4.7) < 1e-7  # float32 weights


def _brute_force(model, images, labels, points, seed):
    """Per image of each prototype's class, one at a time: the box of the clean and the
    noisy copy (the same noise draws as box_agreement's, class by class, batch by batch);
    which visible parts are inside each; per prototype its most frequent part's share."""
    classes = model.prototype_class_identity.argmax(dim=1)
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    stable = {j: [] for j in range(len(classes))}
    held = {j: [] for j in range(len(classes))}  # per image: the tuple of parts inside
    for k in torch.unique(labels_t).tolist():
        idx = torch.nonzero(labels_t == k).flatten()
        noise = NOISE_STD * torch.randn(images[idx].shape, generator=g)  # one batch
        for n, i in enumerate(idx.tolist()):
            for j in torch.nonzero(classes == k).flatten().tolist():
                answers = []
                for x in (images[i], images[i] + noise[n]):
                    with torch.no_grad():
                        d = model.distances(model.conv_features(x[None]))[0, j]
                    m = upsample_maps(model.similarity(d)[None].float(), (32, 32))
                    x0, y0, x1, y1 = percentile_boxes(m)[0].tolist()
                    inside = tuple(
                        bool(v > 0 and x0 <= px < x1 and y0 <= py < y1) for px, py, v in points[i]
                    )
                    answers.append(inside)
                held[j].append(answers[0])
                stable[j].append(answers[0] == answers[1])
    share = {
        j: max(np.mean([h[q] for h in hs]) for q in range(len(points[0]))) if hs else None
        for j, hs in held.items()
    }
    return stable, share


def test_stability_and_part_share_against_one_image_at_a_time() -> None:
    model = texture_model()
    tf = eval_transform(PREP)
    rng = np.random.default_rng(1)
    points, xs, labels = [], [], []
    for n in range(9):
        x0, y0 = (int(v) for v in rng.integers(0, 40, size=2))
        # Input pixels: the square's centre, a corner of it, and a part not visible.
        c = ((x0 + 12) / 2, (y0 + 12) / 2)
        points.append([[c[0], c[1], 1.0], [x0 / 2 + 1, y0 / 2 + 1, 1.0], [c[0], c[1], 0.0]])
        xs.append(tf(red_square_image(64, 64, (x0, y0, x0 + 24, y0 + 24))))
        labels.append(n % 3)
    images = torch.stack(xs)
    got = box_agreement(model, images, labels, torch.tensor(points), seed=4, batch_size=64)
    stable, share = _brute_force(model, images, labels, points, seed=4)
    for j in range(model.num_prototypes):
        assert got.images[j] == len(stable[j]) == 3
        assert abs(got.stability[j] - np.mean(stable[j])) < 1e-6
        assert abs(got.part_share[j] - share[j]) < 1e-6
    # Prototype 0 is "red": its box holds the red square on its class's images.
    assert got.part_share[0] == 1.0
    # Without part boxes, stability is whether the best cell survives the noise.
    plain = box_agreement(model, images, labels, None, seed=4, batch_size=64)
    assert plain.part_share == [None] * model.num_prototypes
    assert all(0.0 <= s <= 1.0 for s in plain.stability if s is not None)


def test_consistency_counts_prototypes_over_the_threshold() -> None:
    assert consistency([1.0, CONSISTENT_SHARE, 0.5, None]) == 2 / 3
    assert consistency([None, None]) is None
