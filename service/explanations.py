"""The request path: decode -> batched forward -> explanation -> JSON and cache.

Decoding runs on the worker pool, the forward on the model's own thread (on a GPU with
the explanation's maps and boxes, for the whole batch), the rest of each image's work
back on the pool: on the CPU the maps and boxes, then the JSON and the blobs the cache
keeps. The event loop only waits. PNGs are not made here unless asked for
(heatmaps=inline); ``service.render`` draws them later from the cached maps.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import orjson
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protopnet.explain import ImageExplanation, source_boxes, top_indices
from protopnet.faithfulness import Receipt, SmoothGrad, receipts
from protopnet.familiarity import METHOD as FAMILIARITY_METHOD
from protopnet.preprocess import input_region
from protopnet.prp import PRP
from service import render
from service.cache import ExplanationCache
from service.drumond import NO_FAMILIARITY, ServedDrumond, build_drumond_explanation
from service.errors import NotFoundError
from service.images import DecodedImage, decode_opened, is_small, open_image, sha256_hex
from service.metrics import Metrics
from service.registry import ForwardResult, ModelInput, ServedModel
from service.schemas import (
    ClassScore,
    DrumondExplainResponse,
    ExplainResponse,
    FamiliarityAnswer,
    HeatmapMode,
    ImageInfo,
    ModelRef,
    Prediction,
    PredictResponse,
    Size,
)
from service.settings import Settings, usable_cores

T = TypeVar("T")
ID_LENGTH = 32  # hex characters of SHA-256 kept in explanation ids (128 bits)


def explanation_id(
    image_sha256: str,
    served: ServedModel | ServedDrumond,
    top_classes: int,
    top_prototypes: int,
    max_side: int,
    familiarity_percentile: float,
    faithfulness: bool = False,
    method: str = "upsample",
) -> str:
    """Same image bytes, same model version, same options -> same id (the cache key)."""
    parts = [
        "v1",
        image_sha256,
        served.name,
        served.version,
        served.manifest_sha256,
        str(top_classes),
        str(top_prototypes),
        str(max_side),
        f"familiar<{familiarity_percentile:g}",  # the threshold decides "familiar"
    ]
    if faithfulness:  # the ids of explanations without receipts stay as they were
        parts.append("receipts")
    if method != "upsample":
        parts.append(f"method={method}")
    key = "|".join(parts)
    return hashlib.sha256(key.encode()).hexdigest()[:ID_LENGTH]


def is_explanation_id(value: str) -> bool:
    return len(value) == ID_LENGTH and all(c in "0123456789abcdef" for c in value)


def model_ref(served: ServedModel | ServedDrumond) -> ModelRef:
    return ModelRef(
        name=served.name, version=served.version, manifest_sha256=served.manifest_sha256
    )


def image_info(decoded: DecodedImage, sha: str) -> ImageInfo:
    (rw, rh), (w, h) = decoded.received_size, decoded.size
    dh, dw = decoded.display.shape[:2]
    return ImageInfo(
        sha256=sha,
        format=decoded.format,
        mode=decoded.mode,
        received=Size(width=rw, height=rh),
        oriented=Size(width=w, height=h),
        display=Size(width=dw, height=dh),
        exif_orientation=decoded.orientation,
        frames=decoded.frames,
    )


NO_CALIBRATION = (
    "this model version was published without a familiarity calibration, so the service "
    "cannot tell whether the image looks like the training images; re-export it with "
    "`python -m training export` (or import it with --images)"
)


def unknown_familiarity(percentile: float, reason: str) -> dict:
    """A ``FamiliarityAnswer`` that cannot say (``familiar`` null), with the reason."""
    return {
        "familiar": None, "score": None, "percentile": None,
        "threshold_percentile": percentile, "method": None, "reason": reason,
    }  # fmt: skip


def familiarity_answer(served: ServedModel, score: float | None, percentile: float) -> dict:
    """The answer's ``FamiliarityAnswer`` as a plain dict; counts unfamiliar answers."""
    fam, threshold = served.familiarity, served.familiarity_threshold
    if fam is None or score is None or threshold is None:
        return unknown_familiarity(percentile, NO_CALIBRATION)
    familiar = score >= threshold
    if not familiar:
        served.metrics.unfamiliar.labels(served.ref).inc()
    return {
        "familiar": familiar,
        "score": score,
        "percentile": fam.percentile(score),
        "threshold_percentile": percentile,
        "method": FAMILIARITY_METHOD,
        "reason": None,
    }


