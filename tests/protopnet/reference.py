"""Brute-force references in plain Python / numpy loops.

Deliberately written the slow, obvious way (explicit patch loops, no convolutions, no
vectorised formula shared with the library) so that a test comparing against them can
catch a wrong formula, not just a wrong shape.
"""

from __future__ import annotations

import math

import numpy as np


def patch_distances(z: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """z (B, D, H, W), protos (P, D, h1, w1) -> (B, P, H-h1+1, W-w1+1) squared L2, by loops."""
    B, D, H, W = z.shape
    P, _, h1, w1 = protos.shape
    out = np.zeros((B, P, H - h1 + 1, W - w1 + 1))
    for b in range(B):
        for p in range(P):
            for i in range(H - h1 + 1):
                for j in range(W - w1 + 1):
                    total = 0.0
                    for c in range(D):
                        for di in range(h1):
                            for dj in range(w1):
                                diff = float(z[b, c, i + di, j + dj]) - float(protos[p, c, di, dj])
                                total += diff * diff
                    out[b, p, i, j] = total
    return out


def similarity(d: float, activation: str, eps: float = 1e-4) -> float:
    """The paper's log activation or the linear one, for one distance."""
    if activation == "log":
        return math.log((d + 1.0) / (d + eps))
    return -d


def logits_from_min_distances(
    min_d: np.ndarray, weight: np.ndarray, activation: str, eps: float = 1e-4
) -> np.ndarray:
    """min_d (B, P), weight (K, P) -> (B, K): logit_k = sum_j w[k, j] * sim(min_d[j])."""
    B, P = min_d.shape
    K = weight.shape[0]
    out = np.zeros((B, K))
    for b in range(B):
        for k in range(K):
            out[b, k] = sum(
                float(weight[k, j]) * similarity(float(min_d[b, j]), activation, eps)
                for j in range(P)
            )
    return out


def percentile_box(m: np.ndarray, q: float = 95.0) -> tuple[int, int, int, int]:
    """Scan every pixel of m (H, W): smallest (x0, y0, x1, y1), end exclusive, holding all
    pixels >= numpy's q-th percentile."""
    thr = float(np.percentile(m, q))
    H, W = m.shape
    x0, y0, x1, y1 = W, H, -1, -1
    for y in range(H):
        for x in range(W):
            if m[y, x] >= thr:
                x0, y0 = min(x0, x), min(y0, y)
                x1, y1 = max(x1, x), max(y1, y)
    return x0, y0, x1 + 1, y1 + 1
