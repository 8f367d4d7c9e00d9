"""Image -> tensor for every PIL mode, and the geometry back to the original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet import Preprocessing
from protopnet.preprocess import eval_transform, input_region, resize_geometry

S = 16
PLAIN = Preprocessing(img_size=S, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x = pixel / 255


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(3, S, S) with mean 0, std 1 -> (S, S, 3) in 0..255."""
    return x.permute(1, 2, 0).numpy() * 255


def p_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.paste(1, (10, 0, 20, 10))  # right half index 1 ...
    img.info["transparency"] = 1  # ... which is transparent
    return img


# mode -> (image, expected RGB of its left half, expected RGB of its right half)
CASES: dict[str, tuple[Image.Image, tuple[int, int, int], tuple[int, int, int]]] = {}


def _case(name: str, img: Image.Image, left: tuple, right: tuple) -> None:  # type: ignore[type-arg]
    CASES[name] = (img, left, right)


def _half(mode: str, left: object, right: object) -> Image.Image:
    img = Image.new(mode, (20, 10), left)  # type: ignore[arg-type]
    img.paste(right, (10, 0, 20, 10))  # type: ignore[arg-type]
    return img


_case("RGB", _half("RGB", (200, 10, 30), (0, 90, 255)), (200, 10, 30), (0, 90, 255))
# Transparent pixels composite on white, not black; opaque ones keep their colour.
_case("RGBA", _half("RGBA", (200, 10, 30, 255), (0, 0, 0, 0)), (200, 10, 30), (255, 255, 255))
_case("LA", _half("LA", (40, 255), (40, 0)), (40, 40, 40), (255, 255, 255))
_case("La", _half("La", (40, 255), (0, 0)), (40, 40, 40), (255, 255, 255))
_case("P", p_with_transparency(), (255, 0, 0), (255, 255, 255))
_case("L", _half("L", 30, 220), (30, 30, 30), (220, 220, 220))
# 16-bit greyscale: the full 0..65535 range maps onto 0..255 instead of clipping.
_case("I;16", _half("I;16", 65535, 32896), (255, 255, 255), (128, 128, 128))
# 12 significant bits in a 16-bit container (CT, X-ray): 4095 is white, not near-black.
_case(
    "I;16 12-bit",
    Image.fromarray(np.repeat([[4095] * 10 + [2048] * 10], 10, axis=0).astype("<u2")),
    (255, 255, 255),
    (128, 128, 128),
)
_case("CMYK", _half("CMYK", (255, 0, 0, 0), (0, 0, 0, 255)), (0, 255, 255), (0, 0, 0))
_case("1", _half("1", 1, 0), (255, 255, 255), (0, 0, 0))


