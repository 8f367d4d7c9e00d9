"""Serving Drumond et al.'s soft-max prototype models (``protopnet.drumond``).

Such a model answers with its classes and the prototypes the image matched: each a
neighbourhood of the trunk's embedding space with its probability q_j, its class
association (its column of w, and the classes of the training images in it) and its
nearest training images. It has no heatmaps: its prototypes are whole images. The
request path is ProtoPNet's: the same decoding, one micro-batcher per model on its own
thread, the same cache; only the forward and the answer differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from model_store import DrumondManifest, LoadedDrumond
from protopnet.drumond import (
    AMBIGUOUS_BELOW,
    DrumondNet,
    matched_prototypes,
    neighbourhood_classes,
)
from protopnet.explain import top_indices
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.registry import ModelInput, Runtime, Served, model_batcher
from service.settings import Settings

NO_FAMILIARITY = (
    "familiarity is calibrated for ProtoPNet models only; a Drumond model's answer cannot "
    "say whether the image looks like its training images"
)


@dataclass(frozen=True)
class DrumondForward:
    """One image's share of a batched forward: class logits (K,) and q (J,), CPU."""

    logits: torch.Tensor
    q: torch.Tensor


@torch.inference_mode()
def forward_drumond(
    model: DrumondNet, rt: Runtime, inputs: list[ModelInput]
) -> list[DrumondForward]:
    x = torch.stack([i.x for i in inputs]).to(rt.device, memory_format=rt.memory_format)
    logits, q = model(x)
    logits, q = logits.float().cpu(), q.float().cpu()
    return [DrumondForward(logits[b], q[b]) for b in range(len(inputs))]


@dataclass(frozen=True)
class ServedDrumond(Served[DrumondForward]):
    """A loaded Drumond version, ready to serve (built once by ``load_served_drumond``)."""

    manifest: DrumondManifest
    manifest_sha256: str
    model: DrumondNet
    batcher: MicroBatcher[ModelInput, DrumondForward]
    runtime: Runtime
    metrics: Metrics
    explains: ClassVar[bool] = False  # its answers are made from the logits and q alone

    @functools.cached_property
    def class_shares(self) -> np.ndarray:
        """(J, K): each prototype's neighbourhood, as shares of its training images."""
        return np.array([p.class_shares for p in self.manifest.prototypes], dtype=np.float64)


def load_served_drumond(
    loaded: LoadedDrumond, runtime: Runtime, settings: Settings, metrics: Metrics
) -> ServedDrumond:
    model = loaded.model.to(runtime.device).eval()
    model.to(memory_format=runtime.memory_format)
    batcher = model_batcher(
        loaded.ref, functools.partial(forward_drumond, model, runtime), runtime, settings, metrics
    )
    return ServedDrumond(
        manifest=loaded.manifest,
        manifest_sha256=loaded.manifest_sha256,
        model=model,
        batcher=batcher,
        runtime=runtime,
        metrics=metrics,
    )


def build_drumond_explanation(
    served: ServedDrumond,
    fwd: DrumondForward,
    model_ref: dict[str, Any],
    image: dict[str, Any],
    eid: str,
    top_classes: int,
    top_prototypes: int,
    familiarity: dict[str, Any],
) -> dict[str, Any]:
    """The ``DrumondExplainResponse`` as a plain dict (links without the proxy prefix)."""
    names = served.class_names
    logits = fwd.logits.numpy()
    probs = fwd.logits.softmax(0).numpy()
    top = top_indices(logits, top_classes).tolist()
    scores = [
        {"class_index": k, "label": names[k], "logit": float(logits[k]),
         "probability": float(probs[k])}
        for k in top
    ]  # fmt: skip
    answered = top[0]
    shares = served.class_shares
    matched = matched_prototypes(fwd.q.numpy().astype(np.float64), shares, top_prototypes)
    base = f"/models/{served.name}@{served.version}/prototypes"
    rows = []
    for m in matched:
        rec = served.manifest.prototypes[m.index]
        order = np.argsort(-m.class_shares, kind="stable")
        rows.append(
            {
                "prototype": m.index,
                "q": m.q,
                "class_weights": [
                    {"class_index": k, "label": names[k], "weight": w}
                    for k, w in enumerate(rec.class_weights)
                ],
                "neighbourhood": [
                    {"class_index": int(k), "label": names[k], "share": float(m.class_shares[k])}
                    for k in order
                    if m.class_shares[k] > 0
                ],
                "neighbourhood_images": rec.matched_images,
                "nearest": [
                    {"image_id": i, "class_index": c, "label": names[c]}
                    for i, c in zip(rec.nearest_image_ids, rec.nearest_classes, strict=True)
                ],
                "nearest_png": f"{base}/{m.index}/nearest.png" if rec.has_images else None,
            }
        )
    pooled = neighbourhood_classes(matched)
    share = float(pooled[answered])
    rest = pooled.copy()
    rest[answered] = -1.0
    other = int(rest.argmax()) if rest.max() > 0 else None
    return {
        "kind": "drumond",
        "id": eid,
        "model": model_ref,
        "image": image,
        "prediction": scores[0],
        "top_classes": scores,
        "prototypes": rows,
        "ambiguity": {
            "ambiguous": share < AMBIGUOUS_BELOW,
            "answered_share": share,
            "threshold": AMBIGUOUS_BELOW,
            "other_class": None
            if other is None
            else {
                "class_index": other,
                "label": names[other],
                "share": float(pooled[other]),
            },
        },
        "familiarity": familiarity,
        "links": {"self": f"/explanations/{eid}", "report": f"/explanations/{eid}/report"},
    }
