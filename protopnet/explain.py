"""Local explanations ("this looks like that"): scoring sheets, activation maps, boxes.

``PrototypeExplainer`` is built once around a model and called with a batch of
preprocessed images; everything after the forward pass is vectorised over prototypes.
Drawing and PNG encoding live in ``protopnet.visualize``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from protopnet.config import Preprocessing
from protopnet.model import ProtoPNet
from protopnet.preprocess import input_region

PERCENTILE = 95.0


# ---------------------------------------------------------------------------------------
# Activation maps and boxes (the paper's section 2.3)


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) 1-D bicubic interpolation weights: torch's own, read off by
    interpolating the identity, so borders and rounding follow ``F.interpolate``."""
    eye = torch.eye(n_in).view(1, n_in, n_in, 1)  # channel c is the unit vector e_c
    w = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)
    return w[0, :, :, 0].t().contiguous()  # (n_out, n_in)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling, (N, h, w) -> (N, H, W); matches OpenCV's INTER_CUBIC.

    Both use the a = -0.75 cubic kernel with half-pixel centres and replicated borders.
    The kernel is separable, so this is two small matrix products (U_h @ m @ U_w^T),
    several times faster than ``F.interpolate`` on the CPU and equal to it within 1e-6.
    """
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    h, w = maps.shape[1:]
    u_h = _bicubic_matrix(h, size[0]).to(maps.device)  # (H, h)
    u_w = _bicubic_matrix(w, size[1]).to(maps.device)  # (W, w)
    return u_h @ maps.float() @ u_w.t()  # (N, H, W)


@functools.lru_cache(maxsize=256)
def _bicubic_np(n_in: int, n_out: int) -> np.ndarray:
    return _bicubic_matrix(n_in, n_out).numpy()


# Each step below has two twins of one name: the torch one runs on the tensors' device
# (the GPU path: one batch, no host copy in between), the ``_np`` one on the CPU in numpy
# (the CPU path: on the few dozen small maps of one explanation, torch's per-op overhead
# was most of the time). They give the same boxes and peaks; tests compare them.


def upsample_maps_np(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``upsample_maps`` for a float32 numpy (N, h, w) array on the CPU.

    Each map is its own matrix product, so a map's pixels do not depend on which other
    maps came with it (the service's heatmap PNGs redraw one map at a time and must
    match the boxes computed from the whole stack).
    """
    if maps.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    h, w = maps.shape[1:]
    return _bicubic_np(h, size[0]) @ maps.astype(np.float32, copy=False) @ _bicubic_np(w, size[1]).T


def _numpy(maps: torch.Tensor) -> np.ndarray:
    """A CPU numpy view (or copy) of float maps; float16/bfloat16 become float32."""
    maps = maps.detach()
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    return maps.cpu().numpy()


def _ranks(n: int, q: float) -> tuple[float, int, int]:
    """numpy's linear percentile: position ``pos`` between ranks ``lo`` and ``hi``."""
    pos = q / 100 * (n - 1)
    lo = math.floor(pos)
    return pos, lo, min(lo + 1, n - 1)


def percentile_thresholds_np(flat: np.ndarray, q: float = PERCENTILE) -> np.ndarray:
    """Per-row q-th percentile with linear interpolation (numpy's default), (N, n) -> (N,).

    A partial sort (``np.partition``) places just the two ranks around the percentile.
    """
    pos, lo, hi = _ranks(flat.shape[1], q)
    part = np.partition(flat, (lo, hi) if hi > lo else lo, axis=1)
    v_lo, v_hi = part[:, lo], part[:, hi]
    return v_lo + (pos - lo) * (v_hi - v_lo)


