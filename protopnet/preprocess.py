"""Image -> input tensor, and the geometry that maps model input back to the image.

The eval transform is built from the ``Preprocessing`` stored with a model, so training,
push and the service all use one definition (never a second copy in the service).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from protopnet.config import Preprocessing


def to_model_mode(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Any PIL mode -> RGB (greyscale models: L replicated to three channels).

    Transparent pixels are composited on white and 16-bit greyscale is scaled to 8 bits
    first, for colour and greyscale models alike.
    """
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to LA/RGBA
        img = img.convert(img.mode.upper())
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white rather than letting transparent pixels turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit containers: scale the stored bit depth down to 8 bits instead of clipping.
        # Medical images often hold 10, 12 or 14 significant bits in 16; dividing those
        # by 65535 would leave them nearly black, so the depth is the smallest of
        # 8/10/12/14/16 bits that holds the image's maximum.
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        full = next((2.0**b - 1 for b in (8, 10, 12, 14) if hi <= 2.0**b - 1), 65535.0)
        img = Image.fromarray((arr * (255.0 / full)).round().clip(0, 255).astype("uint8"), "L")
    if prep.grayscale:
        return img.convert("L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_geometry(prep: Preprocessing) -> list[v2.Transform]:
    """The deterministic resize/crop/pad steps of ``prep`` (PIL in, PIL out)."""
    s = prep.img_size
    if prep.resize == "stretch":
        return [v2.Resize((s, s), antialias=True)]
    if prep.resize == "center_crop":
        return [v2.Resize(s, antialias=True), v2.CenterCrop(s)]
    return [_PadToSquare(), v2.Resize((s, s), antialias=True)]


class _PadToSquare(v2.Transform):
    """Letterbox: pad the short side with black, image centred."""

    def transform(self, inpt, params):  # type: ignore[no-untyped-def]
        if not isinstance(inpt, Image.Image):
            return inpt
        w, h = inpt.size
        side = max(w, h)
        canvas = Image.new(inpt.mode, (side, side))
        canvas.paste(inpt, ((side - w) // 2, (side - h) // 2))
        return canvas


def normalize_steps(prep: Preprocessing) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
    ]


@functools.lru_cache(maxsize=64)
def eval_transform(prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode) -> (3, S, S) float tensor, exactly as the model was trained."""
    to_input = model_input(prep)
    return lambda img: to_input(to_model_mode(img, prep))


@functools.lru_cache(maxsize=64)
def model_input(prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """``eval_transform`` for an image already converted by ``to_model_mode``.

    The geometry is torchvision's (``resize_geometry``, skipped when the image already
    has the input size, where it is the identity); the normalisation is the same
    arithmetic as ``normalize_steps`` (tested bit for bit) done in numpy on the pixel
    array, several times faster than the v2 pipeline on small images, which matters for
    a service's per-request latency. Built once per preprocessing.
    """
    s = prep.img_size
    geometry = v2.Compose(resize_geometry(prep))
    scale = np.float32(1 / 255)
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(3, 1, 1)

    def apply(img: Image.Image) -> torch.Tensor:
        if img.size != (s, s):
            img = geometry(img)
        hwc = np.asarray(img)  # (S, S, 3) uint8
        x = np.array(hwc.transpose(2, 0, 1), dtype=np.float32, order="C")  # (3, S, S)
        # v2.ToDtype(scale=True) multiplies by float32(1/255); v2.Normalize subtracts,
        # then divides: the same float32 operations, element by element.
        x *= scale
        x -= mean
        x /= std
        return torch.from_numpy(x)

    return apply


def input_region(width: int, height: int, prep: Preprocessing) -> tuple[float, float, float, float]:
    """Where the model's input square lies in the original image: (x0, y0, x1, y1).

    "stretch" covers the whole image; "center_crop" a central square inside it;
    "pad" a square larger than the image (it extends past the short side).
    """
    if prep.resize == "stretch":
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height) if prep.resize == "center_crop" else max(width, height)
    if prep.resize == "pad":  # _PadToSquare pastes at integer offsets
        x0, y0 = -float((side - width) // 2), -float((side - height) // 2)
    else:  # CenterCrop rounds its offset after resizing: within half a pixel of this
        x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side
