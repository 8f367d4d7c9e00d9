"""Percentiles, boxes, bicubic maps and the explainer's geometry in original pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from protopnet import Preprocessing, PrototypeExplainer
from protopnet.explain import (
    ImageExplanation,
    display_size,
    percentile_boxes,
    percentile_thresholds,
    place_maps,
    upsample_maps,
)
from protopnet.preprocess import eval_transform, input_region
from tests.protopnet.reference import percentile_box
from tests.protopnet.scenes import GREY, IMG, red_square_image
from tests.protopnet.scenes import texture_model as make_texture_model

# ---------------------------------------------------------------------------------------
# Percentiles and boxes


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 7), (13, 9), (56, 40)])
@pytest.mark.parametrize("q", [0.0, 50.0, 95.0, 99.9, 100.0])
def test_percentile_thresholds_match_numpy(shape: tuple[int, int], q: float) -> None:
    maps = torch.rand(4, *shape, dtype=torch.float64)
    maps[1] = torch.round(maps[1] * 3)  # heavy ties
    got = percentile_thresholds(maps.flatten(1), q)
    for i in range(4):
        assert float(got[i]) == pytest.approx(float(np.percentile(maps[i].numpy(), q)), abs=1e-12)


def test_percentile_boxes_match_a_pixel_scan() -> None:
    maps = torch.rand(6, 31, 23, dtype=torch.float64)
    got = percentile_boxes(maps)
    assert got.dtype == torch.long and got.shape == (6, 4)
    for i in range(6):
        assert tuple(got[i].tolist()) == percentile_box(maps[i].numpy())


def test_disjoint_hot_regions_give_one_enclosing_box() -> None:
    m = np.zeros((40, 50))
    m[2:6, 3:8] = 5.0  # top-left blob, 20 px
    m[30:35, 40:44] = 6.0  # bottom-right blob, 20 px (5% of 2000 px = 100 px needed ...)
    m[20:28, 10:18] = 4.0  # ... and a third blob, 64 px: the top 5% spans all three
    box = tuple(percentile_boxes(torch.from_numpy(m)[None])[0].tolist())
    assert box == percentile_box(m) == (3, 2, 44, 35)


def test_constant_map_box_is_the_whole_map() -> None:
    assert percentile_boxes(torch.ones(1, 5, 8))[0].tolist() == [0, 0, 8, 5]
    assert percentile_boxes(torch.zeros(0, 5, 8)).shape == (0, 4)


@pytest.mark.parametrize(
    ("low", "size"),
    [((7, 7), (224, 224)), ((7, 7), (300, 451)), ((5, 3), (17, 40)), ((1, 1), (9, 9)),
     ((2, 7), (1, 3)), ((14, 14), (7, 7))],
)  # fmt: skip
def test_upsample_maps_match_opencv_inter_cubic(
    low: tuple[int, int], size: tuple[int, int]
) -> None:
    maps = torch.rand(3, *low) * 9
    got = upsample_maps(maps, size)
    assert got.shape == (3, *size)
    for i in range(3):
        ref = cv2.resize(maps[i].numpy(), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        ref = ref.reshape(size)  # OpenCV drops a dimension of size 1
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-4, rtol=0)
    assert upsample_maps(torch.zeros(0, *low), size).shape == (0, *size)


def test_display_size_shrinks_only_large_images() -> None:
    assert display_size(300, 200, 512) == (300, 200)
    assert display_size(1000, 700, 256) == (256, 179)
    assert display_size(700, 1000, 256) == (179, 256)
    assert display_size(5000, 3, 100) == (100, 1)
    assert display_size(1000, 700, None) == (1000, 700)


# ---------------------------------------------------------------------------------------
# The explainer on real images with a prototype that is a known texture


@pytest.fixture(scope="module")
def texture_model() -> torch.nn.Module:
    return make_texture_model()


def explain(
    model: torch.nn.Module, images: list[Image.Image], resize: str, max_side: int | None = 512
) -> list[ImageExplanation]:
    prep = Preprocessing(img_size=IMG, resize=resize, mean=(0.5,) * 3, std=(0.5,) * 3)  # type: ignore[arg-type]
    tf = eval_transform(prep)
    x = torch.stack([tf(im) for im in images])
    explainer = PrototypeExplainer(model, prep, max_map_side=max_side)  # type: ignore[arg-type]
    return explainer.attribute(x, [im.size for im in images], top_classes=2, top_prototypes=3)


def visible_window(e: ImageExplanation, resize: str) -> tuple[int, int, int, int]:
    """Where the model's input lies on the display canvas: everywhere but for center_crop,
    where the canvas is zero outside the crop."""
    Wd, Hd = e.display_size
    if resize != "center_crop":
        return 0, 0, Wd, Hd
    nz = (e.maps != 0).any(dim=0)
    ys, xs = torch.nonzero(nz, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def check_boxes_and_peaks_follow_the_maps(e: ImageExplanation, resize: str) -> None:
    """Every box is the brute-force percentile box of its returned map, scaled to original
    pixels (floor / ceil); every peak is on its map's maximum."""
    W, H = e.image_size
    Wd, Hd = e.display_size
    sx, sy = W / Wd, H / Hd
    vx0, vy0, vx1, vy1 = visible_window(e, resize)
    assert e.maps.shape == (len(e.shown), Hd, Wd)
    for i in range(len(e.shown)):
        vis = e.maps[i, vy0:vy1, vx0:vx1].double().numpy()
        x0, y0, x1, y1 = percentile_box(vis)
        x0, x1, y0, y1 = x0 + vx0, x1 + vx0, y0 + vy0, y1 + vy0
        if (sx, sy) != (1.0, 1.0):
            x0, y0 = int(np.floor(x0 * sx)), int(np.floor(y0 * sy))
            x1, y1 = min(int(np.ceil(x1 * sx)), W), min(int(np.ceil(y1 * sy)), H)
        assert tuple(e.boxes[i].tolist()) == (x0, y0, x1, y1)
        px, py = e.peaks[i].tolist()
        assert 0 <= px < W and 0 <= py < H
        dx, dy = int(px / sx), int(py / sy)  # back to the display pixel
        assert float(e.maps[i, dy, dx]) == pytest.approx(float(vis.max()), rel=1e-6)


