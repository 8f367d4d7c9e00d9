"""The familiarity score against brute-force numpy: the fit's means and covariance, the
Mahalanobis score, percentiles and the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopnet import familiarity
from protopnet.errors import ShapeError
from protopnet.familiarity import RIDGE, Familiarity


def _data(seed: int = 0, n: int = 300, d: int = 5, k: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g) * 3
    mix = torch.randn(d, d, generator=g)  # correlated channels: the covariance matters
    x = centres[labels] + torch.randn(n, d, generator=g) @ mix
    held = centres[torch.arange(60) % k] + torch.randn(60, d, generator=g) @ mix
    return x, labels, held


def _brute_scores(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    out = []
    for v in x:
        best = min(float((v - m) @ precision @ (v - m)) for m in means)
        out.append(-np.sqrt(best))
    return np.array(out)


def test_the_fit_is_the_class_means_and_the_pooled_within_class_covariance() -> None:
    x, y, held = _data()
    fam = familiarity.fit(x, y, 3, held)
    X, Y = x.double().numpy(), y.numpy()
    means = np.stack([X[k == Y].mean(axis=0) for k in range(3)])
    centred = X - means[Y]
    cov = centred.T @ centred / (len(X) - 3)
    cov += RIDGE * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    np.testing.assert_allclose(fam.class_means.numpy(), means, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fam.precision.numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    assert fam.fitted_images == 300 and len(fam.validation_scores) == 60


def test_scores_are_minus_the_mahalanobis_distance_to_the_nearest_class_mean() -> None:
    x, y, held = _data(1)
    fam = familiarity.fit(x, y, 3, held)
    # (B, D, H', W') features whose mean over the grid is the vector scored.
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(7, 5, 3, 4, generator=g) * 4
    got = fam.scorer().scores(feats).numpy()
    pooled = feats.double().mean(dim=(2, 3)).numpy()
    want = _brute_scores(pooled, fam.class_means.double().numpy(), fam.precision.double().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The calibration scores are the held-out vectors' scores, ascending.
    cal = _brute_scores(
        held.double().numpy(), fam.class_means.double().numpy(), fam.precision.double().numpy()
    )
    np.testing.assert_allclose(fam.validation_scores.numpy(), np.sort(cal), rtol=1e-4, atol=1e-4)


def test_a_point_far_from_every_class_scores_below_every_held_out_image() -> None:
    x, y, held = _data(2)
    fam = familiarity.fit(x, y, 3, held)
    far = torch.full((1, 5, 1, 1), 100.0)
    score = float(fam.scorer().scores(far)[0])
    assert score < float(fam.validation_scores[0])
    assert fam.percentile(score) == 0.0
    assert score < fam.threshold(1.0)


def test_percentile_counts_the_held_out_scores_at_or_below() -> None:
    v = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0])
    fam = Familiarity(torch.zeros(1, 2), torch.eye(2), v)
    for s in [-6.0, -5.0, -4.5, -1.0, 0.0]:
        assert fam.percentile(s) == pytest.approx(100.0 * float((v <= s).float().mean()))
    assert fam.threshold(25.0) == pytest.approx(float(np.percentile(v.numpy(), 25.0)))
    assert fam.threshold(0.0) == -5.0


def test_the_tensors_round_trip() -> None:
    x, y, held = _data(3)
    fam = familiarity.fit(x, y, 3, held, fitted_on="train", calibrated_on="val")
    back = Familiarity.from_tensors(fam.tensors(), "train", 300, "val")
    assert torch.equal(back.validation_scores, fam.validation_scores)
    assert back.fitted_on == "train" and back.calibrated_on == "val"
    with pytest.raises(ShapeError, match="lack"):
        Familiarity.from_tensors({"class_means": fam.class_means}, "a", 1, "b")


def test_too_few_training_vectors_for_the_covariance_is_a_clear_error() -> None:
    with pytest.raises(ShapeError, match="need more than 8 images"):
        familiarity.fit(torch.randn(6, 8), torch.zeros(6, dtype=torch.long), 2, torch.randn(3, 8))
    with pytest.raises(ShapeError, match="do not fit"):
        Familiarity(torch.zeros(2, 3), torch.eye(4), torch.zeros(3))


def test_a_class_without_training_vectors_gets_no_mean() -> None:
    x, y, held = _data(4, k=3)
    fam = familiarity.fit(x, y, 5, held)  # classes 3 and 4 have no image
    assert fam.class_means.shape == (3, 5)
