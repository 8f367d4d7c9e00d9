"""The stages' inner loops: warm-up and joint SGD epochs, evaluation, the last layer.

Stage semantics (the paper's section 2.2 and the reference implementation):

- warm:  trunk frozen; add-on layers and prototypes trained; last layer fixed.
- joint: trunk, add-on layers and prototypes trained; last layer fixed.
- last:  only the last layer, on CE + l1 * L1(wrong-class weights), a convex problem
         because every similarity score is fixed; scores are computed once.

Loss terms are returned separately (CE, cluster, separation, average separation, L1).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from protopnet.errors import ProtoPNetError
from protopnet.losses import average_separation_cost, cluster_cost, last_layer_l1, separation_cost
from protopnet.model import ProtoPNet
from training.config import LearningRates, LossCoefficients

Stage = Literal["warm", "joint", "last"]


class DivergedError(ProtoPNetError):
    """The training loss became NaN or infinite."""


def set_stage(model: ProtoPNet, stage: Stage) -> None:
    """requires_grad per stage, so frozen parts cost no backward pass."""
    for p in model.features.parameters():
        p.requires_grad_(stage == "joint")
    for p in model.add_on_layers.parameters():
        p.requires_grad_(stage in ("warm", "joint"))
    model.prototype_vectors.requires_grad_(stage in ("warm", "joint"))
    model.last_layer.weight.requires_grad_(stage == "last")


def warm_optimizer(model: ProtoPNet, lr: LearningRates) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        [
            {
                "params": list(model.add_on_layers.parameters()),
                "lr": lr.warm_add_on,
                "weight_decay": lr.weight_decay,
            },
            {"params": [model.prototype_vectors], "lr": lr.warm_prototypes},
        ]
    )


def joint_optimizer(model: ProtoPNet, lr: LearningRates) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        [
            {
                "params": list(model.features.parameters()),
                "lr": lr.joint_features,
                "weight_decay": lr.weight_decay,
            },
            {
                "params": list(model.add_on_layers.parameters()),
                "lr": lr.joint_add_on,
                "weight_decay": lr.weight_decay,
            },
            {"params": [model.prototype_vectors], "lr": lr.joint_prototypes},
        ]
    )


def joint_lr_factor(joint_epoch: int, step_size: int, gamma: float) -> float:
    """Step decay: x gamma every ``step_size`` joint epochs (0-based epoch count)."""
    return gamma ** (joint_epoch // step_size)


def set_lr(opt: torch.optim.Optimizer, base: list[float], factor: float) -> None:
    for group, lr in zip(opt.param_groups, base, strict=True):
        group["lr"] = lr * factor


class TrainForward(nn.Module):
    """(B, 3, S, S) -> logits (B, K), min distances (B, P), for SGD (DDP wraps this).

    With ``amp`` the trunk and add-on layers run in reduced precision, but distances are
    computed in float32: ||z||^2 - 2 <z, p> + ||p||^2 cancels badly in 16 bits.
    """

    def __init__(self, model: ProtoPNet, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        amp = self.amp_dtype is not None
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=amp):
            z = m.conv_features(x)  # (B, D, H, W)
        # Float32 distances, not the float64 ``precise`` ones that evaluation, push and
        # the service use: on 2 CPU cores they made a step of tiny_cnn 1.8x slower and
        # of small_cnn with 2000 prototypes 1.26x (the demo's compact_cnn: no change),
        # and SGD has no use for the last digits at an exact match.
        d = m.distances(z.float(), precise=False)  # (B, P, H', W')
        min_d = d.flatten(2).amin(dim=2)  # (B, P)
        logits = m.last_layer(m.similarity(min_d))  # (B, K)
        return logits, min_d


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class LossTerms:
    loss: torch.Tensor
    ce: torch.Tensor
    cluster: torch.Tensor
    separation: torch.Tensor
    avg_separation: torch.Tensor
    l1: torch.Tensor


def loss_terms(
    model: ProtoPNet,
    logits: torch.Tensor,
    min_d: torch.Tensor,
    labels: torch.Tensor,
    coefs: LossCoefficients,
    stage: Stage,
    class_weights: torch.Tensor | None = None,
) -> LossTerms:
    """The loss and its terms; ``class_weights`` (K,) weigh each image's CE by its class
    (``balanced_class_weights``); the prototype terms are per image as in the paper."""
    ident = model.prototype_class_identity  # (P, K)
    ce = F.cross_entropy(logits, labels, weight=class_weights)
    clst = cluster_cost(min_d, labels, ident)
    sep = separation_cost(min_d, labels, ident)
    avg = average_separation_cost(min_d, labels, ident)
    l1 = last_layer_l1(model.last_layer.weight, ident)
    if stage == "last":
        loss = coefs.crs_ent * ce + coefs.l1 * l1
    else:
        loss = coefs.crs_ent * ce + coefs.clst * clst + coefs.sep * sep + coefs.l1 * l1
    return LossTerms(loss, ce, clst, sep, avg, l1)


class _Sums:
    """Running means of the loss terms and accuracy over an epoch; with ``num_classes``,
    also the confusion matrix (rows: true class, columns: predicted)."""

    def __init__(self, num_classes: int | None = None) -> None:
        self.total: dict[str, float] = {}
        self.n = 0
        self.correct = 0
        self.confusion = (
            torch.zeros(num_classes, num_classes, dtype=torch.int64) if num_classes else None
        )

    def add(self, terms: LossTerms, logits: torch.Tensor, labels: torch.Tensor) -> None:
        b = int(labels.shape[0])
        self.n += b
        pred = logits.argmax(dim=1)
        self.correct += int((pred == labels).sum())
        if self.confusion is not None:
            n = self.confusion.shape[0]
            cells = (labels * n + pred).cpu()
            self.confusion += torch.bincount(cells, minlength=n * n).view(n, n)
        for k in ("loss", "ce", "cluster", "separation", "avg_separation", "l1"):
            self.total[k] = self.total.get(k, 0.0) + float(getattr(terms, k).detach()) * b

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v / max(self.n, 1) for k, v in self.total.items()}
        out["accuracy"] = self.correct / max(self.n, 1)
        out["images"] = float(self.n)
        if self.confusion is not None:
            out["confusion"] = self.confusion.tolist()
        return out


def balanced_class_weights(counts: list[int]) -> torch.Tensor:
    """(K,) weights N / (K' * n_k) for classes with n_k training images (K' of them have
    any), so each class's images weigh N / K' in total; 0 for a class with none."""
    present = [n for n in counts if n > 0]
    total, k = sum(present), len(present)
    return torch.tensor([total / (k * n) if n > 0 else 0.0 for n in counts])


def class_report(confusion: list[list[int]], class_names: list[str]) -> dict[str, Any]:
    """Per class: test images, recall (the share of the class's images it was given:
    sensitivity) and precision (the share of its answers that were right); and the
    balanced accuracy, the mean recall over classes that have images. A rate with
    nothing to count (no image, or never predicted) is None."""
    k = len(class_names)
    images = [sum(confusion[t]) for t in range(k)]
    answers = [sum(confusion[t][p] for t in range(k)) for p in range(k)]
    recall = [confusion[c][c] / images[c] if images[c] else None for c in range(k)]
    precision = [confusion[c][c] / answers[c] if answers[c] else None for c in range(k)]
    per_class = [
        {"label": name, "images": images[c], "recall": recall[c], "precision": precision[c]}
        for c, name in enumerate(class_names)
    ]
    recalls = [r for r in recall if r is not None]
    return {
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "per_class": per_class,
    }


def _progress(loader: DataLoader, desc: str, enabled: bool) -> Iterator:
    return iter(tqdm(loader, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True))


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epoch(
    model: ProtoPNet,
    forward: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    coefs: LossCoefficients,
    stage: Stage,
    device: torch.device,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    desc: str = "train",
    class_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """One SGD epoch of the warm or joint stage; returns mean loss terms and accuracy."""
    set_stage(model, stage)
    forward.train()
    sums = _Sums()
    start = time.perf_counter()
    for x, y, _ in _progress(loader, desc, progress):
        x, y = _to(x, device, channels_last), y.to(device)
        logits, min_d = forward(x)  # (B, K), (B, P)
        terms = loss_terms(model, logits, min_d, y, coefs, stage, class_weights)
        if not math.isfinite(float(terms.loss.detach())):
            raise DivergedError(
                f"{desc}: the loss became {float(terms.loss.detach())}; lower the learning "
                "rates (train.lr.*) or the batch size and resume from the last checkpoint"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            terms.loss.backward()
            optimizer.step()
        sums.add(terms, logits.detach(), y)
    out = sums.result()
    out["seconds"] = time.perf_counter() - start
    out["images_per_s"] = out["images"] / max(out["seconds"], 1e-9)
    return out


@torch.inference_mode()
def evaluate(
    model: ProtoPNet,
    loader: DataLoader,
    coefs: LossCoefficients,
    device: torch.device,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
    confusion: bool = False,
) -> dict[str, Any]:
    """Accuracy and loss terms on unaugmented images, model in eval mode; with
    ``confusion``, the confusion matrix too (see ``class_report``)."""
    was_training = model.training
    model.eval()
    sums = _Sums(model.num_classes if confusion else None)
    try:
        for x, y, _ in _progress(loader, desc, progress):
            x, y = _to(x, device, channels_last), y.to(device)
            logits, min_d = model(x)
            sums.add(loss_terms(model, logits, min_d, y, coefs, "joint"), logits, y)
    finally:
        model.train(was_training)
    return sums.result()


@torch.inference_mode()
def collect_similarities(
    model: ProtoPNet,
    loader: DataLoader,
    device: torch.device,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "scores",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's prototype similarity scores (N, P) and labels (N,), on the CPU."""
    was_training = model.training
    model.eval()
    sims, labels = [], []
    try:
        for x, y, _ in _progress(loader, desc, progress):
            _, min_d = model(_to(x, device, channels_last))
            sims.append(model.similarity(min_d).float().cpu())  # (B, P)
            labels.append(y)
    finally:
        model.train(was_training)
    return torch.cat(sims), torch.cat(labels)


