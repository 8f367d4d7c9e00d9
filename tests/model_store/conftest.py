"""Fixtures for the model store: a tiny ProtoPNet with real prototype pictures.

The pictures come from real photographs (scikit-image's chelsea and coffee) through the
project's own drawing code, so the PNGs in a published version are real images.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model_store import ModelStore, PrototypeRecord, PrototypeVisuals
from protopnet import familiarity
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.explain import percentile_boxes, upsample_maps
from protopnet.familiarity import Familiarity
from protopnet.model import ProtoPNet, create_model
from protopnet.visualize import crop, draw_boxes, overlay

IMG = 16  # tiny_cnn has stride 2: 16 px -> 8 x 8 latent grid


def tiny_config(**over: Any) -> ProtoPNetConfig:
    base: dict[str, Any] = dict(
        backbone="tiny_cnn", num_classes=3, prototypes_per_class=2, prototype_depth=8, img_size=IMG
    )
    base.update(over)
    return ProtoPNetConfig(**base)


def tiny_model(seed: int = 0, **over: Any) -> ProtoPNet:
    """Random weights, but every tensor (BatchNorm statistics too) differs by seed."""
    torch.manual_seed(seed)
    model = create_model(tiny_config(**over))
    with torch.no_grad():
        for buf_name, buf in model.named_buffers():
            if buf_name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif buf_name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from PIL import Image
    from skimage import data

    # Real photographs, shrunk by 3 to keep tests quick: (100, 150, 3), (133, 200, 3).
    return tuple(
        np.asarray(Image.fromarray(p).resize((p.shape[1] // 3, p.shape[0] // 3)))
        for p in (data.chelsea(), data.coffee())
    )


def photos() -> list[np.ndarray]:
    return [p.copy() for p in _photos()]


def prototype_artifacts(model: ProtoPNet, with_images: bool = True) -> dict[str, Any]:
    """Records, visuals and self-activation maps computed from real photographs."""
    from PIL import Image

    from protopnet.preprocess import eval_transform

    prep = Preprocessing(img_size=IMG, mean=(0.5,) * 3, std=(0.5,) * 3)
    pics = photos()
    x = torch.stack([eval_transform(prep)(Image.fromarray(p)) for p in pics])  # (2, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_full(x)
    classes = model.config.classes_of_prototypes()
    P = model.num_prototypes
    maps = torch.empty(P, *out.distances.shape[2:])  # (P, H', W')
    records, visuals = [], {}
    for j in range(P):
        src = j % len(pics)
        pic = pics[src]
        d = out.distances[src, j]  # (H', W')
        maps[j] = model.similarity(d)
        h, w = divmod(int(d.flatten().argmin()), d.shape[1])
        up = upsample_maps(maps[j : j + 1], (pic.shape[0], pic.shape[1]))  # (1, H, W)
        box = tuple(int(v) for v in percentile_boxes(up)[0].tolist())
        records.append(
            PrototypeRecord(
                index=j,
                class_index=classes[j],
                source_image_id=f"photo{src}",
                source_path=f"photos/{src}.png",
                source_size=(pic.shape[1], pic.shape[0]),
                patch_hw=(h, w),
                distance=float(d.min()),
                box=box,  # type: ignore[arg-type]
            )
        )
        if with_images:
            visuals[j] = PrototypeVisuals(
                patch=crop(pic, box),  # type: ignore[arg-type]
                source=draw_boxes(pic, [box]),  # type: ignore[list-item]
                activation=overlay(pic, up[0].numpy()),
            )
    return {
        "preprocessing": prep,
        "class_names": [f"class_{k}" for k in range(model.num_classes)],
        "prototypes": records,
        "visuals": visuals if with_images else None,
        "activation_maps": maps if with_images else None,
    }


def tiny_familiarity(model: ProtoPNet, seed: int = 0) -> Familiarity:
    """A familiarity score fitted on random vectors of the model's latent depth."""
    g = torch.Generator().manual_seed(seed)
    D, K = model.config.prototype_depth, model.num_classes
    x = torch.randn(40, D, generator=g)
    return familiarity.fit(x, torch.arange(40) % K, K, torch.randn(10, D, generator=g))


def publish_tiny(
    store: ModelStore, name: str = "tiny", seed: int = 0, with_images: bool = True, **kw: Any
) -> tuple[ProtoPNet, Any]:
    model = tiny_model(seed)
    args = prototype_artifacts(model, with_images=with_images)
    if with_images:
        args["familiarity"] = tiny_familiarity(model, seed)
    args.update(kw)
    manifest = store.publish(name, model, **args)
    return model, manifest


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, IMG, IMG, generator=g)