def percentile_thresholds(flat: torch.Tensor, q: float = PERCENTILE) -> torch.Tensor:
    """``percentile_thresholds_np`` on the tensor's device, (N, n) -> (N,).

    ``topk`` of the n - lo largest values, sorted, ends with ranks lo + 1 and lo: the
    same two order statistics, interpolated the same way, so the same threshold.
    """
    pos, lo, hi = _ranks(flat.shape[1], q)
    top = flat.topk(flat.shape[1] - lo, dim=1, largest=True, sorted=True).values
    v_lo, v_hi = top[:, -1], top[:, -1 - (hi - lo)]
    return v_lo + (pos - lo) * (v_hi - v_lo)


def percentile_boxes_np(maps: np.ndarray, q: float = PERCENTILE) -> np.ndarray:
    """Smallest box holding every pixel >= the map's q-th percentile.

    (N, H, W) -> (N, 4) int64 boxes (x0, y0, x1, y1), end exclusive. Several hot regions
    give one enclosing box, as in the paper.
    """
    N, H, W = maps.shape
    if N == 0:
        return np.zeros((0, 4), dtype=np.int64)
    thr = percentile_thresholds_np(maps.reshape(N, H * W), q)
    mask = (maps >= thr[:, None, None]).view(np.uint8)  # (N, H, W), contiguous
    # OpenCV's bounding rectangle of each map's non-zero pixels, (x, y, w, h): one C
    # call per map, cheaper than numpy's row and column reductions on small maps.
    out = np.array([cv2.boundingRect(m) for m in mask], dtype=np.int64).reshape(N, 4)
    out[:, 2:] += out[:, :2]
    empty = out[:, 2] == out[:, 0]  # only a map of NaNs has no pixel >= its percentile
    if empty.any():
        out[empty] = (0, 0, W, H)
    return out


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension (0 where there is none)."""
    return mask.to(torch.uint8).argmax(dim=-1)


def percentile_boxes(maps: torch.Tensor, q: float = PERCENTILE) -> torch.Tensor:
    """``percentile_boxes_np`` on the tensor's device: (N, H, W) -> (N, 4) int64."""
    N, H, W = maps.shape
    if N == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=maps.device)
    maps = maps.float() if maps.dtype not in (torch.float32, torch.float64) else maps
    thr = percentile_thresholds(maps.reshape(N, H * W), q)
    mask = maps >= thr[:, None, None]
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (N, H), (N, W)
    y0, y1 = _first_true(rows), H - _first_true(rows.flip(1))
    x0, x1 = _first_true(cols), W - _first_true(cols.flip(1))
    out = torch.stack([x0, y0, x1, y1], dim=1)
    full = torch.tensor([0, 0, W, H], device=maps.device)
    return torch.where(rows.any(dim=1, keepdim=True), out, full)  # NaN maps: the whole map


# ---------------------------------------------------------------------------------------
# The explainer


@dataclass
class ImageExplanation:
    """One image's explanation. Tensors live on the CPU.

    Prototype-indexed tensors cover all P prototypes; map-indexed ones cover ``shown``.
    """

    logits: torch.Tensor  # (K,)
    probabilities: torch.Tensor  # (K,)
    top_classes: list[int]  # by logit, best first
    similarities: torch.Tensor  # (P,) similarity at the closest patch
    min_distances: torch.Tensor  # (P,)
    latent_peaks: torch.Tensor  # (P, 2) (h, w) of the closest patch
    weights: torch.Tensor  # (T, P) last-layer weights of the top classes
    points: torch.Tensor  # (T, P) similarity x weight; rows sum to the top classes' logits
    top_prototypes: list[int]  # most activated over all classes, best first
    shown: list[int]  # prototypes whose maps were upsampled: top classes' own + top_prototypes
    low_res_maps: torch.Tensor  # (N, H', W') similarity maps of ``shown``
    boxes: torch.Tensor  # (N, 4) 95th-percentile boxes (x0, y0, x1, y1), original pixels
    peaks: torch.Tensor  # (N, 2) (x, y) of each upsampled map's maximum, original pixels
    image_size: tuple[int, int]  # (width, height) of the original image
    display_size: tuple[int, int]  # (width, height) of ``maps``
    preprocessing: Preprocessing
    _maps: torch.Tensor | None = field(default=None, repr=False)

    @property
    def maps(self) -> torch.Tensor:
        """(N, Hd, Wd) upsampled similarity maps in display pixels, on the CPU. The GPU
        path leaves them on the device (a PNG redraws its map from ``low_res_maps``), so
        here they are placed again, the same way, when first asked for."""
        if self._maps is None:
            canvas, _ = place_maps_np(
                _numpy(self.low_res_maps), self.image_size, self.display_size, self.preprocessing
            )
            self._maps = torch.from_numpy(canvas)
        return self._maps

    @property
    def scale(self) -> float:
        """Original pixels per display pixel."""
        return self.image_size[0] / self.display_size[0]

    def map_index(self, prototype: int) -> int:
        return self.shown.index(prototype)