def inside(point: tuple[int, int], box: tuple[int, int, int, int], margin: float = 0) -> bool:
    x, y = point
    return box[0] - margin <= x < box[2] + margin and box[1] - margin <= y < box[3] + margin


def box_within(
    inner: tuple[int, int, int, int], outer: tuple[int, int, int, int], margin: tuple[float, float]
) -> bool:
    mx, my = margin
    return (
        inner[0] >= outer[0] - mx
        and inner[1] >= outer[1] - my
        and inner[2] <= outer[2] + mx
        and inner[3] <= outer[3] + my
    )


def cell_size(w: int, h: int, resize: str) -> tuple[float, float]:
    """One latent cell (2 input pixels) in original pixels along x and y."""
    if resize == "stretch":
        return 2 * w / IMG, 2 * h / IMG
    side = min(w, h) if resize == "center_crop" else max(w, h)
    return 2 * side / IMG, 2 * side / IMG


# (image width, height, red square) per preprocessing mode; for center_crop the square is
# inside the central crop, for pad the image is wide so the letterbox shifts rows.
CASES = {
    "stretch": (96, 48, (60, 8, 84, 32)),
    "center_crop": (100, 60, (40, 30, 62, 52)),
    "pad": (120, 60, (80, 20, 110, 50)),
}


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
def test_red_prototype_box_and_peak_land_on_the_red_square(
    texture_model: torch.nn.Module, resize: str
) -> None:
    w, h, sq = CASES[resize]
    (e,) = explain(texture_model, [red_square_image(w, h, sq)], resize)
    assert e.image_size == (w, h) and e.display_size == (w, h)
    i = e.map_index(0)
    assert inside(tuple(e.peaks[i].tolist()), sq)
    box = tuple(e.boxes[i].tolist())
    assert box_within(box, sq, margin=cell_size(w, h, resize))
    # Cells whose receptive field is mostly red: far above plain grey's similarity (~0.9).
    assert float(e.similarities[0]) > 3.0
    check_boxes_and_peaks_follow_the_maps(e, resize)


