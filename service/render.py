"""PNGs drawn after the fact, from what the cache keeps: never needs the model.

An explanation stores its low-resolution similarity maps and geometry as a safetensors
blob (no pickle) and the display-size image as a JPEG. Heatmaps are re-upsampled from
the maps exactly as the explainer did (``protopnet.explain.place_maps``), so a mask PNG's
white region bounds the same box the JSON reports.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import cv2
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protopnet.config import Preprocessing
from protopnet.explain import ImageExplanation, place_maps_np
from protopnet.visualize import crop, draw_boxes, encode_png, heatmap_rgba, overlay, percentile_mask
from service.errors import BadOptionError, NotFoundError


class UploadSizeOverlayError(BadOptionError):
    """An overlay at the upload's size: the service keeps only the display image."""


STYLES = ("overlay", "heatmap", "mask")


@dataclass
class RenderData:
    """What re-rendering needs: maps of the shown prototypes and the geometry."""

    low_res: np.ndarray  # (N, H', W') float32 similarity maps of ``shown``
    shown: list[int]
    boxes: np.ndarray  # (N, 4) original-pixel boxes
    top_prototypes: list[int]
    image_size: tuple[int, int]  # (width, height), oriented original
    display_size: tuple[int, int]
    preprocessing: Preprocessing
    display: np.ndarray | None = None  # (Hd, Wd, 3) uint8, kept here for small images

    def index(self, prototype: int) -> int:
        try:
            return self.shown.index(prototype)
        except ValueError:
            shown = ", ".join(str(j) for j in sorted(self.shown))
            raise NotFoundError(
                f"prototype {prototype} has no heatmap in this explanation; "
                f"it shows prototypes {shown}"
            ) from None

    def display_box(self, i: int) -> tuple[int, int, int, int]:
        """Box i in display pixels (shrunk from original pixels)."""
        sx = self.display_size[0] / self.image_size[0]
        sy = self.display_size[1] / self.image_size[1]
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        return (
            int(np.floor(x0 * sx)),
            int(np.floor(y0 * sy)),
            max(int(np.floor(x0 * sx)) + 1, int(np.ceil(x1 * sx))),
            max(int(np.floor(y0 * sy)) + 1, int(np.ceil(y1 * sy))),
        )


@functools.lru_cache(maxsize=64)
def _prep_json(prep: Preprocessing) -> str:
    return prep.model_dump_json()


# Display images up to this many bytes of RGB (about 100 x 100 px) travel as raw pixels in
# the render blob: exact (no JPEG artefacts on a small picture, where they show most) and
# cheaper than encoding. Larger ones are stored as a JPEG, a tenth of their raw size.
RAW_DISPLAY_BYTES = 32 * 1024


def keeps_pixels(display: np.ndarray) -> bool:
    """Whether ``pack_render`` stores this display image itself (no JPEG needed)."""
    return display.nbytes <= RAW_DISPLAY_BYTES


def pack_render(exp: ImageExplanation, prep: Preprocessing, display: np.ndarray) -> bytes:
    """The explanation's maps and geometry as safetensors bytes, with the display image's
    pixels when it is small (``keeps_pixels``)."""
    tensors: dict[str, np.ndarray] = {
        "low_res": np.ascontiguousarray(exp.low_res_maps.numpy(), dtype=np.float32),
        "shown": np.asarray(exp.shown, dtype=np.int64),
        "boxes": exp.boxes.numpy().astype(np.int64),
        "top_prototypes": np.asarray(exp.top_prototypes, dtype=np.int64),
    }
    if keeps_pixels(display):
        tensors["display"] = np.ascontiguousarray(display, dtype=np.uint8)
    meta = {
        "image_size": json.dumps(list(exp.image_size)),
        "display_size": json.dumps(list(exp.display_size)),
        "preprocessing": _prep_json(prep),
    }
    return st_save(tensors, metadata=meta)


