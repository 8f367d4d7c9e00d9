"""Untrusted image bytes -> the model's input tensor and a display-size RGB picture.

Everything here is synchronous CPU work meant for a worker thread. Checks happen in the
order that keeps a hostile file cheap: format whitelist, declared size (before any pixel
is decoded), then the full decode. Pillow's global bomb threshold is set from settings
by ``configure_pillow`` at start-up.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from protokit.dicom import DicomError, DicomFile, is_dicom, open_dicom
from protopnet.config import Preprocessing
from protopnet.explain import display_size
from protopnet.preprocess import model_input, to_model_mode
from service.errors import BadImageError, EmptyImageError, TooManyPixelsError, UnsupportedMediaError

log = logging.getLogger("service.images")

# Only these decoders ever see client bytes (Pillow knows many more, some rarely audited).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
FORMATS_TEXT = "JPEG, PNG, GIF, BMP, TIFF, WebP, DICOM"


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's decompression-bomb threshold (process-wide) to the service's limit.

    Pillow warns above the limit and raises above twice it; our own check on the declared
    size rejects both, so the warning is silenced rather than turned into noise.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    """One decoded upload: what the model sees and what the user will be shown."""

    tensor: torch.Tensor  # (3, S, S) preprocessed model input
    display: np.ndarray  # (Hd, Wd, 3) uint8 RGB, the oriented image at display size
    received_size: tuple[int, int]  # (width, height) as stored in the file
    size: tuple[int, int]  # (width, height) after EXIF orientation: boxes use these pixels
    format: str
    mode: str  # the file's own PIL mode (RGB, RGBA, P, L, I;16, CMYK ...)
    frames: int  # > 1 for animations; only the first frame is explained
    orientation: int  # EXIF orientation tag (1 = upright)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Leading bytes of the supported formats: a body that starts like one of them and fails to
# decode is a corrupt file of that format (400), not an unknown format (415).
SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("JPEG", b"\xff\xd8\xff"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
)


def sniff_format(data: bytes) -> str | None:
    """The supported format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, sig in SIGNATURES if data.startswith(sig)), None)