@contextlib.contextmanager
def _enable_grad() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


def train_last_layer(
    model: ProtoPNet,
    sims: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    coefs: LossCoefficients,
    batch_size: int = 256,
    seed: int = 0,
    class_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """The convex last-layer stage on fixed scores: Adam on CE + l1 * L1(wrong-class).

    sims: (N, P) similarity scores; labels: (N,); class_weights: (K,) for CE, or None.
    Returns the final epoch's mean terms.
    """
    weight = None if class_weights is None else class_weights.to(model.last_layer.weight.device)
    set_stage(model, "last")
    w = model.last_layer.weight
    device = w.device
    ident = model.prototype_class_identity  # (P, K)
    opt = torch.optim.Adam([w], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sims, labels = sims.to(device), labels.to(device)
    n = sims.shape[0]
    result: dict[str, float] = {}
    with _enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            tot = {"loss": 0.0, "ce": 0.0, "l1": 0.0}
            correct = 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                logits = F.linear(sims[idx], w)  # (b, K)
                ce = F.cross_entropy(logits, labels[idx], weight=weight)
                l1 = last_layer_l1(w, ident)
                loss = coefs.crs_ent * ce + coefs.l1 * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = int(idx.shape[0])
                tot["loss"] += float(loss.detach()) * b
                tot["ce"] += float(ce.detach()) * b
                tot["l1"] += float(l1.detach()) * b
                correct += int((logits.argmax(1) == labels[idx]).sum())
            result = {k: v / max(n, 1) for k, v in tot.items()}
            result["accuracy"] = correct / max(n, 1)
    w.requires_grad_(False)
    with torch.no_grad():
        result["wrong_class_weight_abs_mean"] = float(
            (w * (1 - ident.t())).abs().sum() / max(int((1 - ident.t()).sum()), 1)
        )
    return result
