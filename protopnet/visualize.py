"""Drawing: heatmaps, overlays, masks, boxes and crops as uint8 arrays, and PNG bytes.

Inputs are numpy arrays: images (H, W, 3) uint8 RGB, maps (H, W) float. No files here.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from protopnet.explain import percentile_thresholds_np

BOX_COLOR = (255, 255, 0)  # yellow, as in the paper's figures

# OpenCV's JET colours of the 256 levels, RGB, (256, 3). Looked up with np.take rather
# than cv2.applyColorMap, which builds this table anew on every call: 150 us per picture
# whatever its size, 40x the lookup itself for a 28 px heatmap (the same colours).
_JET_RGB = cv2.cvtColor(
    cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
)[0]


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros."""
    lo, hi = float(m.min()), float(m.max())
    if hi - lo < 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def jet(m01: np.ndarray) -> np.ndarray:
    """[0, 1] map -> (H, W, 3) uint8 RGB with the JET colormap."""
    return np.take(_JET_RGB, np.round(255 * m01).astype(np.uint8), axis=0)


def overlay(image: np.ndarray, act_map: np.ndarray) -> np.ndarray:
    """The paper's blend: 0.5 * image + 0.3 * JET heatmap (uint8 RGB).

    Min-max scaling to 0..255 and the blend are single OpenCV passes (rounded and
    saturated as numpy's round and clip would), twice as fast as the float arithmetic
    in numpy; a local analysis draws hundreds of these.
    """
    lo, hi = float(act_map.min()), float(act_map.max())
    levels: npt.NDArray[np.uint8]
    if hi - lo < 1e-12:
        levels = np.zeros(act_map.shape, dtype=np.uint8)
    else:  # round(255 * (m - lo) / (hi - lo)), never negative, so the abs is a no-op
        scale = 255.0 / (hi - lo)
        levels = np.asarray(cv2.convertScaleAbs(act_map, alpha=scale, beta=-lo * scale), np.uint8)
    heat = np.take(_JET_RGB, levels, axis=0)
    return cv2.addWeighted(image, 0.5, heat, 0.3, 0.0)


def heatmap_rgba(act_map: np.ndarray) -> np.ndarray:
    """JET colours with alpha = normalised activation, for front-ends that overlay it."""
    m = normalize_map(act_map)
    rgba = np.empty((*m.shape, 4), dtype=np.uint8)
    rgba[..., :3] = jet(m)
    rgba[..., 3] = np.uint8(np.round(255 * m))
    return rgba


def percentile_mask(act_map: np.ndarray, q: float = 95.0) -> np.ndarray:
    """(H, W) uint8: 255 where the map is >= its q-th percentile, else 0."""
    thr = float(percentile_thresholds_np(act_map.reshape(1, -1), q)[0])
    return np.where(act_map >= thr, 255, 0).astype(np.uint8)


_LABEL_FONT, _LABEL_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_spot(
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    height: int,
    taken: list[tuple[int, int, int, int]],
) -> tuple[int, int, int, int]:
    """Where a label of ``size`` (w, h) goes for ``box``: inside its top-left corner if
    that is free, else the first free place down the box's left edge, then down its right
    edge; boxes often share corners (two prototypes firing on the same part), and labels
    drawn on top of each other cannot be read. If none is free, the top-left corner."""
    x0, y0, x1, y1 = box
    w, h = size
    xs = list(dict.fromkeys([x0 + 2, max(x0 + 2, x1 - w - 2)]))  # left, then right
    ys = list(range(y0 + 2, max(y0 + 3, y1 - h), h)) or [y0 + 2]
    for x in xs:
        for y in ys:
            spot = (x, y, x + w, y + h)
            if spot[3] <= height and not any(_overlaps(spot, t) for t in taken):
                return spot
    return (xs[0], ys[0], xs[0] + w, ys[0] + h)


def draw_boxes(
    image: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
    labels: list[str] | None = None,
    color: tuple[int, int, int] = BOX_COLOR,
) -> np.ndarray:
    """Copy of ``image`` with (x0, y0, x1, y1) end-exclusive boxes drawn, and ``labels``
    placed so that no two overlap where the boxes leave room."""
    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 200))
    taken: list[tuple[int, int, int, int]] = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), color, thick)
        if labels:
            (tw, th), base = cv2.getTextSize(labels[i], _LABEL_FONT, _LABEL_SCALE, 1)
            box = (int(x0), int(y0), int(x1), int(y1))
            spot = _label_spot(box, (tw, th + base + 1), out.shape[0], taken)
            taken.append(spot)
            cv2.putText(
                out,
                labels[i],
                (spot[0], spot[1] + th),  # putText takes the baseline's left end
                _LABEL_FONT,
                _LABEL_SCALE,
                color,
                1,
                cv2.LINE_AA,
            )
    return out


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


# PNG colour types by channels: greyscale, RGB, RGBA (8 bits each).
_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA -> PNG bytes.

    Every row is stored with PNG's "up" filter (its difference from the row above, which
    suits photographs and smooth heatmaps) and deflated with ISA-L (``isal``, level 0-3).
    OpenCV's and Pillow's encoders deflate with zlib: on this project's 224 px pictures
    the fastest zlib setting took 1.7-1.8 ms and this about 0.5 ms, in files no larger
    (81 against 83 KB for a heatmap overlay). Both the deflate and the filter release
    the GIL, so callers can encode many PNGs on threads (bench/local_analysis.py encodes
    3000 per analysis; the service one per heatmap).
    """
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not shape_ok or 0 in array.shape:
        raise ValueError(
            f"cannot encode an array of shape {array.shape} and dtype {array.dtype} as PNG; "
            "valid: uint8 of shape (H, W), (H, W, 3) or (H, W, 4) with H, W >= 1"
        )
    H, W = array.shape[:2]
    C = 1 if array.ndim == 2 else array.shape[2]
    rows = np.ascontiguousarray(array).reshape(H, W * C)
    scanlines = np.empty((H, W * C + 1), dtype=np.uint8)  # a filter byte, then the row
    scanlines[:, 0] = _PNG_FILTER_UP
    scanlines[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", W, H, 8, _PNG_COLOR_TYPE[C], 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(scanlines, level)),
            _png_chunk(b"IEND", b""),
        )
    )
