"""Heatmaps, overlays, masks, boxes, crops and PNG bytes a browser can decode."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from protopnet.visualize import (
    BOX_COLOR,
    crop,
    draw_boxes,
    encode_png,
    heatmap_rgba,
    jet,
    normalize_map,
    overlay,
    percentile_mask,
)

JET_LOW, JET_HIGH = (0, 0, 128), (128, 0, 0)  # JET's ends in RGB: dark blue, dark red


def test_normalize_map_min_max_and_constant() -> None:
    m = np.array([[2.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(normalize_map(m), [[0, 0.5], [0.25, 1]])
    assert normalize_map(np.full((3, 3), 7.0)).tolist() == [[0.0] * 3] * 3


def test_jet_ends_are_dark_blue_and_dark_red_in_rgb_order() -> None:
    rgb = jet(np.array([[0.0, 1.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 3)
    assert tuple(rgb[0, 0]) == JET_LOW and tuple(rgb[0, 1]) == JET_HIGH


def test_jet_and_overlay_give_opencvs_colormap_at_every_level() -> None:
    """The colours are looked up in a table made once; OpenCV's applyColorMap, which
    makes it on every call, is the reference, on a map that visits all 256 levels."""
    rng = np.random.default_rng(5)
    m = rng.permutation(np.linspace(0.0, 1.0, 24 * 32)).reshape(24, 32)
    levels = np.round(255 * m).astype(np.uint8)
    assert len(np.unique(levels)) == 256
    want = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(jet(m), want)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(img, m), cv2.addWeighted(img, 0.5, want, 0.3, 0.0))


def test_overlay_is_half_image_plus_three_tenths_heatmap() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    m = np.zeros((5, 6))
    m[2:4, 1:3] = 9.0  # two levels: JET's two ends after min-max
    out = overlay(img, m)
    assert out.dtype == np.uint8 and out.shape == img.shape
    for y in range(5):
        for x in range(6):
            heat = JET_HIGH if m[y, x] > 0 else JET_LOW
            want = [min(255, round(0.5 * int(img[y, x, c]) + 0.3 * heat[c])) for c in range(3)]
            assert np.abs(out[y, x].astype(int) - want).max() <= 1, (y, x)


def test_heatmap_rgba_alpha_follows_the_activation() -> None:
    m = np.array([[0.0, 1.0], [2.0, 4.0]])
    rgba = heatmap_rgba(m)
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.uint8
    assert rgba[..., 3].tolist() == [[0, 64], [128, 255]]
    assert tuple(rgba[1, 1, :3]) == JET_HIGH


def test_percentile_mask_matches_numpy() -> None:
    m = np.random.default_rng(1).random((37, 29)).astype(np.float32)
    mask = percentile_mask(m)
    want = np.where(m >= np.percentile(m, 95), 255, 0)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, want)
    assert int((mask > 0).sum()) == int(np.ceil(0.05 * m.size))


def test_draw_boxes_marks_end_exclusive_edges_and_leaves_the_input() -> None:
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    out = draw_boxes(img, [(10, 20, 30, 50)])
    assert img.max() == 0  # a copy was drawn on
    yellow = np.all(out == BOX_COLOR, axis=2)
    assert yellow[20, 15] and yellow[49, 15]  # top row y0, bottom row y1 - 1
    assert yellow[35, 10] and yellow[35, 29]  # left column x0, right column x1 - 1
    assert not yellow[35, 30] and not yellow[50, 15] and not yellow[35, 20]
    assert not yellow[:19].any() and not yellow[:, 31:].any()
    labelled = draw_boxes(img, [(10, 20, 30, 50)], labels=["p3"])
    assert int(np.any(labelled != 0, axis=2).sum()) > int(yellow.sum())  # text drawn too


def _text_row_runs(out: np.ndarray, box: tuple[int, int, int, int]) -> list[range]:
    """Runs of rows inside ``box`` (its lines excluded) that hold any drawn pixel."""
    x0, y0, x1, y1 = box
    inner = np.any(out[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] != 0, axis=(1, 2))
    runs, start = [], None
    for r, on in enumerate([*inner, False]):
        if on and start is None:
            start = r
        elif not on and start is not None:
            runs.append(range(y0 + 1 + start, y0 + 1 + r))
            start = None
    return runs


def test_labels_of_boxes_sharing_a_corner_do_not_overlap() -> None:
    # Two prototypes often fire on the same part: same box, or the same top-left corner.
    img = np.zeros((80, 100, 3), dtype=np.uint8)
    box = (10, 10, 70, 60)
    one = draw_boxes(img, [box], labels=["p98"])
    assert len(_text_row_runs(one, box)) == 1
    two = draw_boxes(img, [box, box, (10, 10, 70, 75)], labels=["p98", "p93", "p7"])
    runs = _text_row_runs(two, box)
    assert len(runs) == 3, runs  # three labels, one under another, each readable
    # The first label is where it always was; the others moved down, clear of it.
    np.testing.assert_array_equal(
        two[runs[0].start : runs[0].stop, 11:69], one[runs[0].start : runs[0].stop, 11:69]
    )
    # A box too small for a second label inside keeps the label at its corner.
    tiny = draw_boxes(img, [(5, 5, 15, 15), (5, 5, 15, 15)], labels=["p1", "p2"])
    assert np.any(tiny[5:15, 5:15] != 0)


def test_crop_is_the_box_region() -> None:
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    c = crop(img, (2, 3, 7, 9))
    assert c.shape == (6, 5, 3) and c.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(c, img[3:9, 2:7])


@pytest.mark.parametrize(
    "shape", [(7, 9), (7, 9, 3), (7, 9, 4), (1, 1), (1, 1, 3), (1, 13, 4), (11, 1, 3)]
)
@pytest.mark.parametrize("level", [0, 1, 3])
def test_encode_png_round_trips_through_two_decoders(shape: tuple[int, ...], level: int) -> None:
    arr = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(arr, level)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC
    back = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(back, arr)  # channel order preserved (not BGR)
    # OpenCV (libpng) decodes it to the same pixels, in its BGR order.
    cv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr.ndim == 3:
        cv = cv2.cvtColor(cv, cv2.COLOR_BGR2RGB if shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    np.testing.assert_array_equal(cv.reshape(arr.shape), arr)


def test_encode_png_takes_views_and_stays_as_small_as_opencvs_fastest() -> None:
    """A real photograph's heatmap overlay, and a strided view of it (a crop, a flip)."""
    photo = skimage_data.chelsea()  # (300, 451, 3)
    ys, xs = np.mgrid[0 : photo.shape[0], 0 : photo.shape[1]]
    heat = np.exp(-(((xs - 200) / 60.0) ** 2 + ((ys - 120) / 40.0) ** 2))
    pic = overlay(photo, heat)
    for view in (pic, pic[10:200:2, ::-1], np.dstack([pic, (255 * heat).astype(np.uint8)])):
        data = encode_png(view)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), view)
    ours = len(encode_png(pic))
    fastest = cv2.imencode(".png", pic[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].size
    assert ours <= 1.05 * fastest, (ours, fastest)


@pytest.mark.parametrize(
    ("arr", "what"),
    [
        (np.zeros((4, 4), np.float64), "float64"),
        (np.zeros((4, 4, 2), np.uint8), r"\(4, 4, 2\)"),
        (np.zeros((0, 4, 3), np.uint8), r"\(0, 4, 3\)"),
    ],
)
def test_encode_png_refuses_what_it_cannot_encode(arr: np.ndarray, what: str) -> None:
    with pytest.raises(ValueError, match=f"{what}.*valid: uint8"):
        encode_png(arr)


@pytest.mark.parametrize(("shape", "dtype"), [((224, 224), np.float32), ((37, 51), np.float64)])
def test_overlay_matches_the_float_formula_on_real_sized_maps(shape, dtype) -> None:
    """OpenCV's fused scaling and blend against the paper's arithmetic done in numpy."""
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    m = (rng.random(shape) * 7 - 3).astype(dtype)
    heat = jet(normalize_map(m)).astype(np.float32)
    want = np.clip(np.round(0.5 * img.astype(np.float32) + 0.3 * heat), 0, 255)
    got = overlay(img, m).astype(np.float32)
    assert np.abs(got - want).max() <= 1  # a rounding tie may go the other way
    assert (got == want).mean() > 0.999