def display_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size at which maps are computed: the image's own, shrunk to ``max_side`` if larger."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _placement(
    image_size: tuple[int, int], disp: tuple[int, int], prep: Preprocessing
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where the model's input square goes on the display canvas: its (x0, y0, w, h),
    which may extend past the canvas for "pad", and the visible window (x0, y0, x1, y1)."""
    W, H = image_size
    Wd, Hd = disp
    sx, sy = Wd / W, Hd / H
    rx0, ry0, rx1, ry1 = input_region(W, H, prep)
    ax0, ay0 = round(rx0 * sx), round(ry0 * sy)
    aw, ah = max(1, round((rx1 - rx0) * sx)), max(1, round((ry1 - ry0) * sy))
    window = (max(ax0, 0), max(ay0, 0), min(ax0 + aw, Wd), min(ay0 + ah, Hd))
    return (ax0, ay0, aw, ah), window


def place_maps_np(
    low_res: np.ndarray,
    image_size: tuple[int, int],
    disp: tuple[int, int],
    prep: Preprocessing,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Upsample latent maps onto the display canvas, following the preprocessing.

    Returns the (N, Hd, Wd) float32 canvas and the visible window (x0, y0, x1, y1) of
    the model's input inside it: the whole canvas for "stretch", a centre square for
    "center_crop" (zero outside it), the image part of the letterbox for "pad". The
    explainer, push and the service's heatmap PNGs all place maps through here (or its
    torch twin), so a redrawn map is the one its box was computed from.
    """
    (ax0, ay0, aw, ah), (vx0, vy0, vx1, vy1) = _placement(image_size, disp, prep)
    region = upsample_maps_np(low_res, (ah, aw))  # (N, ah, aw)
    visible = region[:, vy0 - ay0 : vy1 - ay0, vx0 - ax0 : vx1 - ax0]
    Wd, Hd = disp
    if (vx0, vy0, vx1, vy1) == (0, 0, Wd, Hd):
        return np.ascontiguousarray(visible), (0, 0, Wd, Hd)
    canvas = np.zeros((low_res.shape[0], Hd, Wd), dtype=np.float32)
    canvas[:, vy0:vy1, vx0:vx1] = visible
    return canvas, (vx0, vy0, vx1, vy1)


