"""Decoding untrusted bytes, in-process: the checks that run before any pixel is decoded."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from protopnet.config import Preprocessing
from protopnet.preprocess import eval_transform
from service.errors import BadImageError, TooManyPixelsError, UnsupportedMediaError
from service.images import configure_pillow, decode_image
from tests.service.corpus import encode, exif_rotated, huge_declared_png, png_bomb
from tests.service.store_builder import photos

PREP = Preprocessing(img_size=64, resize="pad")


@pytest.fixture(autouse=True)
def _pillow() -> None:
    configure_pillow(40_000_000)


def test_bombs_are_refused_from_the_header_alone() -> None:
    for data in (png_bomb(), huge_declared_png()):
        t0 = time.perf_counter()
        with pytest.raises(TooManyPixelsError, match="limit is 40000000"):
            decode_image(data, PREP, 40_000_000, 512)
        assert time.perf_counter() - t0 < 1.0  # no 49-megapixel decode happened


def test_lower_pixel_limit_applies() -> None:
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(TooManyPixelsError, match="300 x 200 = 60000 pixels; the limit is 50000"):
        decode_image(data, PREP, 50_000, 512)


def test_display_size_is_capped_and_tensor_matches_eval_transform() -> None:
    img = Image.fromarray(photos()["coffee"])  # 600 x 400
    d = decode_image(encode(img, "PNG"), PREP, 40_000_000, 300)
    assert d.size == d.received_size == (600, 400)
    assert d.display.shape == (200, 300, 3) and d.display.dtype == np.uint8
    # Against the letterbox built by hand (not through the code under test): the photo
    # centred on a black 600 x 600 square, PIL's bilinear resize to 64, then normalised.
    arr = np.asarray(img)
    square = np.zeros((600, 600, 3), dtype=np.uint8)
    square[100:500] = arr
    small = np.asarray(Image.fromarray(square).resize((64, 64), Image.Resampling.BILINEAR))
    mean = np.asarray(PREP.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(PREP.std, dtype=np.float32).reshape(3, 1, 1)
    want = (small.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(d.tensor.numpy(), want, atol=1e-5)


def test_large_jpeg_decodes_at_reduced_scale_with_full_size_reported() -> None:
    big = Image.fromarray(photos()["person"]).resize((2048, 1536))
    d = decode_image(encode(big, "JPEG", quality=92), PREP, 40_000_000, 256)
    assert d.size == (2048, 1536)
    assert d.display.shape == (192, 256, 3)
    full = eval_transform(PREP)(big)
    assert (d.tensor - full).abs().mean() < 0.05  # same picture, decoded at 1/4 scale


def test_exif_orientation_swaps_the_reported_size() -> None:
    img = Image.fromarray(photos()["cat"]).resize((150, 100))
    d = decode_image(exif_rotated(img, "JPEG", 8), PREP, 40_000_000, 512)
    assert d.received_size == (150, 100) and d.size == (100, 150) and d.orientation == 8
    assert d.display.shape == (150, 100, 3)


def test_errors_name_the_problem() -> None:
    with pytest.raises(UnsupportedMediaError, match="looks like text"):
        decode_image(b"GIF? no, just text", PREP, 10**7, 512)
    # A supported format's signature followed by nonsense is a corrupt file of it.
    with pytest.raises(BadImageError, match="starts like a GIF file but is corrupt"):
        decode_image(b"GIF89a? no, just text", PREP, 10**7, 512)
    with pytest.raises(UnsupportedMediaError, match="unknown format"):
        decode_image(bytes(range(256)) * 4, PREP, 10**7, 512)
    jpeg = encode(Image.fromarray(photos()["cat"]), "JPEG")
    with pytest.raises(BadImageError, match="JPEG image is truncated or corrupt"):
        decode_image(jpeg[: len(jpeg) // 2], PREP, 10**7, 512)
    with pytest.raises(BadImageError, match="starts like a JPEG file but is corrupt"):
        decode_image(jpeg[:200], PREP, 10**7, 512)
