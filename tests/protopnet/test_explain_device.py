"""The explainer's device path (batched torch ops, the GPU's) against its numpy path.

Run here on the CPU (``on_device=True`` forces the torch path); ``tests/gpu`` runs the
same comparison on CUDA. Boxes and peaks must be exact, maps within 1e-5, and the boxes
must be the reference's: OpenCV's INTER_CUBIC and numpy's 95th percentile.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from protopnet import Preprocessing, ProtoPNetConfig, PrototypeExplainer, create_model
from protopnet.explain import (
    ImageExplanation,
    percentile_boxes,
    percentile_boxes_np,
    percentile_thresholds,
    percentile_thresholds_np,
    place_maps,
    place_maps_np,
)
from tests.protopnet.reference import percentile_box


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 7), (13, 9), (224, 224)])
@pytest.mark.parametrize("q", [0.0, 50.0, 95.0, 99.9, 100.0])
def test_the_torch_percentile_is_numpys(shape: tuple[int, int], q: float) -> None:
    flat = torch.rand(5, shape[0] * shape[1])
    flat[1] = torch.round(flat[1] * 3)  # heavy ties
    flat[2] = 0.5  # constant
    got = percentile_thresholds(flat, q).numpy()
    twin = percentile_thresholds_np(flat.numpy(), q)
    np.testing.assert_array_equal(got, twin)  # the same float32 arithmetic, bit for bit
    ref = np.percentile(flat.double().numpy(), q, axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_torch_boxes_are_the_pixel_scans() -> None:
    maps = torch.rand(6, 31, 23)
    maps[3] = 1.0  # a constant map: the whole map
    got = percentile_boxes(maps)
    assert got.dtype == torch.long and got.shape == (6, 4)
    np.testing.assert_array_equal(got.numpy(), percentile_boxes_np(maps.numpy()))
    for i in range(6):
        assert tuple(got[i].tolist()) == percentile_box(maps[i].numpy())
    nan = torch.full((1, 4, 5), float("nan"))
    assert (
        percentile_boxes(nan).tolist()
        == [[0, 0, 5, 4]]
        == percentile_boxes_np(nan.numpy()).tolist()
    )
    assert percentile_boxes(torch.zeros(0, 5, 8)).shape == (0, 4)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
def test_torch_placement_is_numpys(resize: str) -> None:
    prep = Preprocessing(img_size=64, resize=resize)  # type: ignore[arg-type]
    low = torch.rand(2, 3, 7, 7)  # leading dimensions are kept
    canvas, window = place_maps(low, (90, 50), (90, 50), prep)
    twin, twin_window = place_maps_np(low.reshape(6, 7, 7).numpy(), (90, 50), (90, 50), prep)
    assert window == twin_window and canvas.shape == (2, 3, 50, 90)
    np.testing.assert_allclose(canvas.reshape(6, 50, 90).numpy(), twin, atol=1e-5, rtol=0)


def test_boxes_on_224_px_images_are_opencvs_and_numpys() -> None:
    """The paper's recipe by hand: cv2.resize INTER_CUBIC of each 7 x 7 map to 224 x 224,
    np.percentile 95, the bounding box of the pixels at or above it."""
    model, prep = _model(img_size=224, backbone="small_cnn")
    torch.manual_seed(1)
    x = torch.rand(3, 3, 224, 224)
    sizes = [(224, 224)] * 3
    with torch.no_grad():
        out = model.forward_full(x)
        sim = model.similarity(out.distances)
    explainer = PrototypeExplainer(model, prep, max_map_side=None, frozen=True)
    for on_device in (False, True):
        exps = explainer.explain_maps(sim, out.logits, out.min_distances, sizes, 3, 5, on_device)
        for b, e in enumerate(exps):
            for i, j in enumerate(e.shown):
                m = sim[b, j].numpy().astype(np.float32)
                up = cv2.resize(m, (224, 224), interpolation=cv2.INTER_CUBIC)
                assert tuple(e.boxes[i].tolist()) == percentile_box(up), (on_device, b, j)


def _model(img_size: int = 64, backbone: str = "small_cnn", classes: int = 5, per_class: int = 4):
    torch.manual_seed(0)
    cfg = ProtoPNetConfig(
        backbone=backbone, num_classes=classes, prototypes_per_class=per_class,
        prototype_depth=16, img_size=img_size,
    )  # fmt: skip
    return create_model(cfg).eval(), Preprocessing(img_size=img_size, resize="pad")


def _same(a: ImageExplanation, b: ImageExplanation) -> None:
    assert a.top_classes == b.top_classes
    assert a.top_prototypes == b.top_prototypes
    assert a.shown == b.shown
    assert (a.image_size, a.display_size) == (b.image_size, b.display_size)
    np.testing.assert_array_equal(a.boxes.numpy(), b.boxes.numpy())
    np.testing.assert_array_equal(a.peaks.numpy(), b.peaks.numpy())
    np.testing.assert_array_equal(a.latent_peaks.numpy(), b.latent_peaks.numpy())
    for name in ("logits", "probabilities", "similarities", "min_distances", "weights", "points"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.low_res_maps.numpy(), b.low_res_maps.numpy())
    np.testing.assert_allclose(a.maps.numpy(), b.maps.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
def test_the_device_path_gives_the_numpy_paths_explanations(resize: str) -> None:
    """A batch of mixed sizes (two share one, so they go through together), images larger
    than max_map_side, and per-image options, as the service's batches hold them."""
    model, _ = _model()
    prep = Preprocessing(img_size=64, resize=resize)  # type: ignore[arg-type]
    torch.manual_seed(2)
    x = torch.rand(5, 3, 64, 64)
    sizes = [(64, 64), (300, 200), (64, 64), (41, 97), (900, 700)]
    with torch.no_grad():
        out = model.forward_full(x.contiguous(memory_format=torch.channels_last))
        sim = model.similarity(out.distances)
    for frozen in (False, True):
        explainer = PrototypeExplainer(model, prep, max_map_side=256, frozen=frozen)
        ts, ns = [3, 1, 5, 2, 9], [10, 0, 3, 20, 4]
        args = (sim, out.logits, out.min_distances, sizes, ts, ns)
        on_cpu = explainer.explain_maps(*args, on_device=False)
        on_dev = explainer.explain_maps(*args, on_device=True)
        for a, b in zip(on_cpu, on_dev, strict=True):
            _same(a, b)
        assert [len(e.top_classes) for e in on_dev] == [3, 1, 5, 2, 5]


def test_ties_and_unbalanced_classes_order_alike() -> None:
    """Classes of different sizes (a pruned model) and tied similarities and logits."""
    model, prep = _model(classes=4, per_class=3)
    with torch.no_grad():
        model.prototype_classes[:] = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
        model.last_layer.weight.zero_()
    sim = torch.ones(2, 12, 7, 7)
    sim[1, 4] = 2.0
    logits = torch.zeros(2, 4)
    min_d = torch.zeros(2, 12)
    explainer = PrototypeExplainer(model, prep, frozen=True)
    args = (sim, logits, min_d, [(64, 64), (50, 80)], 2, 3)
    for a, b in zip(
        explainer.explain_maps(*args, on_device=False),
        explainer.explain_maps(*args, on_device=True),
        strict=True,
    ):
        _same(a, b)
        assert a.top_classes == [0, 1]  # ties to the lower index