def class_scores(
    logits: list[float], probs: list[float], indices: list[int], names: list[str]
) -> list[dict[str, Any]]:
    """``ClassScore``s of the classes ``indices``, as plain dicts (see build_explanation)."""
    return [
        {"class_index": k, "label": names[k], "logit": logits[k], "probability": probs[k]}
        for k in indices
    ]


def build_explanation(
    exp: ImageExplanation,
    served: ServedModel,
    info: ImageInfo,
    expl_id: str,
    familiarity: dict[str, Any],
    found: list[Receipt] | None = None,
    method: str = "upsample",
) -> dict[str, Any]:
    """The JSON of one explanation (heatmaps as URLs under no prefix: ``with_root``) from
    the explainer's output.

    Built as plain dicts and lists in exactly ``ExplainResponse``'s shape (the route's
    documented response model; a test checks the two agree field for field), because
    constructing a few hundred pydantic objects per request cost more than the demo
    model's forward pass. Serialised with orjson.
    """
    names, classes = served.class_names, served.prototype_classes
    # Only the prototypes the JSON names are read out of the (P,) and (T, P) arrays: at
    # CUB scale (2000 prototypes) turning whole rows into Python floats took 0.6 ms per
    # request (0.1 ms for all of this now), all of it holding the GIL.
    sims = exp.similarities.numpy()
    logits, probs = exp.logits.tolist(), exp.probabilities.tolist()
    top = class_scores(logits, probs, exp.top_classes, names)
    points, weights = exp.points.numpy(), exp.weights.numpy()  # (T, P)
    # The top classes' own prototypes, gathered in one go: (sheet, prototype) pairs.
    own = [served.prototypes_of_class[k] for k in exp.top_classes]
    idx = np.concatenate(own)
    sheet_of = np.repeat(np.arange(len(own)), [len(o) for o in own])
    rows_all = list(
        zip(
            idx.tolist(),
            sims[idx].tolist(),
            weights[sheet_of, idx].tolist(),
            points[sheet_of, idx].tolist(),
            strict=True,
        )
    )
    # Each sheet's totals in float64, so its points add up to its logit: the class's own
    # rows exactly (math.fsum), all P prototypes with numpy's pairwise sum.
    totals = points.sum(axis=1, dtype=np.float64).tolist()
    sheets = []
    start = 0
    for k, o, total in zip(exp.top_classes, own, totals, strict=True):
        # Most points first; ties keep index order (sorted is stable).
        rows = sorted(rows_all[start : start + len(o)], key=lambda r: -r[3])
        start += len(o)
        own_total = math.fsum(r[3] for r in rows)
        sheets.append(
            {
                "class_index": k,
                "label": names[k],
                "logit": logits[k],
                "rows": [
                    {"prototype": j, "similarity": s, "weight": w, "points": p}
                    for j, s, w, p in rows
                ],
                "own_total": own_total,
                "other_prototypes": len(classes) - len(o),
                "other_total": total - own_total,
                "total": total,
            }
        )
    top_p, shown_j = exp.top_prototypes, exp.shown
    picked = sims[top_p + shown_j].tolist()
    top_sims, shown_sims = picked[: len(top_p)], picked[len(top_p) :]
    top_protos = [
        {
            "rank": r + 1,
            "prototype": j,
            "class_index": classes[j],
            "label": names[classes[j]],
            "similarity": s,
            "latent_cell": {"h": h, "w": w},
        }
        for r, (j, s, (h, w)) in enumerate(
            zip(top_p, top_sims, exp.latent_peaks.numpy()[top_p].tolist(), strict=True)
        )
    ]
    base = f"/explanations/{expl_id}"
    model_base = f"/models/{served.name}@{served.version}/prototypes/"
    boxes, peaks = exp.boxes.tolist(), exp.peaks.tolist()
    receipts_of = [None] * len(shown_j) if found is None else [dataclasses.asdict(r) for r in found]
    shown = []
    for (x0, y0, x1, y1), (px, py), j, s, receipt in zip(
        boxes, peaks, shown_j, shown_sims, receipts_of, strict=True
    ):
        hm, pi = f"{base}/heatmaps/{j}.png?style=", f"{model_base}{j}.png?kind="
        shown.append(
            {
                "prototype": j,
                "class_index": classes[j],
                "label": names[classes[j]],
                "similarity": s,
                "box": {"x0": x0, "y0": y0, "x1": x1, "y1": y1},
                "peak": {"x": px, "y": py},
                "heatmap": {
                    "overlay": hm + "overlay",
                    "heatmap": hm + "heatmap",
                    "mask": hm + "mask",
                },
                "heatmap_png": None,
                "prototype_images": {
                    "patch": pi + "patch",
                    "source": pi + "source",
                    "activation": pi + "activation",
                },
                "map_method": method,
                "receipt": receipt,
            }
        )
    return {
        "id": expl_id,
        "model": model_ref(served).model_dump(),
        "image": info.model_dump(),
        "prediction": top[0],
        "top_classes": top,
        "scoring_sheets": sheets,
        "top_prototypes": top_protos,
        "prototypes": shown,
        "familiarity": familiarity,
        "heatmaps": "url",
        "links": {"self": base, "boxes": f"{base}/boxes.png", "report": f"{base}/report"},
    }


