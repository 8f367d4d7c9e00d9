"""Local explanations ("this looks like that"): scoring sheets, activation maps, boxes.

``PrototypeExplainer`` is built once around a model and called with a batch of
preprocessed images; everything after the forward pass is vectorised over prototypes.
Drawing and PNG encoding live in ``protopnet.visualize``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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


def upsample_np(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
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


def thresholds_np(flat: np.ndarray, q: float = PERCENTILE) -> np.ndarray:
    """Per-row q-th percentile with linear interpolation (numpy's default), (N, n) -> (N,).

    A partial sort (``np.partition``) places just the two ranks around the percentile.
    """
    n = flat.shape[1]
    pos = q / 100 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    part = np.partition(flat, (lo, hi) if hi > lo else lo, axis=1)
    v_lo, v_hi = part[:, lo], part[:, hi]
    return v_lo + (pos - lo) * (v_hi - v_lo)


def boxes_np(maps: np.ndarray, q: float = PERCENTILE) -> np.ndarray:
    """``percentile_boxes`` on a numpy (N, H, W) array: (N, 4) int64 (x0, y0, x1, y1)."""
    N, H, W = maps.shape
    if N == 0:
        return np.zeros((0, 4), dtype=np.int64)
    thr = thresholds_np(maps.reshape(N, H * W), q)
    mask = (maps >= thr[:, None, None]).view(np.uint8)  # (N, H, W), contiguous
    # OpenCV's bounding rectangle of each map's non-zero pixels, (x, y, w, h): one C
    # call per map, cheaper than numpy's row and column reductions on small maps.
    out = np.array([cv2.boundingRect(m) for m in mask], dtype=np.int64).reshape(N, 4)
    out[:, 2:] += out[:, :2]
    empty = out[:, 2] == out[:, 0]  # only a map of NaNs has no pixel >= its percentile
    if empty.any():
        out[empty] = (0, 0, W, H)
    return out


def percentile_thresholds(maps: torch.Tensor, q: float = PERCENTILE) -> torch.Tensor:
    """Per-map q-th percentile with linear interpolation (numpy's default), (N, H, W) -> (N,)
    on the CPU."""
    a = _numpy(maps)
    return torch.from_numpy(thresholds_np(a.reshape(a.shape[0], -1), q))


def percentile_boxes(maps: torch.Tensor, q: float = PERCENTILE) -> torch.Tensor:
    """Smallest box holding every pixel >= the map's q-th percentile.

    (N, H, W) -> (N, 4) int64 boxes (x0, y0, x1, y1), end exclusive, on the CPU. Several
    hot regions give one enclosing box, as in the paper. Computed with numpy: on the
    few dozen small maps of one explanation, torch's per-op overhead was most of the time.
    """
    return torch.from_numpy(boxes_np(_numpy(maps), q))


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
    maps: torch.Tensor  # (N, Hd, Wd) upsampled similarity maps in display pixels
    boxes: torch.Tensor  # (N, 4) 95th-percentile boxes (x0, y0, x1, y1), original pixels
    peaks: torch.Tensor  # (N, 2) (x, y) of each upsampled map's maximum, original pixels
    image_size: tuple[int, int]  # (width, height) of the original image
    display_size: tuple[int, int]  # (width, height) of ``maps``

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
    explainer, push and the service's heatmap PNGs all place maps through here, so a
    redrawn map is the one its box was computed from.
    """
    (ax0, ay0, aw, ah), (vx0, vy0, vx1, vy1) = _placement(image_size, disp, prep)
    region = upsample_np(low_res, (ah, aw))  # (N, ah, aw)
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
    """``place_maps_np`` for tensors (any device); the canvas comes back on the CPU."""
    canvas, window = place_maps_np(_numpy(low_res), image_size, disp, prep)
    return torch.from_numpy(canvas), window


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
        (a served model). The last layer and each prototype's class are then read into
        host memory once, here, instead of at every call: on a GPU that read is a
        device-to-host copy of the (K, P) weights (1.6 MB at CUB scale) and two
        synchronisations per image. Without it, every call reads the model as it is.
        """
        self.model = model
        self.preprocessing = preprocessing
        self.max_map_side = max_map_side
        self._host = self._read_head() if frozen else None

    def _read_head(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(last-layer weights (K, P) as a host array of its own, each class's prototypes)."""
        weights = np.array(_numpy(self.model.last_layer.weight), dtype=np.float32)
        return weights, prototypes_by_class(self.model.prototype_classes.tolist(), weights.shape[0])

    @property
    def prototypes_of_class(self) -> list[np.ndarray]:
        """For each class, the indices of its own prototypes (read once when frozen)."""
        return (self._host or self._read_head())[1]

    @torch.inference_mode()
    def attribute(
        self,
        inputs: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        top_classes: int = 3,
        top_prototypes: int = 10,
    ) -> list[ImageExplanation]:
        """Explain a batch. inputs: (B, 3, S, S) preprocessed; image_sizes: (width, height)."""
        if len(image_sizes) != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} images but {len(image_sizes)} sizes")
        out = self.model.forward_full(inputs)
        sim_maps = self.model.similarity(out.distances).float().cpu()  # (B, P, H', W')
        logits = out.logits.float().cpu()  # (B, K)
        min_d = out.min_distances.float().cpu()  # (B, P)
        return self.explain_maps(sim_maps, logits, min_d, image_sizes, top_classes, top_prototypes)

    def explain_maps(
        self,
        sim_maps: torch.Tensor,
        logits: torch.Tensor,
        min_d: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        top_classes: int = 3,
        top_prototypes: int = 10,
    ) -> list[ImageExplanation]:
        """Everything after the forward pass, from its outputs: (B, P, H', W') similarity
        maps, (B, K) logits and (B, P) min distances, all on the CPU.

        Split from ``attribute`` so a server can batch the forward on the model's thread
        and run this part (upsampling, boxes) elsewhere without holding the model.
        """
        if len(image_sizes) != sim_maps.shape[0]:
            raise ValueError(f"{sim_maps.shape[0]} maps but {len(image_sizes)} sizes")
        if top_classes < 1 or top_prototypes < 0:
            raise ValueError(
                f"top_classes must be >= 1 and top_prototypes >= 0, "
                f"got {top_classes} and {top_prototypes}"
            )
        bad = [s for s in image_sizes if len(s) != 2 or min(s) < 1]
        if bad:
            raise ValueError(f"image sizes must be (width, height) >= 1, got {bad[:3]}")
        w_last, by_class = self._host or self._read_head()  # (K, P), K index arrays
        T = min(top_classes, logits.shape[1])
        N_top = min(top_prototypes, sim_maps.shape[1])

        # Everything below is numpy: on the few dozen small arrays of one explanation,
        # torch's per-call overhead was most of the time. The results are the same
        # numbers (tests compare them with brute-force references).
        # Row-major whatever the model's layout (channels-last maps have P innermost).
        sm = np.ascontiguousarray(_numpy(sim_maps))  # (B, P, H', W')
        B, P, Hl, Wl = sm.shape
        flat = sm.reshape(B, P, Hl * Wl)
        arg = flat.argmax(axis=2)  # (B, P), the first maximum
        sims = flat.max(axis=2)  # (B, P), the value there
        latent = np.empty((B, P, 2), dtype=np.int64)  # (h, w)
        np.divmod(arg, Wl, out=(latent[..., 0], latent[..., 1]))
        lg = _numpy(logits)
        probs = logits.detach().float().softmax(dim=1)
        results: list[ImageExplanation] = []
        for b, size in enumerate(image_sizes):
            tc = top_indices(lg[b], T)  # (T,)
            weights = w_last[tc]  # (T, P)
            points = weights * sims[b]  # (T, P)
            top_p = top_indices(sims[b], N_top).tolist()
            # The top classes' own prototypes, in index order (not a pass over all P).
            own = np.sort(np.concatenate([by_class[k] for k in tc])).tolist()
            shown = list(dict.fromkeys([*top_p, *own]))
            low = sm[b, shown]  # (N, H', W'), a copy
            disp = display_size(size[0], size[1], self.max_map_side)
            maps, (vx0, vy0, vx1, vy1) = place_maps_np(low, size, disp, self.preprocessing)
            visible = maps[:, vy0:vy1, vx0:vx1]
            boxes = boxes_np(visible)  # in visible-window pixels
            boxes[:, 0::2] += vx0
            boxes[:, 1::2] += vy0
            am = visible.reshape(len(shown), -1).argmax(axis=1)
            peak_xy = np.empty((len(shown), 2), dtype=np.int64)  # (x, y)
            np.divmod(am, vx1 - vx0, out=(peak_xy[:, 1], peak_xy[:, 0]))
            peak_xy += (vx0, vy0)
            sx, sy = size[0] / disp[0], size[1] / disp[1]
            if (sx, sy) != (1.0, 1.0):  # display -> original pixels, boxes grown outward
                f = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
                boxes = np.concatenate([np.floor(f[:, :2]), np.ceil(f[:, 2:])], axis=1)
                boxes = np.minimum(boxes, [size[0], size[1], size[0], size[1]]).astype(np.int64)
                scale = np.array([sx, sy], dtype=np.float32)
                peak_xy = np.floor((peak_xy.astype(np.float32) + 0.5) * scale).astype(np.int64)
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
                    maps=torch.from_numpy(maps),
                    boxes=torch.from_numpy(boxes),
                    peaks=torch.from_numpy(peak_xy),
                    image_size=size,
                    display_size=disp,
                )
            )
        return results
