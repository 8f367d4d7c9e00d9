"""Ensembles (the paper's section 4): several trained ProtoPNets whose logits add up,
i.e. one scoring sheet with every member's prototypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from protokit.devices import pick_device
from protopnet.ensemble import ProtoPNetEnsemble
from protopnet.errors import ProtoPNetError
from protopnet.preprocess import eval_transform
from training.data import ImageSet, build_splits
from training.run import LoadedCheckpoint, read_checkpoint


class EnsembleError(ProtoPNetError):
    """Members that cannot be combined."""


class _PerMember(Dataset[tuple[list[torch.Tensor], int]]):
    """Each image preprocessed once per member (their preprocessing may differ)."""

    def __init__(self, images: ImageSet, transforms: list):
        self.images, self.transforms = images, transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        img: Image.Image = self.images.load(i)
        return [t(img) for t in self.transforms], self.images.labels[i]


@torch.inference_mode()
def evaluate_ensemble(
    members: list[tuple[Path, str]], split: str = "test", batch_size: int = 100
) -> dict[str, Any]:
    """Accuracy of each member and of their summed logits on the first member's split."""
    loaded: list[LoadedCheckpoint] = [read_checkpoint(d, tag) for d, tag in members]
    names = loaded[0].class_names
    for (d, tag), ck in zip(members, loaded, strict=True):
        if ck.class_names != names:
            raise EnsembleError(
                f"{d}:{tag} has classes {ck.class_names[:5]}..., the first member "
                f"{names[:5]}...; an ensemble needs the same classes in the same order"
            )
    cfg = loaded[0].config
    images = getattr(build_splits(cfg.data, cfg.train.seed), split)
    device = pick_device(cfg.train.device, "train.device")
    ensemble = ProtoPNetEnsemble([ck.model.to(device).eval() for ck in loaded])
    loader = DataLoader(
        _PerMember(images, [eval_transform(ck.preprocessing) for ck in loaded]),
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
    )
    correct = torch.zeros(len(loaded) + 1, dtype=torch.long)
    n = 0
    for xs, y in loader:
        xs = [x.to(device) for x in xs]
        y = y.to(device)
        for m, (member, x) in enumerate(zip(ensemble.members, xs, strict=True)):
            correct[m] += int((member(x)[0].argmax(1) == y).sum())
        correct[-1] += int((ensemble(xs).argmax(1) == y).sum())
        n += int(y.shape[0])
    acc = (correct.double() / max(n, 1)).tolist()
    return {
        "split": split,
        "images": n,
        "members": [
            {"run": f"{d}:{tag}", "accuracy": a, "prototypes": ck.model.num_prototypes}
            for (d, tag), ck, a in zip(members, loaded, acc[:-1], strict=True)
        ],
        "ensemble_accuracy": acc[-1],
        "ensemble_prototypes": sum(ck.model.num_prototypes for ck in loaded),
    }
