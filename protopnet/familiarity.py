"""Familiarity: does anything in this image look like what the model learned from?

A ProtoPNet answers every image with its most similar prototypes, a cat photograph as
confidently as a shoe. The familiarity score says how far the image's latent features lie
from the training images': the Mahalanobis distance (Lee et al., NeurIPS 2018) of its
mean latent vector, z pooled over the (H', W') grid, to the nearest class mean, with one
covariance shared by the classes, fitted on the training split. The score is minus that
distance (higher: more familiar). It is calibrated on held-out images: a new image's
percentile is the share of validation images that scored at most as high, and an answer
is unfamiliar below a percentile the service sets (default 1: one validation image in a
hundred is called unfamiliar).

Why this score (``bench/faithfulness.py``, the demo model, 3000 Fashion-MNIST test
images against digits, photo crops, faces and noise): its AUROC is 0.998, where the
obvious scores that a ProtoPNet gives for free do worse: the top logit 0.95, the best
similarity of any prototype 0.86 and the answered class's best own prototype similarity
0.86 (on digits 0.71 and 0.76). Prototype similarities only say how close the single
best patch is, and dark, flat Fashion-MNIST background patches are close to a digit's;
the pooled features see the whole image. A k-nearest-neighbour distance between
similarity vectors came second (0.975) and needs the training vectors kept beside the
model; this needs a (K, D) mean and a (D, D) matrix. At the 1st percentile it calls
0.9 % of the test images unfamiliar, 76 % of the digits and 97-100 % of the rest.

Shapes: B images, D latent channels, K classes, M calibration images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from protopnet.errors import ShapeError
from protopnet.model import ProtoPNet

METHOD = "latent-mahalanobis"
DEFAULT_PERCENTILE = 1.0
RIDGE = 1e-4  # the shared covariance gets RIDGE x its mean variance on its diagonal


@dataclass(frozen=True)
class Familiarity:
    """A fitted and calibrated familiarity score for one model."""

    class_means: torch.Tensor  # (K, D) mean pooled latent vector per class
    precision: torch.Tensor  # (D, D) inverse of the shared within-class covariance
    validation_scores: torch.Tensor  # (M,) held-out images' scores, ascending
    fitted_on: str = "training split"  # where the means and covariance came from
    fitted_images: int = 0
    calibrated_on: str = "validation split"  # where validation_scores came from

    def __post_init__(self) -> None:
        D = self.class_means.shape[1]
        if self.precision.shape != (D, D) or self.validation_scores.dim() != 1:
            raise ShapeError(
                f"familiarity tensors do not fit: means {tuple(self.class_means.shape)}, "
                f"precision {tuple(self.precision.shape)}, "
                f"scores {tuple(self.validation_scores.shape)}"
            )
        if len(self.validation_scores) == 0:
            raise ShapeError("familiarity was calibrated on no image")

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the store keeps (safetensors)."""
        return {
            "class_means": self.class_means.float().contiguous(),
            "precision": self.precision.float().contiguous(),
            "validation_scores": self.validation_scores.float().contiguous(),
        }

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        fitted_on: str,
        fitted_images: int,
        calibrated_on: str,
    ) -> Familiarity:
        missing = {"class_means", "precision", "validation_scores"} - set(tensors)
        if missing:
            raise ShapeError(f"familiarity tensors lack {sorted(missing)}")
        t = tensors
        return cls(
            t["class_means"], t["precision"], t["validation_scores"],
            fitted_on, fitted_images, calibrated_on,
        )  # fmt: skip

    def scorer(self, device: torch.device | str = "cpu") -> FamiliarityScorer:
        return FamiliarityScorer(self.class_means, self.precision, torch.device(device))

    def percentile(self, score: float) -> float:
        """Share of validation images (in percent) that scored at most ``score``."""
        v = self.validation_scores.numpy()
        return float(100.0 * np.searchsorted(v, score, side="right") / len(v))

    def threshold(self, percentile: float) -> float:
        """The score below which an image is unfamiliar: the validation scores'
        ``percentile``-th percentile (numpy's linear interpolation)."""
        return float(np.percentile(self.validation_scores.double().numpy(), percentile))

    def summary(self) -> dict[str, float]:
        """The calibration's percentiles, for the manifest (people read them)."""
        v = self.validation_scores.double().numpy()
        return {f"p{q:g}": float(np.percentile(v, q)) for q in (1, 5, 50, 95)}


class FamiliarityScorer:
    """Scores batches on one device. The Mahalanobis distance is a Euclidean distance
    after whitening: with precision = L L^T (Cholesky), ||(z - mu) L||. The class means
    are whitened once here, so a batch costs one (B, D) x (D, D) product and a (B, K)
    distance matrix, in float64 (a covariance of features that vary little is badly
    conditioned, and float32 moved scores by 1e-3; at these sizes float64 costs nothing
    next to the forward)."""

    def __init__(self, class_means: torch.Tensor, precision: torch.Tensor, device: torch.device):
        L = torch.linalg.cholesky(precision.double())
        self.whiten = L.to(device)
        self.means = (class_means.double() @ L).to(device)  # (K, D)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, H', W') latent features -> (B,) float64 scores, on their device."""
        pooled = features.double().mean(dim=(2, 3))  # (B, D)
        return -torch.cdist(pooled @ self.whiten, self.means).amin(dim=1)


def pooled_features(
    model: ProtoPNet, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Preprocessed (B, 3, S, S) batches -> (N, D) mean latent vectors, on the CPU."""
    out = []
    with torch.no_grad():
        for x in batches:
            out.append(model.conv_features(x.to(device)).float().mean(dim=(2, 3)).cpu())
    if not out:
        return torch.zeros(0, model.config.prototype_depth)
    return torch.cat(out)


def fit(
    pooled: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    calibration: torch.Tensor,
    fitted_on: str = "training split",
    calibrated_on: str = "validation split",
) -> Familiarity:
    """Class means and the shared covariance from (N, D) training vectors and their true
    labels; the score's distribution from (M, D) held-out vectors.

    A class without a training vector gets no mean (its images cannot be called familiar
    by a mean that does not exist): the means of the classes present are kept.
    """
    if pooled.dim() != 2 or labels.shape != (pooled.shape[0],):
        raise ShapeError(f"expected (N, D) vectors and (N,) labels, got {tuple(pooled.shape)}")
    X, y = pooled.double(), labels.long()
    present = [k for k in range(num_classes) if bool((y == k).any())]
    if len(X) <= X.shape[1]:
        raise ShapeError(
            f"{len(X)} training vectors cannot fit a {X.shape[1]}-dimensional covariance: "
            f"need more than {X.shape[1]} images"
        )
    means = torch.stack([X[y == k].mean(dim=0) for k in present])  # (K', D)
    index = {k: i for i, k in enumerate(present)}
    centred = X - means[torch.tensor([index[int(k)] for k in y])]
    cov = centred.T @ centred / (len(X) - len(present))
    cov += RIDGE * float(cov.diagonal().mean()) * torch.eye(X.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    precision = (precision + precision.T) / 2  # exactly symmetric for the Cholesky
    # Scored with the float32 tensors the store keeps, so a loaded copy reproduces them.
    means, precision = means.float(), precision.float()
    scorer = FamiliarityScorer(means, precision, torch.device("cpu"))
    scores = scorer.scores(calibration.double()[:, :, None, None])
    return Familiarity(
        means, precision, scores.sort().values.float(), fitted_on, len(X), calibrated_on
    )