def place_maps(
    low_res: torch.Tensor,
    image_size: tuple[int, int],
    disp: tuple[int, int],
    prep: Preprocessing,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``place_maps_np`` on the tensor's device: (..., H', W') -> (..., Hd, Wd) float32."""
    (ax0, ay0, aw, ah), (vx0, vy0, vx1, vy1) = _placement(image_size, disp, prep)
    region = upsample_maps(low_res.reshape(-1, *low_res.shape[-2:]), (ah, aw))
    region = region.reshape(*low_res.shape[:-2], ah, aw)
    visible = region[..., vy0 - ay0 : vy1 - ay0, vx0 - ax0 : vx1 - ax0]
    Wd, Hd = disp
    if (vx0, vy0, vx1, vy1) == (0, 0, Wd, Hd):
        return visible.contiguous(), (0, 0, Wd, Hd)
    canvas = visible.new_zeros((*low_res.shape[:-2], Hd, Wd))
    canvas[..., vy0:vy1, vx0:vx1] = visible
    return canvas, (vx0, vy0, vx1, vy1)


def source_boxes(
    maps: torch.Tensor, size: tuple[int, int], prep: Preprocessing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent maps (J, H', W') placed on a (width, height) source image at its own size:
    the (J, H, W) maps and their 95th-percentile boxes (J, 4) in source pixels (x0, y0,
    x1, y1, end exclusive). Push and the importer find a prototype's box here."""
    canvas, (vx0, vy0, vx1, vy1) = place_maps(maps, size, size, prep)
    boxes = percentile_boxes(canvas[:, vy0:vy1, vx0:vx1])
    boxes += torch.tensor([vx0, vy0, vx0, vy0], device=boxes.device)
    return canvas, boxes


def prototypes_by_class(classes: list[int], num_classes: int) -> list[np.ndarray]:
    """For each class, the indices of its own prototypes in index order (``classes``: the
    class of each prototype)."""
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for j, k in enumerate(classes):
        by_class[k].append(j)
    return [np.asarray(js, dtype=np.intp) for js in by_class]


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower index."""
    return np.argsort(-values, kind="stable")[:k]


def _to_original(
    boxes: np.ndarray, peaks: np.ndarray, size: tuple[int, int], disp: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Display-pixel boxes and peaks in original pixels: boxes grown outward, peaks at
    the original pixel under the display pixel's centre."""
    sx, sy = size[0] / disp[0], size[1] / disp[1]
    if (sx, sy) == (1.0, 1.0):
        return boxes, peaks
    f = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
    boxes = np.concatenate([np.floor(f[:, :2]), np.ceil(f[:, 2:])], axis=1)
    boxes = np.minimum(boxes, [size[0], size[1], size[0], size[1]]).astype(np.int64)
    scale = np.array([sx, sy], dtype=np.float32)
    peaks = np.floor((peaks.astype(np.float32) + 0.5) * scale).astype(np.int64)
    return boxes, peaks


def _per_image(values: int | Sequence[int], batch: int) -> list[int]:
    return [values] * batch if isinstance(values, int) else list(values)


class PrototypeExplainer:
    """Scoring sheets, activation maps and 95th-percentile boxes for a ProtoPNet."""

    def __init__(
        self,
        model: ProtoPNet,
        preprocessing: Preprocessing,
        max_map_side: int | None = 512,
        frozen: bool = False,
    ):
        """``frozen``: the model's weights will not change while this explainer is used
        (a served model). The last layer and each prototype's class are then read once,
        here, into host memory and onto the model's device, instead of at every call.
        Without it, every call reads the model as it is.
        """
        self.model = model
        self.preprocessing = preprocessing
        self.max_map_side = max_map_side
        self._head = self._read_head() if frozen else None

    def _read_head(self) -> _Head:
        weight = self.model.last_layer.weight.detach()
        classes = self.model.prototype_classes.detach()
        host = np.array(_numpy(weight), dtype=np.float32)
        return _Head(
            weights=host,
            by_class=prototypes_by_class(classes.tolist(), host.shape[0]),
            weights_t=weight.float(),
            classes_t=classes.long(),
        )

    @property
    def prototypes_of_class(self) -> list[np.ndarray]:
        """For each class, the indices of its own prototypes (read once when frozen)."""
        return (self._head or self._read_head()).by_class

    @torch.inference_mode()
    def attribute(
        self,
        inputs: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        top_classes: int = 3,
        top_prototypes: int = 10,
    ) -> list[ImageExplanation]:
        """Explain a batch. inputs: (B, 3, S, S) preprocessed; image_sizes: (width, height).
        Everything after the forward runs where the model does (``explain_maps``)."""
        if len(image_sizes) != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} images but {len(image_sizes)} sizes")
        out = self.model.forward_full(inputs)
        sim_maps = self.model.similarity(out.distances)
        return self.explain_maps(
            sim_maps, out.logits, out.min_distances, image_sizes, top_classes, top_prototypes
        )

    def explain_maps(
        self,
        sim_maps: torch.Tensor,
        logits: torch.Tensor,
        min_d: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        top_classes: int | Sequence[int] = 3,
        top_prototypes: int | Sequence[int] = 10,
        on_device: bool | None = None,
    ) -> list[ImageExplanation]:
        """Everything after the forward pass, from its outputs: (B, P, H', W') similarity
        maps, (B, K) logits and (B, P) min distances; ``top_classes`` and
        ``top_prototypes`` for all images or one per image.

        ``on_device`` (default: when the maps are not on the CPU) runs it as batched torch
        ops where the maps are, with one copy of the results to the host
        (``_explain_on_device``); else in numpy on the CPU, image by image
        (``_explain_np``), the faster of the two there (bench/explain_latency.py).
        """
        B = sim_maps.shape[0]
        if len(image_sizes) != B:
            raise ValueError(f"{B} maps but {len(image_sizes)} sizes")
        ts, ns = _per_image(top_classes, B), _per_image(top_prototypes, B)
        if len(ts) != B or len(ns) != B:
            raise ValueError(f"{B} images but {len(ts)} top_classes and {len(ns)} top_prototypes")
        if min(ts, default=1) < 1 or min(ns, default=0) < 0:
            raise ValueError(
                f"top_classes must be >= 1 and top_prototypes >= 0, "
                f"got {top_classes} and {top_prototypes}"
            )
        bad = [s for s in image_sizes if len(s) != 2 or min(s) < 1]
        if bad:
            raise ValueError(f"image sizes must be (width, height) >= 1, got {bad[:3]}")
        head = self._head or self._read_head()
        K, P = logits.shape[1], sim_maps.shape[1]
        ts, ns = [min(t, K) for t in ts], [min(n, P) for n in ns]
        if on_device is None:
            on_device = sim_maps.device.type != "cpu"
        if on_device:
            return self._explain_on_device(sim_maps, logits, min_d, image_sizes, ts, ns, head)
        return self._explain_np(sim_maps, logits, min_d, image_sizes, ts, ns, head)

    @torch.no_grad()
    def _explain_np(
        self,
        sim_maps: torch.Tensor,
        logits: torch.Tensor,
        min_d: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        ts: list[int],
        ns: list[int],
        head: _Head,
    ) -> list[ImageExplanation]:
        # Row-major whatever the model's layout (channels-last maps have P innermost).
        sm = np.ascontiguousarray(_numpy(sim_maps))  # (B, P, H', W')
        B, P, Hl, Wl = sm.shape
        flat = sm.reshape(B, P, Hl * Wl)
        arg = flat.argmax(axis=2)  # (B, P), the first maximum
        sims = flat.max(axis=2)  # (B, P), the value there
        latent = np.empty((B, P, 2), dtype=np.int64)  # (h, w)
        np.divmod(arg, Wl, out=(latent[..., 0], latent[..., 1]))
        logits, min_d = logits.detach().float().cpu(), min_d.detach().float().cpu()
        lg = logits.numpy()
        probs = logits.softmax(dim=1)
        results: list[ImageExplanation] = []
        for b, size in enumerate(image_sizes):
            tc = top_indices(lg[b], ts[b])  # (T,)
            weights = head.weights[tc]  # (T, P)
            points = weights * sims[b]  # (T, P)
            top_p = top_indices(sims[b], ns[b]).tolist()
            # The top classes' own prototypes, in index order (not a pass over all P).
            own = np.sort(np.concatenate([head.by_class[k] for k in tc])).tolist()
            shown = list(dict.fromkeys([*top_p, *own]))
            low = sm[b, shown]  # (N, H', W'), a copy
            disp = display_size(size[0], size[1], self.max_map_side)
            maps, (vx0, vy0, vx1, vy1) = place_maps_np(low, size, disp, self.preprocessing)
            visible = maps[:, vy0:vy1, vx0:vx1]
            boxes = percentile_boxes_np(visible)  # in visible-window pixels
            boxes[:, 0::2] += vx0
            boxes[:, 1::2] += vy0
            am = visible.reshape(len(shown), -1).argmax(axis=1)
            peak_xy = np.empty((len(shown), 2), dtype=np.int64)  # (x, y)
            np.divmod(am, vx1 - vx0, out=(peak_xy[:, 1], peak_xy[:, 0]))
            peak_xy += (vx0, vy0)
            boxes, peak_xy = _to_original(boxes, peak_xy, size, disp)
            results.append(
                ImageExplanation(
                    logits=logits[b],
                    probabilities=probs[b],
                    top_classes=tc.tolist(),
                    similarities=torch.from_numpy(sims[b]),
                    min_distances=min_d[b],
                    latent_peaks=torch.from_numpy(latent[b]),
                    weights=torch.from_numpy(weights),
                    points=torch.from_numpy(points),
                    top_prototypes=top_p,
                    shown=shown,
                    low_res_maps=torch.from_numpy(low),
                    boxes=torch.from_numpy(boxes),
                    peaks=torch.from_numpy(peak_xy),
                    image_size=size,
                    display_size=disp,
                    preprocessing=self.preprocessing,
                    _maps=torch.from_numpy(maps),
                )
            )
        return results

    @torch.no_grad()
    def _explain_on_device(
        self,
        sim_maps: torch.Tensor,
        logits: torch.Tensor,
        min_d: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        ts: list[int],
        ns: list[int],
        head: _Head,
    ) -> list[ImageExplanation]:
        """The whole batch as torch ops on the maps' device; the same numbers as
        ``_explain_np`` (tests compare them), then one copy of the results to the host.

        The maps stay on the device: only the shown prototypes' low-resolution maps come
        back, which is what the PNGs are redrawn from.
        """
        dev = sim_maps.device
        sm = sim_maps.float().contiguous()  # row-major (B, P, H', W')
        B, P, Hl, Wl = sm.shape
        flat = sm.view(B, P, Hl * Wl)
        arg = flat.argmax(dim=2)  # (B, P), the first maximum
        sims = flat.gather(2, arg[..., None])[..., 0]  # (B, P)
        latent = torch.stack([arg // Wl, arg % Wl], dim=2)  # (B, P, 2) (h, w)
        logits = logits.float()
        probs = logits.softmax(dim=1)
        w_t, classes_t = head.weights_t.to(dev), head.classes_t.to(dev)
        Tmax = max(ts)
        class_order = torch.sort(-logits, dim=1, stable=True).indices  # ties: lower index
        tc = class_order[:, :Tmax]  # (B, Tmax)
        weights = w_t[tc]  # (B, Tmax, P)
        points = weights * sims[:, None, :]
        proto_order = torch.sort(-sims, dim=1, stable=True).indices  # (B, P)

        # The shown prototypes, in the numpy path's order: the top ones by rank, then
        # the top classes' own in index order. Sorting a key puts them first.
        ar_p = torch.arange(P, device=dev)
        ar_k = torch.arange(logits.shape[1], device=dev)
        rank_p = torch.empty_like(proto_order).scatter_(1, proto_order, ar_p.expand(B, P))
        rank_k = torch.empty_like(class_order).scatter_(1, class_order, ar_k.expand_as(class_order))
        t_b = torch.tensor(ts, device=dev)[:, None]
        n_b = torch.tensor(ns, device=dev)[:, None]
        in_top = rank_p < n_b
        own = rank_k[:, classes_t] < t_b  # (B, P): the prototype's class is a top class
        key = torch.where(in_top, rank_p, torch.where(own, P + ar_p, 2 * P))
        # How many columns to keep: at most top_prototypes + the T largest classes.
        sizes_desc = sorted((len(c) for c in head.by_class), reverse=True)
        width = min(P, max(n + sum(sizes_desc[:t]) for t, n in zip(ts, ns, strict=True)))
        shown_idx = torch.sort(key, dim=1).indices[:, :width]  # (B, width)
        n_shown = (in_top | own).sum(dim=1)  # (B,)
        low = flat.gather(1, shown_idx[..., None].expand(B, width, Hl * Wl))
        low = low.view(B, width, Hl, Wl)

        # Maps, boxes and peaks: images of one size share their geometry and go together.
        boxes = torch.empty((B, width, 4), dtype=torch.long, device=dev)
        peaks = torch.empty((B, width, 2), dtype=torch.long, device=dev)
        groups: dict[tuple[int, int], list[int]] = {}
        for b, size in enumerate(image_sizes):
            groups.setdefault(tuple(size), []).append(b)  # type: ignore[arg-type]
        for size, members in groups.items():
            disp = display_size(size[0], size[1], self.max_map_side)
            sel = torch.tensor(members, device=dev)
            maps, (vx0, vy0, vx1, vy1) = place_maps(low[sel], size, disp, self.preprocessing)
            visible = maps[..., vy0:vy1, vx0:vx1].reshape(-1, vy1 - vy0, vx1 - vx0)
            bx = percentile_boxes(visible)
            bx += torch.tensor([vx0, vy0, vx0, vy0], device=dev)
            am = visible.reshape(visible.shape[0], -1).argmax(dim=1)
            pk = torch.stack([am % (vx1 - vx0) + vx0, am // (vx1 - vx0) + vy0], dim=1)
            boxes[sel] = bx.view(len(members), width, 4)
            peaks[sel] = pk.view(len(members), width, 2)

        # One copy to the host for the batch: every result, queued, then one wait.
        on_device = (logits, probs, sims, min_d.float(), latent, tc, weights, points,
                     proto_order[:, : max(ns)], shown_idx, n_shown, low, boxes, peaks)  # fmt: skip
        host = [t.to("cpu", non_blocking=True) for t in on_device]
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        lg, pr, sm_h, md, lat, tc_h, w_h, pt_h, top_h, shown_h, n_h, low_h, bx_h, pk_h = host
        results: list[ImageExplanation] = []
        for b, size in enumerate(image_sizes):
            n, t = int(n_h[b]), ts[b]
            disp = display_size(size[0], size[1], self.max_map_side)
            box, peak = _to_original(bx_h[b, :n].numpy(), pk_h[b, :n].numpy(), size, disp)
            results.append(
                ImageExplanation(
                    logits=lg[b],
                    probabilities=pr[b],
                    top_classes=tc_h[b, :t].tolist(),
                    similarities=sm_h[b],
                    min_distances=md[b],
                    latent_peaks=lat[b],
                    weights=w_h[b, :t],
                    points=pt_h[b, :t],
                    top_prototypes=top_h[b, : ns[b]].tolist(),
                    shown=shown_h[b, :n].tolist(),
                    low_res_maps=low_h[b, :n],
                    boxes=torch.from_numpy(box),
                    peaks=torch.from_numpy(peak),
                    image_size=size,
                    display_size=disp,
                    preprocessing=self.preprocessing,
                )
            )
        return results


@dataclass(frozen=True)
class _Head:
    """A model's last layer as the explainer reads it: on the host and on the device."""

    weights: np.ndarray  # (K, P) float32, host
    by_class: list[np.ndarray]  # per class, its prototypes in index order
    weights_t: torch.Tensor  # (K, P) float32, on the model's device
    classes_t: torch.Tensor  # (P,) int64, on the model's device
