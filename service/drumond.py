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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model_store import DrumondManifest, LoadedDrumond
from protokit.threads import use_torch_threads
from protopnet.config import Preprocessing
from protopnet.drumond import (
    AMBIGUOUS_BELOW,
    DrumondNet,
    matched_prototypes,
    neighbourhood_share,
)
from protopnet.explain import top_indices
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.registry import ModelInput, Runtime
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
class ServedDrumond:
    """A loaded Drumond version, ready to serve (built once by ``load_served_drumond``)."""

    manifest: DrumondManifest
    manifest_sha256: str
    model: DrumondNet
    batcher: MicroBatcher[ModelInput, DrumondForward]
    runtime: Runtime
    metrics: Metrics

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @functools.cached_property
    def class_shares(self) -> np.ndarray:
        """(J, K): each prototype's neighbourhood, as shares of its training images."""
        return np.array([p.class_shares for p in self.manifest.prototypes], dtype=np.float64)

    async def forward(self, request: ModelInput) -> DrumondForward:
        self.metrics.queue_depth.labels(self.ref).set(self.batcher.depth + 1)
        return await self.batcher.submit(request)

    async def warm_up(self, max_batch: int) -> float:
        t0 = time.perf_counter()
        S = self.preprocessing.img_size
        for b in sorted({1, min(2, max_batch), max_batch}):
            inputs = [ModelInput(torch.zeros(3, S, S)) for _ in range(b)]
            await self.batcher.on_thread(functools.partial(self.batcher.run_batch, inputs))
        self.batcher.start()
        return time.perf_counter() - t0

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)


def load_served_drumond(
    loaded: LoadedDrumond, runtime: Runtime, settings: Settings, metrics: Metrics
) -> ServedDrumond:
    model = loaded.model.to(runtime.device).eval()
    model.to(memory_format=runtime.memory_format)
    ref = loaded.ref

    def on_batch(n: int, dt: float) -> None:
        metrics.batch_size.labels(ref).observe(n)
        metrics.forward.labels(ref).observe(dt)
        metrics.queue_depth.labels(ref).set(batcher.depth)

    batcher: MicroBatcher[ModelInput, DrumondForward] = MicroBatcher(
        ref,
        functools.partial(forward_drumond, model, runtime),
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=on_batch,
        on_wait=lambda s: metrics.queue_wait.labels(ref).observe(s),
        thread_init=lambda: use_torch_threads(runtime.torch_threads),
    )
    return ServedDrumond(
        manifest=loaded.manifest,
        manifest_sha256=loaded.manifest_sha256,
        model=model,
        batcher=batcher,
        runtime=runtime,
        metrics=metrics,
    )


def no_familiarity(percentile: float) -> dict[str, Any]:
    return {
        "familiar": None, "score": None, "percentile": None,
        "threshold_percentile": percentile, "method": None, "reason": NO_FAMILIARITY,
    }  # fmt: skip


def build_drumond_explanation(
    served: ServedDrumond,
    fwd: DrumondForward,
    model_ref: dict[str, Any],
    image: dict[str, Any],
    eid: str,
    top_classes: int,
    top_prototypes: int,
    familiarity_percentile: float,
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
    share = neighbourhood_share(matched, answered)
    pooled = sum(m.q * m.class_shares for m in matched)
    others = [k for k in np.argsort(-np.asarray(pooled), kind="stable").tolist() if k != answered]
    other = others[0] if others and float(np.asarray(pooled)[others[0]]) > 0 else None
    weight = sum(m.q for m in matched if m.class_shares.sum() > 0)
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
                "share": float(np.asarray(pooled)[other]) / weight if weight else 0.0,
            },
        },
        "familiarity": no_familiarity(familiarity_percentile),
        "links": {"self": f"/explanations/{eid}", "report": f"/explanations/{eid}/report"},
    }