@pytest.mark.parametrize("mode", list(CASES))
def test_every_mode_becomes_three_channels_with_the_right_colours(mode: str) -> None:
    img, left, right = CASES[mode]
    assert img.mode == mode.split()[0]
    x = eval_transform(PLAIN)(img)
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    px = to_pixels(x)
    # Centre of each half (away from the resize's blend at the seam).
    np.testing.assert_allclose(px[S // 2, 2], left, atol=1.5)
    np.testing.assert_allclose(px[S // 2, S - 3], right, atol=1.5)


def test_normalisation_uses_the_stored_mean_and_std() -> None:
    prep = Preprocessing(img_size=S, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = eval_transform(prep)(Image.new("RGB", (30, 30), (255, 0, 102)))
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [1.0, -1.0, 0.2], atol=1e-6)


@pytest.mark.parametrize("mode", list(CASES))
def test_grayscale_models_replicate_luminance_for_every_mode(mode: str) -> None:
    img, left, right = CASES[mode]
    x = eval_transform(PLAIN.model_copy(update={"grayscale": True}))(img)
    assert x.shape == (3, S, S)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    px = to_pixels(x)

    def luma(rgb: tuple[int, int, int]) -> float:  # ITU-R 601, as PIL's convert("L")
        return (rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000

    assert px[S // 2, 2, 0] == pytest.approx(luma(left), abs=1.5)
    assert px[S // 2, S - 3, 0] == pytest.approx(luma(right), abs=1.5)


def marker_centre(arr: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of bright pixels in a (H, W) or (H, W, 3) uint8 array."""
    a = arr if arr.ndim == 2 else arr.mean(axis=2)
    ys, xs = np.nonzero(a > 127)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel centres


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
@pytest.mark.parametrize(("w", "h"), [(90, 50), (50, 90), (64, 64)])
def test_input_region_maps_model_pixels_back_to_the_image(resize: str, w: int, h: int) -> None:
    """Paint a white block, run the real resize steps, find the block in the model's input
    and map it back through input_region: it lands where it was painted."""
    prep = Preprocessing(img_size=64, resize=resize)  # type: ignore[arg-type]
    x0, y0, x1, y1 = input_region(w, h, prep)
    # Block centred in the middle third of the image: inside the crop for center_crop.
    bx, by = w // 2 + 3, h // 2 - 4
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 255, 255), (bx - 4, by - 4, bx + 4, by + 4))
    out = img
    for step in resize_geometry(prep):
        out = step(out)
    assert out.size == (64, 64)
    cx, cy = marker_centre(np.asarray(out))
    back_x = x0 + cx / 64 * (x1 - x0)
    back_y = y0 + cy / 64 * (y1 - y0)
    tol = max(1.0, (x1 - x0) / 64)  # one model pixel in image pixels
    assert back_x == pytest.approx(bx, abs=tol)
    assert back_y == pytest.approx(by, abs=tol)


def test_input_region_values() -> None:
    def region(resize: str, w: int, h: int) -> tuple[float, float, float, float]:
        return input_region(w, h, Preprocessing(img_size=32, resize=resize))  # type: ignore[arg-type]

    assert region("stretch", 90, 50) == (0, 0, 90, 50)
    assert region("center_crop", 90, 50) == (20, 0, 70, 50)
    assert region("center_crop", 50, 91) == (0, 20.5, 50, 70.5)
    assert region("pad", 90, 50) == (0, -20, 90, 70)
    assert region("pad", 51, 90) == (-19, 0, 71, 90)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
def test_eval_transform_draws_nothing_at_random(resize: str) -> None:
    """No augmentation leaks into the eval path: whatever the random state, an image is
    given one input (a random flip or crop would differ under 8 seeds almost surely)."""
    import random

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    tf = eval_transform(Preprocessing(img_size=24, resize=resize))  # type: ignore[arg-type]
    outs = []
    for seed in range(8):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        outs.append(tf(img))
    assert all(torch.equal(o, outs[0]) for o in outs)
    # The same check catches a transform that does draw: one random flip added.
    from torchvision.transforms import v2

    from protopnet.preprocess import normalize_steps, to_model_mode

    prep = Preprocessing(img_size=24, resize=resize)  # type: ignore[arg-type]
    flipping = v2.Compose(
        [*resize_geometry(prep), v2.RandomHorizontalFlip(), *normalize_steps(prep)]
    )
    drawn = []
    for seed in range(8):
        torch.manual_seed(seed)
        drawn.append(flipping(to_model_mode(img, prep)))
    assert not all(torch.equal(d, drawn[0]) for d in drawn)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
@pytest.mark.parametrize("size", [(S, S), (37, 23), (9, 30)])
@pytest.mark.parametrize("grayscale", [False, True])
def test_eval_transform_equals_the_torchvision_pipeline_bit_for_bit(
    resize: str, size: tuple[int, int], grayscale: bool
) -> None:
    """The eval path normalises by hand for speed; training composes torchvision's v2
    steps. A model must see identical inputs in both, to the last bit."""
    from torchvision.transforms import v2

    from protopnet.preprocess import normalize_steps, to_model_mode

    prep = Preprocessing(
        img_size=S,
        resize=resize,  # type: ignore[arg-type]
        grayscale=grayscale,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pipeline = v2.Compose([*resize_geometry(prep), *normalize_steps(prep)])
    expect = pipeline(to_model_mode(img, prep))
    got = eval_transform(prep)(img)
    assert got.shape == expect.shape == (3, S, S) and got.dtype == torch.float32
    assert torch.equal(got, expect)