def _why_not(fmt: str, data: bytes) -> str:
    """What the format's own decoder says about ``data`` (Pillow's ``open`` only says it
    cannot identify the file when every decoder refused it)."""
    Image.init()
    factory, _ = Image.OPEN[fmt]
    try:
        factory(io.BytesIO(data), "")
    except Exception as e:
        return str(e) or type(e).__name__
    return "the decoder refused it"


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Uploads at most this many pixels (declared, and for the model's input too) decode in
# well under a millisecond: cheaper on the event loop than a hand-off to a worker thread.
INLINE_PIXELS = 96 * 96
INLINE_BYTES = 64 * 1024


def is_small(img: Image.Image | DicomFile, nbytes: int, prep: Preprocessing) -> bool:
    """Whether an opened upload of ``nbytes`` is cheap enough to decode right here."""
    w, h = img.size
    return nbytes <= INLINE_BYTES and max(w * h, prep.img_size**2) <= INLINE_PIXELS


def open_image(data: bytes, max_pixels: int) -> Image.Image | DicomFile:
    """Identify the format and check the declared size without decoding pixels."""
    if not data:
        raise EmptyImageError(
            "the request holds no image bytes; send the image as multipart field 'image' "
            "or as the raw body with an image/* or application/dicom content type"
        )
    if is_dicom(data):
        try:
            return open_dicom(data, max_pixels)
        except DicomError as e:
            raise _dicom_error(e) from None
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        fmt = sniff_format(data)
        if fmt is not None:
            raise BadImageError(
                f"the upload starts like a {fmt} file but is corrupt: {_why_not(fmt, data)}"
            ) from None
        what = "text" if _looks_like_text(data) else f"{len(data)} bytes of an unknown format"
        raise UnsupportedMediaError(
            f"the upload is not an image in a supported format (it looks like {what}); "
            f"supported formats: {FORMATS_TEXT}"
        ) from None
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(f"{e}; the limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        fmt = sniff_format(data)
        if fmt is not None:
            raise BadImageError(
                f"the upload starts like a {fmt} file but is corrupt: {e}"
            ) from None
        raise BadImageError(f"could not read the image header: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImageError(f"the image declares an empty size {w} x {h}")
    if w * h > max_pixels:
        raise TooManyPixelsError(
            f"the image declares {w} x {h} = {w * h} pixels; the limit is {max_pixels} "
            "(PROTOPNET_MAX_IMAGE_PIXELS)"
        )
    return img


def _dicom_error(e: DicomError) -> Exception:
    if e.kind == "unsupported":
        return UnsupportedMediaError(str(e))
    if e.kind == "too_large":
        return TooManyPixelsError(f"{e} (PROTOPNET_MAX_IMAGE_PIXELS)")
    return BadImageError(str(e))


def _oriented(img: Image.Image) -> tuple[Image.Image, int]:
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block: treat the image as upright
        return img, 1
    if orientation == 1:
        return img, 1
    try:
        return ImageOps.exif_transpose(img), orientation
    except Exception as e:
        log.warning("ignoring unusable EXIF orientation %s: %s", orientation, e)
        return img, 1


def decode_image(data: bytes, prep: Preprocessing, max_pixels: int, max_side: int) -> DecodedImage:
    """Decode, orient and convert one upload for a model with preprocessing ``prep``."""
    return decode_opened(open_image(data, max_pixels), prep, max_pixels, max_side)


def decode_opened(
    img: Image.Image | DicomFile, prep: Preprocessing, max_pixels: int, max_side: int
) -> DecodedImage:
    """``decode_image`` after ``open_image`` (which only read the header).

    Animated images and multi-frame DICOM: the first frame. DICOM is windowed as its
    file says (``protokit.dicom``). JPEGs much larger than needed are decoded at a
    reduced DCT scale (Pillow's draft mode), which is several times faster; sizes and
    boxes are still reported in the full image's pixels.
    """
    fmt, mode, received = str(img.format), img.mode, img.size
    frames = int(getattr(img, "n_frames", 1) or 1)
    if isinstance(img, DicomFile):
        try:
            img = img.decode()
        except DicomError as e:
            raise _dicom_error(e) from None
    try:
        if frames > 1:
            img.seek(0)
        need = max(prep.img_size, max_side)
        if fmt == "JPEG" and min(received) >= 2 * need:
            img.draft(None, (need, need))  # still >= need on both sides
        img.load()
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(f"{e}; the limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"the {fmt} image is truncated or corrupt: {e}") from None
    scale = received[0] / img.size[0]  # > 1 after a draft decode
    img, orientation = _oriented(img)
    # Full-resolution size after orientation, even when decoded at a reduced scale.
    size = received if orientation in (1, 2, 3, 4) else (received[1], received[0])
    try:
        rgb = to_model_mode(img, prep)
    except (OSError, ValueError) as e:
        raise UnsupportedMediaError(
            f"cannot convert an image of mode {mode!r} to RGB: {e}; use an RGB, RGBA, "
            "greyscale, palette, CMYK or 16-bit image"
        ) from None
    tensor = model_input(prep)(rgb)  # (3, S, S)
    disp = display_size(size[0], size[1], max_side)
    shown = rgb if rgb.size == disp else rgb.resize(disp, Image.Resampling.BICUBIC)
    display = np.asarray(shown, dtype=np.uint8)  # (Hd, Wd, 3)
    if scale != 1.0:
        log.debug("decoded a %s x %s JPEG at 1/%s scale", *received, scale)
    return DecodedImage(
        tensor=tensor,
        display=np.ascontiguousarray(display),
        received_size=received,
        size=size,
        format=fmt,
        mode=mode,
        frames=frames,
        orientation=orientation,
    )