def test_maps_follow_opencv_for_stretch_and_pad(texture_model: torch.nn.Module) -> None:
    """Stretch: the map is cv2.resize of the latent map to the image. Pad: cv2.resize to
    the letterbox square, then the image's rows cut out of it."""
    w, h, sq = CASES["pad"]
    img = red_square_image(w, h, sq)
    (es,) = explain(texture_model, [img], "stretch")
    for i in range(len(es.shown)):
        ref = cv2.resize(es.low_res_maps[i].numpy(), (w, h), interpolation=cv2.INTER_CUBIC)
        np.testing.assert_allclose(es.maps[i].numpy(), ref, atol=1e-4)
    (ep,) = explain(texture_model, [img], "pad")
    top = (w - h) // 2  # _PadToSquare centres the image
    for i in range(len(ep.shown)):
        sq_map = cv2.resize(ep.low_res_maps[i].numpy(), (w, w), interpolation=cv2.INTER_CUBIC)
        np.testing.assert_allclose(ep.maps[i].numpy(), sq_map[top : top + h], atol=1e-4)


def test_center_crop_maps_are_zero_outside_the_crop(texture_model: torch.nn.Module) -> None:
    w, h, sq = CASES["center_crop"]
    (e,) = explain(texture_model, [red_square_image(w, h, sq)], "center_crop")
    x0, y0, x1, y1 = visible_window(e, "center_crop")
    rx0, ry0, rx1, ry1 = input_region(w, h, Preprocessing(img_size=IMG, resize="center_crop"))
    assert (x0, y0, x1, y1) == (round(rx0), round(ry0), round(rx1), round(ry1)) == (20, 0, 80, 60)
    for i in range(len(e.shown)):
        b = e.boxes[i].tolist()
        assert x0 <= b[0] < b[2] <= x1 and y0 <= b[1] < b[3] <= y1


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_image_larger_than_max_map_side(texture_model: torch.nn.Module, resize: str) -> None:
    w, h = 1000, 600
    sq = (500, 150, 950, 550)  # wider than the receptive field (14 input pixels) both ways
    (e,) = explain(texture_model, [red_square_image(w, h, sq)], resize, max_side=300)
    assert e.display_size == (300, 180) and e.maps.shape[1:] == (180, 300)
    assert e.scale == pytest.approx(10 / 3)  # not an integer: boxes must grow outward
    i = e.map_index(0)
    assert inside(tuple(e.peaks[i].tolist()), sq)
    assert box_within(tuple(e.boxes[i].tolist()), sq, margin=cell_size(w, h, resize))
    check_boxes_and_peaks_follow_the_maps(e, resize)