def unpack_render(blob: bytes) -> RenderData:
    """Inverse of ``pack_render``; the metadata sits in the safetensors JSON header."""
    t = st_load(blob)
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    w, h = json.loads(meta["image_size"])
    dw, dh = json.loads(meta["display_size"])
    return RenderData(
        low_res=t["low_res"],
        shown=[int(j) for j in t["shown"]],
        boxes=t["boxes"],
        top_prototypes=[int(j) for j in t["top_prototypes"]],
        image_size=(int(w), int(h)),
        display_size=(int(dw), int(dh)),
        preprocessing=Preprocessing.model_validate_json(meta["preprocessing"]),
        display=t.get("display"),
    )


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """uint8 RGB -> JPEG bytes (OpenCV releases the GIL)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as JPEG")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cached display image of {len(data)} bytes is not a JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def display_map(
    rd: RenderData, i: int, canvas: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Map i upsampled onto a canvas (default the display size; ``rd.image_size`` for the
    upload's own pixels), and the model input's visible window in it."""
    placed, window = place_maps_np(
        rd.low_res[i : i + 1], rd.image_size, canvas or rd.display_size, rd.preprocessing
    )  # (1, H, W)
    return placed[0], window


def heatmap_png(
    rd: RenderData, image: np.ndarray, prototype: int, style: str, size: str = "display"
) -> bytes:
    """One prototype's heatmap as PNG bytes, at display size or (``size="upload"``) at the
    upload's own size, the pixels its JSON box is given in."""
    canvas = rd.image_size if size == "upload" else rd.display_size
    if size == "upload" and style == "overlay":
        raise UploadSizeOverlayError(
            "style=overlay is drawn on the display image only; at size=upload ask for "
            "style=heatmap (RGBA) or style=mask and lay it over your own copy of the image"
        )
    m, (x0, y0, x1, y1) = display_map(rd, rd.index(prototype), canvas)
    if style == "overlay":
        return encode_png(overlay(image, m))
    if style == "heatmap":
        return encode_png(heatmap_rgba(m))
    if style == "mask":
        # The percentile is taken over the visible window only, as for the boxes.
        mask = np.zeros(m.shape, dtype=np.uint8)
        mask[y0:y1, x0:x1] = percentile_mask(np.ascontiguousarray(m[y0:y1, x0:x1]))
        return encode_png(mask)
    raise ValueError(f"unknown heatmap style {style!r}; valid: {', '.join(STYLES)}")


def heatmap_pngs(
    rd: RenderData, image: np.ndarray, prototypes: list[int], style: str, size: str = "display"
) -> list[bytes]:
    """``heatmap_png`` of several prototypes, in order."""
    return [heatmap_png(rd, image, j, style, size) for j in prototypes]


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def activation_image(rd: RenderData, image: np.ndarray, prototype: int) -> np.ndarray:
    """The paper's activation map: the JET overlay of one prototype's map, its box drawn."""
    i = rd.index(prototype)
    m, _ = display_map(rd, i)
    return draw_boxes(overlay(image, m), [rd.display_box(i)])


def boxes_image(
    rd: RenderData, image: np.ndarray, prototypes: list[int] | None = None
) -> np.ndarray:
    """The image with the boxes of ``prototypes`` (default: the most activated) drawn."""
    chosen = rd.top_prototypes if prototypes is None else prototypes
    idx = [rd.index(j) for j in chosen]
    boxes = [rd.display_box(i) for i in idx]
    return draw_boxes(image, boxes, labels=[f"p{j}" for j in chosen])


def boxes_png(rd: RenderData, image: np.ndarray, prototypes: list[int] | None = None) -> bytes:
    return encode_png(boxes_image(rd, image, prototypes))


def box_crop(rd: RenderData, image: np.ndarray, prototype: int) -> np.ndarray:
    """The part of the display image inside a prototype's box."""
    return crop(image, rd.display_box(rd.index(prototype)))