def with_root(json_bytes: bytes, root: str) -> bytes:
    """An explanation's JSON with its links under ``root``. Every link starts with
    "/explanations/<id>" or "/models/<name>@<version>/prototypes/"; no other JSON string
    can (a label would have to be one of them, and labels are folder names: no "/")."""
    if not root:
        return json_bytes
    r = root.encode()
    return json_bytes.replace(b'"/explanations/', b'"' + r + b"/explanations/").replace(
        b'"/models/', b'"' + r + b"/models/"
    )


def box_receipts(
    served: ServedModel,
    x: torch.Tensor,
    prototypes: list[int],
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    sha: str,
    cells: torch.Tensor | None = None,
) -> list[Receipt]:
    """The faithfulness receipts of ``prototypes`` whose boxes (original pixels) were
    shown on the image: each box mapped onto the model input ``x`` (3, S, S), tested at
    the prototype's closest cell, random boxes seeded by the image's hash (the same
    image, the same receipt). Runs on the model thread."""
    S = served.preprocessing.img_size
    x0, y0, x1, y1 = input_region(*image_size, served.preprocessing)
    sx, sy = S / (x1 - x0), S / (y1 - y0)
    b = boxes.double()
    on_input = torch.stack(
        [
            ((b[:, 0] - x0) * sx).floor(),
            ((b[:, 1] - y0) * sy).floor(),
            ((b[:, 2] - x0) * sx).ceil(),
            ((b[:, 3] - y0) * sy).ceil(),
        ],
        dim=1,
    ).long()
    x = x.float().to(served.device)
    return receipts(served.model, x, prototypes, on_input, cells, seed=int(sha[:15], 16))


def method_maps(
    served: ServedModel,
    x: torch.Tensor,
    prototypes: list[int],
    cells: torch.Tensor | None,
    method: str,
) -> torch.Tensor:
    """The maps of ``prototypes`` on the model input ``x`` by ``method``, at their cells
    (default: each one's best cell on ``x``). smoothgrad: (N, S, S), SmoothGrad's with
    16 noisy copies, noise 0.15 of the input's range, seed 0; prp: (N, S, S), PRP's
    relevance maps (protopnet/prp.py); upsample: the (N, H', W')
    latent similarity maps the paper upsamples. On the model thread."""
    x = x.float().to(served.device)
    if method == "smoothgrad":
        return SmoothGrad(served.model).attribute(x, prototypes, cells)
    if method == "prp":
        return PRP(served.model, served.preprocessing).attribute(x, prototypes, cells)
    if method == "upsample":
        with torch.no_grad():
            d = served.model.distances(served.model.conv_features(x[None]))[0]
        return served.model.similarity(d[prototypes]).float().cpu()
    raise ValueError(f"unknown map method {method!r}")


