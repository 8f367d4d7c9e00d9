"""Hostile and unusual uploads, built from real images or crafted byte by byte."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.service.store_builder import photos


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, idat: bytes, color_type: int = 0, depth: int = 8) -> bytes:
    """A PNG assembled by hand: any declared size, any compressed payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png_bomb(side: int = 7000) -> bytes:
    """A real decompression bomb: side x side black greyscale pixels, a few tens of KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return png_bytes(side, side, b"".join(parts))


def huge_declared_png() -> bytes:
    """A header claiming 100000 x 100000 pixels over a tiny payload."""
    return png_bytes(100_000, 100_000, zlib.compress(b"\x00" * 100))


def animated_gif() -> tuple[bytes, Image.Image]:
    """Three frames; returns the GIF and its first frame as decoded RGB."""
    cat = Image.fromarray(photos()["cat"]).resize((90, 60))
    frames = [cat, cat.rotate(90), cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = Image.open(io.BytesIO(data))
    first.seek(0)
    return data, first.convert("RGB")


def exif_rotated(img: Image.Image, fmt: str = "JPEG", orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif)


def sixteen_bit_png(grey8: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG whose values are the 8-bit ones x 257 (full 16-bit range)."""
    return encode(Image.fromarray(grey8.astype(np.uint16) * 257), "PNG")


@dataclass
class Case:
    name: str
    data: bytes
    content_type: str
    status: int
    code: str | None  # None for 200
    message: str  # a substring the error message must hold ("" for 200)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def bad_inputs(max_upload_bytes: int = 10 * 1024 * 1024) -> list[Case]:
    """The corpus: each upload with the status, code and message a client should get."""
    cat = Image.fromarray(photos()["cat"])
    small = cat.resize((120, 80))
    jpeg = encode(cat, "JPEG", quality=90)
    cmyk = encode(small.convert("CMYK"), "JPEG")
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    gif, _ = animated_gif()
    grey = np.asarray(small.convert("L"))
    corrupt_png = png_bytes(64, 64, b"this is not zlib data at all" * 4)
    return [
        Case("empty body", b"", "image/jpeg", 400, "empty_image", "the request body is empty"),
        Case(
            "text as text",
            b"hello, this is text",
            "text/plain",
            415,
            "unsupported_media_type",
            "content type text/plain",
        ),
        Case(
            "text as png",
            b"hello, this is text",
            "image/png",
            415,
            "unsupported_media_type",
            "looks like text",
        ),
        Case(
            "svg",
            b'<svg xmlns="http://www.w3.org/2000/svg"/>',
            "image/svg+xml",
            415,
            "unsupported_media_type",
            "supported formats: JPEG, PNG",
        ),
        Case(
            "ico (not whitelisted)",
            encode(small, "ICO"),
            "image/x-icon",
            415,
            "unsupported_media_type",
            "supported formats",
        ),
        Case(
            "json content type",
            jpeg,
            "application/json",
            415,
            "unsupported_media_type",
            "content type application/json",
        ),
        Case("no content type", jpeg, "", 415, "unsupported_media_type", "content type (none)"),
        Case(
            "truncated jpeg",
            jpeg[: len(jpeg) // 2],
            "image/jpeg",
            400,
            "corrupt_image",
            "truncated",
        ),
        Case("corrupt png", corrupt_png, "image/png", 400, "corrupt_image", "corrupt"),
        # A valid signature and IHDR, then random bytes: a broken chunk, not an unknown
        # format (Pillow's open() only says it cannot identify the file).
        Case(
            "png signature then garbage",
            png_bytes(64, 64, b"")[:33] + random_bytes(5007, seed=1),
            "image/png",
            400,
            "corrupt_image",
            "starts like a PNG file but is corrupt: broken PNG file",
        ),
        Case(
            "jpeg signature then garbage",
            jpeg[:4] + random_bytes(3000, seed=2),
            "image/jpeg",
            400,
            "corrupt_image",
            "starts like a JPEG file but is corrupt",
        ),
        Case(
            "tiff signature then garbage",
            b"II*\x00" + random_bytes(3000, seed=3),
            "image/tiff",
            400,
            "corrupt_image",
            "starts like a TIFF file but is corrupt",
        ),
        Case(
            "png bomb",
            png_bomb(),
            "image/png",
            413,
            "too_many_pixels",
            "7000 x 7000 = 49000000 pixels",
        ),
        Case(
            "huge declared size",
            huge_declared_png(),
            "image/png",
            413,
            "too_many_pixels",
            "limit is 40000000",
        ),
        Case(
            "too many bytes",
            os.urandom(max_upload_bytes + 1),
            "image/jpeg",
            413,
            "payload_too_large",
            "the limit is 10485760 bytes",
        ),
        Case("animated gif", gif, "image/gif", 200, None, ""),
        Case("cmyk jpeg", cmyk, "image/jpeg", 200, None, ""),
        Case("16-bit png", sixteen_bit_png(grey), "image/png", 200, None, ""),
        Case("rgba png", encode(rgba, "PNG"), "image/png", 200, None, ""),
        Case("palette png", encode(palette, "PNG"), "image/png", 200, None, ""),
        Case("1-bit png", encode(small.convert("1"), "PNG"), "image/png", 200, None, ""),
        Case("exif-rotated jpeg", exif_rotated(small), "image/jpeg", 200, None, ""),
        Case("webp", encode(small, "WEBP"), "image/webp", 200, None, ""),
        Case("tiff", encode(small, "TIFF"), "image/tiff", 200, None, ""),
        Case("bmp", encode(small, "BMP"), "image/bmp", 200, None, ""),
    ]