def test_sheet_shown_prototypes_and_batching(texture_model: torch.nn.Module) -> None:
    """A batch of differently sized images: each gets its own geometry; the sheet's rows
    sum to the top classes' logits; shown = top-N most activated + top classes' own."""
    model = texture_model
    images = [
        red_square_image(96, 48, (60, 8, 84, 32)),
        red_square_image(40, 70, (5, 5, 20, 30)),
        Image.new("RGB", (33, 33), GREY),
    ]
    exps = explain(model, images, "stretch")
    prep = Preprocessing(img_size=IMG, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.stack([eval_transform(prep)(im) for im in images])
    with torch.no_grad():
        out = model.forward_full(x)
    sims_all = model.similarity(out.distances).flatten(2).amax(dim=2)  # (B, P)
    classes = model.prototype_classes.tolist()
    w_last = model.last_layer.weight.detach()
    for b, e in enumerate(exps):
        assert e.image_size == images[b].size
        logits = out.logits[b]
        order = sorted(range(3), key=lambda k: -float(logits[k]))
        assert e.top_classes == order[:2]
        np.testing.assert_allclose(e.similarities.numpy(), sims_all[b].numpy(), rtol=1e-5)
        np.testing.assert_allclose(e.points.sum(dim=1).numpy(), logits[order[:2]], rtol=1e-4)
        np.testing.assert_allclose(e.weights.numpy(), w_last[order[:2]].numpy())
        by_sim = sorted(range(6), key=lambda j: -float(sims_all[b, j]))
        assert e.top_prototypes == by_sim[:3]
        own = {j for j in range(6) if classes[j] in order[:2]}
        assert set(e.shown) == set(by_sim[:3]) | own
        assert len(e.shown) == len(set(e.shown))
        assert e.shown[:3] == by_sim[:3]
        assert float(e.probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
        # latent peaks: (h, w) of each prototype's best cell on the low-res maps.
        low = model.similarity(out.distances[b])  # (P, H', W')
        for j in range(6):
            h, wl = e.latent_peaks[j].tolist()
            assert float(low[j, h, wl]) == pytest.approx(float(low[j].max()), rel=1e-6)
        check_boxes_and_peaks_follow_the_maps(e, "stretch")


def test_mismatched_sizes_are_a_clear_error(texture_model: torch.nn.Module) -> None:
    explainer = PrototypeExplainer(texture_model, Preprocessing(img_size=IMG))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 images but 1 sizes"):
        explainer.attribute(torch.zeros(2, 3, IMG, IMG), [(10, 10)])
    with pytest.raises(ValueError, match=r"top_classes must be >= 1.*got 0 and 10"):
        explainer.attribute(torch.zeros(1, 3, IMG, IMG), [(10, 10)], top_classes=0)
    with pytest.raises(ValueError, match=r"got \[\(0, 10\)\]"):
        explainer.attribute(torch.zeros(1, 3, IMG, IMG), [(0, 10)])
    # More classes / prototypes asked for than exist: all of them, no error.
    (e,) = explainer.attribute(
        torch.zeros(1, 3, IMG, IMG), [(10, 10)], top_classes=9, top_prototypes=99
    )
    assert len(e.top_classes) == 3 and len(e.top_prototypes) == 6


def test_place_maps_window_for_each_mode() -> None:
    low = torch.rand(2, 4, 4) + 1
    for resize, window in [
        ("stretch", (0, 0, 50, 30)),
        ("center_crop", (10, 0, 40, 30)),
        ("pad", (0, 0, 50, 30)),
    ]:
        prep = Preprocessing(img_size=16, resize=resize)  # type: ignore[arg-type]
        maps, win = place_maps(low, (50, 30), (50, 30), prep)
        assert maps.shape == (2, 30, 50)
        assert win == window


def test_frozen_explainer_reads_the_head_once() -> None:
    """A frozen explainer (the service's: its model never changes) gives the same
    explanation as one that reads the model at every call, and keeps the last layer it
    read; an unfrozen one follows a model that is still being edited."""
    model = make_texture_model()
    prep = Preprocessing(img_size=IMG, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = eval_transform(prep)(red_square_image(48, 48, (8, 8, 30, 30)))[None]
    live = PrototypeExplainer(model, prep)  # type: ignore[arg-type]
    frozen = PrototypeExplainer(model, prep, frozen=True)  # type: ignore[arg-type]
    a, b = live.attribute(x, [(48, 48)])[0], frozen.attribute(x, [(48, 48)])[0]
    assert a.top_classes == b.top_classes and a.shown == b.shown
    torch.testing.assert_close(a.points, b.points, rtol=0, atol=0)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)

    with torch.no_grad():
        model.last_layer.weight.mul_(2)
    try:
        a2, b2 = live.attribute(x, [(48, 48)])[0], frozen.attribute(x, [(48, 48)])[0]
    finally:
        with torch.no_grad():
            model.last_layer.weight.div_(2)
    torch.testing.assert_close(b2.weights, b.weights, rtol=0, atol=0)  # the head it read
    torch.testing.assert_close(a2.weights, 2 * a.weights)  # the model as it is now