def with_maps(exp: ImageExplanation, maps: torch.Tensor) -> ImageExplanation:
    """``exp`` with its shown prototypes' maps replaced by ``maps`` (input resolution,
    placed on the image like the paper's): the boxes and peaks are theirs."""
    canvas, boxes = source_boxes(maps.float(), exp.image_size, exp.preprocessing)
    W = canvas.shape[2]
    flat = canvas.flatten(1).argmax(dim=1)
    peaks = torch.stack([flat % W, flat // W], dim=1)
    return dataclasses.replace(exp, low_res_maps=maps.float(), boxes=boxes, peaks=peaks, _maps=None)


def method_box(rd: render.RenderData) -> tuple[int, int, int, int]:
    """The 95th-percentile box of the one map in ``rd`` (an input-resolution map placed
    on the upload like the paper's), in upload pixels."""
    _, boxes = source_boxes(torch.from_numpy(rd.low_res), rd.image_size, rd.preprocessing)
    x0, y0, x1, y1 = (int(v) for v in boxes[0].tolist())
    return x0, y0, x1, y1


def is_drumond(json_bytes: bytes) -> bool:
    """Whether a stored explanation is a Drumond model's (``DrumondExplainResponse``)."""
    return bool(orjson.loads(json_bytes).get("kind") == "drumond")


def pack_input(x: torch.Tensor) -> bytes:
    """The preprocessed model input (3, S, S), kept with an explanation in float16 (300
    KB at 224 px against 600 KB in float32; a receipt made from it later moves by float16
    rounding, about 1e-3 of a ratio), so the report can check its boxes on demand. Packing
    costs 0.03 ms a request for the demo's 28 px and 0.06 ms at 224 px (one thread),
    against a 3.4 ms and a 258 ms /explain."""
    return st_save({"x": x.detach().cpu().half().contiguous()})


def unpack_input(blob: bytes) -> torch.Tensor:
    return st_load(blob)["x"]


class ExplanationService:
    """Orchestrates decoding, the batched forward, explanation, caching and rendering."""

    def __init__(
        self,
        settings: Settings,
        cache: ExplanationCache,
        pool: ThreadPoolExecutor,
        metrics: Metrics,
    ):
        self.settings, self.cache, self.pool, self.metrics = settings, cache, pool, metrics
        # Worker jobs that draw one explanation's pictures: one per core the pool can use.
        self.draw_jobs = min(usable_cores(), settings.pool_threads)
        self._in_flight: dict[str, asyncio.Task[bytes]] = {}  # id -> its computation

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work on the worker pool (never on the event loop, never the model's)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    async def decode(self, served: ServedModel | ServedDrumond, data: bytes) -> DecodedImage:
        s, prep = self.settings, served.preprocessing
        img = open_image(data, s.max_image_pixels)  # the header only: format and size
        if is_small(img, len(data), prep):  # e.g. a 28 x 28 PNG: beats the thread hand-off
            return decode_opened(img, prep, s.max_image_pixels, s.max_map_side)
        return await self.run(decode_opened, img, prep, s.max_image_pixels, s.max_map_side)

    # -- /explain ---------------------------------------------------------------------
    async def explain(
        self,
        served: ServedModel,
        data: bytes,
        top_classes: int,
        top_prototypes: int,
        faithfulness: bool = False,
        method: str = "upsample",
    ) -> tuple[bytes, bool]:
        """(explanation JSON with heatmap URLs, whether it was already made: cached, or
        being made for an identical request)."""
        sha = await self.run(sha256_hex, data) if len(data) > 1 << 20 else sha256_hex(data)
        s = self.settings
        eid = explanation_id(
            sha, served, top_classes, top_prototypes, s.max_map_side,
            s.familiarity_percentile, faithfulness, method,
        )  # fmt: skip
        cached = await self.cache.get(eid, "json", count=True)
        if cached is not None:
            return cached, True
        # Identical requests in flight share one computation, in its own task so that a
        # client leaving does not cancel it for the others.
        task = self._in_flight.get(eid)
        if task is not None:
            self.metrics.coalesced.inc()
            return await asyncio.shield(task), True
        task = asyncio.create_task(
            self._compute(served, data, sha, eid, top_classes, top_prototypes, faithfulness, method)
        )
        self._in_flight[eid] = task
        task.add_done_callback(lambda _: self._in_flight.pop(eid, None))
        return await asyncio.shield(task), False

    async def _compute(
        self,
        served: ServedModel,
        data: bytes,
        sha: str,
        eid: str,
        top_classes: int,
        top_prototypes: int,
        faithfulness: bool,
        method: str,
    ) -> bytes:
        decoded = await self.decode(served, data)
        request = ModelInput(decoded.tensor, decoded.size, top_classes, top_prototypes)
        fwd = await served.forward(request)
        if not faithfulness and method == "upsample":
            fields = await self.run(self._finish, served, decoded, sha, eid, request, fwd)
            return await self.cache.put_first(eid, fields)
        exp = await self.run(served.explanation, fwd, request)
        shown = exp.shown
        if method != "upsample":
            # The method's maps on the model thread, then their boxes and peaks on the
            # pool: the explanation's maps, boxes and peaks become the method's.
            maps = await served.batcher.on_thread(
                functools.partial(
                    method_maps, served, decoded.tensor, shown, exp.latent_peaks[shown], method
                )
            )
            exp = await self.run(with_maps, exp, maps)
        found = None
        if faithfulness:  # the blanked copies run on the model thread, between batches
            found = await served.batcher.on_thread(
                functools.partial(
                    box_receipts, served, decoded.tensor, shown, exp.boxes, exp.image_size,
                    sha, exp.latent_peaks[shown],
                )
            )  # fmt: skip
        fields = await self.run(self._fields, served, decoded, sha, eid, exp, fwd, found, method)
        return await self.cache.put_first(eid, fields)

    def _finish(
        self,
        served: ServedModel,
        decoded: DecodedImage,
        sha: str,
        eid: str,
        request: ModelInput,
        fwd: ForwardResult,
    ) -> dict[str, bytes]:
        """Post-forward work for one image, on a worker: its explanation (on the CPU: the
        maps and boxes; on a GPU the batch made them), JSON and cache blobs."""
        return self._fields(served, decoded, sha, eid, served.explanation(fwd, request), fwd)

    def _fields(
        self,
        served: ServedModel,
        decoded: DecodedImage,
        sha: str,
        eid: str,
        exp: ImageExplanation,
        fwd: ForwardResult,
        found: list[Receipt] | None = None,
        method: str = "upsample",
    ) -> dict[str, bytes]:
        familiarity = familiarity_answer(
            served, fwd.familiarity, self.settings.familiarity_percentile
        )
        info = image_info(decoded, sha)
        body = build_explanation(exp, served, info, eid, familiarity, found, method)
        fields = {
            "json": orjson.dumps(body),
            "method": method.encode(),
            "render": render.pack_render(exp, served.preprocessing, decoded.display),
        }
        if not render.keeps_pixels(decoded.display):
            fields["image"] = render.encode_jpeg(decoded.display)
        fields["input"] = pack_input(decoded.tensor)
        return fields

    # -- /explain on a Drumond model ------------------------------------------------------
    async def explain_drumond(
        self, served: ServedDrumond, data: bytes, top_classes: int, top_prototypes: int
    ) -> tuple[bytes, bool]:
        """(a Drumond model's explanation JSON, whether it came from the cache)."""
        sha = await self.run(sha256_hex, data) if len(data) > 1 << 20 else sha256_hex(data)
        s = self.settings
        eid = explanation_id(
            sha, served, top_classes, top_prototypes, s.max_map_side,
            s.familiarity_percentile, method="drumond",
        )  # fmt: skip
        cached = await self.cache.get(eid, "json", count=True)
        if cached is not None:
            return cached, True
        decoded = await self.decode(served, data)
        fwd = await served.forward(ModelInput(decoded.tensor))

        def fields() -> dict[str, bytes]:
            body = build_drumond_explanation(
                served, fwd, model_ref(served).model_dump(), image_info(decoded, sha).model_dump(),
                eid, top_classes, top_prototypes,
                unknown_familiarity(s.familiarity_percentile, NO_FAMILIARITY),
            )  # fmt: skip
            checked = DrumondExplainResponse.model_validate(body).model_dump(mode="json")
            return {"json": orjson.dumps(checked), "image": render.encode_jpeg(decoded.display)}

        return await self.cache.put_first(eid, await self.run(fields)), False

    async def present(self, json_bytes: bytes, mode: HeatmapMode, root: str = "") -> bytes:
        """The stored JSON as the client asked: URLs (as stored), inline PNGs, or none;
        its links under ``root`` (the path prefix behind a proxy), which the cache does
        not hold: one entry serves clients behind any prefix. A Drumond explanation has
        no heatmaps: it is the same in every mode."""
        if mode != "url" and not is_drumond(json_bytes):
            resp = ExplainResponse.model_validate_json(json_bytes)
            resp.heatmaps = mode
            if mode == "none":
                for p in resp.prototypes:
                    p.heatmap = None
                json_bytes = resp.model_dump_json(exclude_none=False).encode()
            else:
                pngs, _ = await self.heatmaps(
                    resp.id, [p.prototype for p in resp.prototypes], "overlay"
                )
                for p, png in zip(resp.prototypes, pngs, strict=True):
                    p.heatmap_png = base64.b64encode(png).decode("ascii")
                json_bytes = resp.model_dump_json().encode()
        return with_root(json_bytes, root)

    async def stored_json(self, eid: str) -> bytes:
        data = await self.cache.get(eid, "json")
        if data is None:
            raise self._missing(eid)
        return data

    # -- /predict ---------------------------------------------------------------------
    async def predict(
        self, served: ServedModel | ServedDrumond, data: bytes, top_classes: int
    ) -> PredictResponse:
        decoded = await self.decode(served, data)
        fwd = await served.forward(ModelInput(decoded.tensor))
        pct = self.settings.familiarity_percentile
        familiarity = (
            familiarity_answer(served, fwd.familiarity, pct)
            if isinstance(served, ServedModel) and isinstance(fwd, ForwardResult)
            else unknown_familiarity(pct, NO_FAMILIARITY)
        )
        # The same classes, in the same order (ties to the lower index), as /explain's.
        top = top_indices(fwd.logits.numpy(), top_classes).tolist()
        probs = fwd.logits.softmax(0).tolist()
        scores = class_scores(fwd.logits.tolist(), probs, top, served.class_names)
        sha = await self.run(sha256_hex, data) if len(data) > 1 << 20 else sha256_hex(data)
        return PredictResponse(
            model=model_ref(served),
            image=image_info(decoded, sha),
            prediction=Prediction(**scores[0]),
            top_classes=[ClassScore(**c) for c in scores],
            familiarity=FamiliarityAnswer(**familiarity),
        )

    # -- PNGs -------------------------------------------------------------------------
    def _missing(self, eid: str) -> NotFoundError:
        return NotFoundError(
            f"explanation {eid!r} not found: it expired (kept {self.settings.cache_ttl_s} s) or "
            "was never made; POST the image to /explain again"
        )

    async def render_data(self, eid: str) -> tuple[render.RenderData, Any]:
        """The render blob and the display image (its own pixels, or the JPEG field)."""
        blob = await self.cache.get(eid, "render")
        if blob is None:
            stored = await self.cache.get(eid, "json")
            if stored is not None and is_drumond(stored):
                raise NotFoundError(
                    f"explanation {eid!r} is a Drumond model's: its prototypes are whole "
                    "training images, so it has no heatmaps or boxes; see its report"
                )
            raise self._missing(eid)
        rd = await self.run(render.unpack_render, blob)
        if rd.display is not None:
            return rd, rd.display
        jpeg = await self.cache.get(eid, "image")
        if jpeg is None:
            raise self._missing(eid)
        return rd, await self.run(render.decode_jpeg, jpeg)

    async def heatmap(
        self, eid: str, prototype: int, style: str, size: str = "display"
    ) -> tuple[bytes, str]:
        """A shown prototype's heatmap as the explanation made it, and the method that
        made its map."""
        pngs, method = await self.heatmaps(eid, [prototype], style, size)
        return pngs[0], method

    async def map_method(self, eid: str) -> str:
        """The method that made the explanation's own maps."""
        stored = await self.cache.get(eid, "method")
        return "upsample" if stored is None else stored.decode()

    async def method_heatmap(
        self, served: ServedModel, eid: str, prototype: int, method: str, style: str, size: str
    ) -> tuple[bytes, tuple[int, int, int, int]]:
        """One shown prototype's heatmap made by another ``method`` than the
        explanation's, and the 95th-percentile box of that map in upload pixels. The map
        is computed once on the model thread from the model input kept with the
        explanation; the map, each PNG and the box are cached with the explanation."""
        suffix = "" if size == "display" else f":{size}"
        png_field = f"png:{prototype}:{style}{suffix}:{method}"
        box_field, map_field = f"box:{method}:{prototype}", f"map:{method}:{prototype}"
        found = await self.cache.get_many(eid, [png_field, box_field, map_field])
        if png_field in found and box_field in found:
            x0, y0, x1, y1 = (int(v) for v in found[box_field].split(b","))
            return found[png_field], (x0, y0, x1, y1)
        rd, image = await self.render_data(eid)
        rd.index(prototype)  # 404 for a prototype the explanation does not show
        if map_field in found:
            m = st_load(found[map_field])["map"].float()
        else:
            blob = await self.cache.get(eid, "input")
            if blob is None:
                raise self._missing(eid)
            x = await self.run(unpack_input, blob)
            m = await served.batcher.on_thread(
                functools.partial(method_maps, served, x, [prototype], None, method)
            )
            m = m[0].half()
            await self.cache.put(eid, {map_field: st_save({"map": m})})
            m = m.float()  # what the cache gives back next time
        one = dataclasses.replace(rd, low_res=m.numpy()[None], shown=[prototype])
        box = await self.run(method_box, one)
        png = await self.run(render.heatmap_png, one, image, prototype, style, size)
        await self.cache.put(eid, {png_field: png, box_field: ",".join(map(str, box)).encode()})
        return png, box

    async def heatmaps(
        self, eid: str, prototypes: list[int], style: str, size: str = "display"
    ) -> tuple[list[bytes], str]:
        """Several prototypes' heatmaps and the method that made the explanation's maps:
        one cache read for all, the missing ones drawn in one pool job per core (not one
        each: a thread hand-off and a cache round trip per picture cost more than a small
        picture), and one cache write."""
        suffix = "" if size == "display" else f":{size}"
        fields = [f"png:{j}:{style}{suffix}" for j in prototypes]
        found = await self.cache.get_many(eid, [*fields, "method"])
        method = found.pop("method", b"upsample").decode()
        todo = [j for j, f in zip(prototypes, fields, strict=True) if f not in found]
        if todo:
            rd, image = await self.render_data(eid)
            n = min(len(todo), self.draw_jobs)
            chunks = [todo[i::n] for i in range(n)]
            drawn = await asyncio.gather(
                *(self.run(render.heatmap_pngs, rd, image, c, style, size) for c in chunks)
            )
            new = {
                f"png:{j}:{style}{suffix}": png
                for c, pngs in zip(chunks, drawn, strict=True)
                for j, png in zip(c, pngs, strict=True)
            }
            await self.cache.put(eid, new)
            found.update(new)
        return [found[f] for f in fields], method

    async def report_receipts(
        self, served: ServedModel, resp: ExplainResponse, prototypes: list[int]
    ) -> dict[int, Receipt]:
        """Receipts for the report's rows of an explanation made without them: computed
        once from the kept model input and cached with the explanation."""
        eid = resp.id
        cached = await self.cache.get(eid, "receipts")
        if cached is not None:
            return {int(j): Receipt(**r) for j, r in orjson.loads(cached).items()}
        blob = await self.cache.get(eid, "input")
        if blob is None:
            raise self._missing(eid)
        x = await self.run(unpack_input, blob)
        by_j = {p.prototype: p for p in resp.prototypes}
        todo = [j for j in prototypes if j in by_j]
        if not todo:
            return {}
        boxes = torch.tensor(
            [[by_j[j].box.x0, by_j[j].box.y0, by_j[j].box.x1, by_j[j].box.y1] for j in todo]
        )
        size = (resp.image.oriented.width, resp.image.oriented.height)
        found = await served.batcher.on_thread(
            functools.partial(box_receipts, served, x, todo, boxes, size, resp.image.sha256)
        )
        out = dict(zip(todo, found, strict=True))
        body = {str(j): dataclasses.asdict(r) for j, r in out.items()}
        await self.cache.put(eid, {"receipts": orjson.dumps(body)})
        return out

    async def boxes(self, eid: str) -> bytes:
        png = await self.cache.get(eid, "png:boxes")
        if png is not None:
            return png
        rd, image = await self.render_data(eid)
        png = await self.run(render.boxes_png, rd, image)
        await self.cache.put(eid, {"png:boxes": png})
        return png
