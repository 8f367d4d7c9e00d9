"""Push against a brute-force reference: every prototype's nearest own-class patch,
its provenance record, self-activation map and 95th-percentile box."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
import torch

import training.push
from protopnet.model import ProtoPNet
from protopnet.preprocess import eval_transform
from tests.protopnet.reference import patch_distances
from tests.training.helpers import PREP, model_and_images
from training.data import ArrayImages
from training.push import PushError, push_prototypes, render_visuals, self_distance_maps


def brute_force_nearest(model: ProtoPNet, images: ArrayImages) -> list[tuple[float, int, int, int]]:
    """(distance, image, h, w) of each prototype's nearest own-class patch, by loops."""
    tf = eval_transform(PREP)
    with torch.no_grad():
        z = [model.conv_features(tf(images.load(i))[None])[0] for i in range(len(images))]
    protos = model.prototype_vectors.detach()
    P, _, h1, w1 = protos.shape
    out = []
    for j in range(P):
        k = int(model.prototype_classes[j])
        best = (float("inf"), -1, -1, -1)
        for i, zi in enumerate(z):
            if images.labels[i] != k:
                continue
            for h in range(zi.shape[1] - h1 + 1):
                for w in range(zi.shape[2] - w1 + 1):
                    d = float(((zi[:, h : h + h1, w : w + w1] - protos[j]) ** 2).sum())
                    if d < best[0]:
                        best = (d, i, h, w)
        out.append(best)
    return out, z  # type: ignore[return-value]


def reference_box(act: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """OpenCV bicubic upsampling to (width, height), numpy 95th percentile, enclosing box."""
    up = cv2.resize(act.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)
    ys, xs = np.nonzero(up >= np.percentile(up, 95))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("images_per_trunk_call", [None, 2])
@pytest.mark.parametrize("proto_size", [(1, 1), (2, 2)])
def test_push_matches_brute_force(
    proto_size: tuple[int, int], images_per_trunk_call: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if images_per_trunk_call is not None:  # batches of 5 go through the trunk as 2 + 2 + 1
        monkeypatch.setattr(training.push, "CPU_TRUNK_PIXELS", images_per_trunk_call * 16 * 16)
        assert [len(c) for c in training.push.trunk_chunks(torch.zeros(5, 3, 16, 16))] == [2, 2, 1]
    model, images = model_and_images(proto_size=proto_size)
    expected, z = brute_force_nearest(model, images)
    result = push_prototypes(model, images, PREP, batch_size=5, channels_last=False)
    h1, w1 = proto_size
    P = model.num_prototypes
    assert len(result.records) == P and result.activation_maps.shape[0] == P
    for j, (dist, i, h, w) in enumerate(expected):
        r = result.records[j]
        assert r.index == j and r.class_index == int(model.prototype_classes[j])
        assert r.source_image_id == images.image_id(i)
        assert images.labels[i] == r.class_index  # class-specific: own class only
        assert r.patch_hw == (h, w)
        assert r.distance == pytest.approx(dist, rel=1e-4, abs=1e-5)
        assert r.source_size == (26, 20)
        # The prototype now IS that latent patch.
        torch.testing.assert_close(
            model.prototype_vectors[j].detach(), z[i][:, h : h + h1, w : w + w1], atol=1e-5, rtol=0
        )
        # Its self-activation peaks there, at (almost) the largest similarity log(1/eps).
        m = result.activation_maps[j]
        assert divmod(int(m.argmax()), m.shape[1]) == (h, w)
        assert float(m.max()) > 8.5
        x0, y0, x1, y1 = r.box  # type: ignore[misc]
        rx0, ry0, rx1, ry1 = reference_box(m.numpy(), (26, 20))
        assert max(abs(x0 - rx0), abs(y0 - ry0), abs(x1 - rx1), abs(y1 - ry1)) <= 1
        assert 0 <= x0 < x1 <= 26 and 0 <= y0 < y1 <= 20


def test_push_pictures_are_the_box_crop_and_the_marked_source() -> None:
    model, images = model_and_images()
    result = push_prototypes(model, images, PREP, batch_size=4)
    assert set(result.visuals) == set(range(model.num_prototypes))
    for j, v in result.visuals.items():
        r = result.records[j]
        i = int(r.source_image_id.split("/")[-1])  # type: ignore[union-attr]
        src = images.arrays[i]
        x0, y0, x1, y1 = r.box  # type: ignore[misc]
        assert np.array_equal(v.patch, src[y0:y1, x0:x1])
        assert v.source.shape == src.shape and v.activation.shape == src.shape
        assert not np.array_equal(v.source, src)  # the box is drawn
        assert v.patch.dtype == np.uint8 and v.activation.dtype == np.uint8
    # The same pictures come back from the saved records (what export does).
    again = render_visuals(result.records, result.activation_maps, images, PREP)
    for j, v in again.items():
        assert np.array_equal(v.patch, result.visuals[j].patch)
        assert np.array_equal(v.activation, result.visuals[j].activation)


def test_push_is_a_fixed_point() -> None:
    """Pushing again finds each prototype's own patch at distance ~0."""
    model, images = model_and_images()
    first = push_prototypes(model, images, PREP, visualize=False, channels_last=False)
    before = model.prototype_vectors.detach().clone()
    second = push_prototypes(model, images, PREP, visualize=False, channels_last=False)
    assert max(r.distance for r in second.records) < 1e-4  # type: ignore[type-var]
    torch.testing.assert_close(model.prototype_vectors.detach(), before, atol=1e-5, rtol=0)
    assert [r.source_image_id for r in first.records] == [r.source_image_id for r in second.records]


def test_a_class_without_images_is_an_error_naming_it() -> None:
    model, images = model_and_images(num_classes=3)
    only_two = images.subset([i for i in range(len(images)) if images.labels[i] != 2])
    before = model.prototype_vectors.detach().clone()
    with pytest.raises(PushError, match=r"no training image: 2 \('c2'\)"):
        push_prototypes(model, only_two, PREP)
    assert torch.equal(model.prototype_vectors.detach(), before)  # nothing half-projected


def test_bf16_push_searches_in_bf16_and_projects_exact_float32_patches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bfloat16 trunk picks each prototype's source image; the patch, its distance
    and the vector are float32 ones from that image (a brute-force search over it)."""
    model, images = model_and_images(proto_size=(2, 2))
    expected, z = brute_force_nearest(model, images)  # float32, before the push moves them
    protos = model.prototype_vectors.detach().clone()
    exact = push_prototypes(model, images, PREP, visualize=False)
    model2, _ = model_and_images(proto_size=(2, 2))
    scanned: list[int] = []  # images per trunk pass: all of them, then the chosen ones
    real_run = training.push._Scan.run

    def counting_run(self: training.push._Scan, batches: Any, progress: bool) -> Any:
        scanned.append(len(batches.dataset))
        return real_run(self, batches, progress)

    monkeypatch.setattr(training.push._Scan, "run", counting_run)
    fast = push_prototypes(model2, images, PREP, batch_size=5, visualize=False, precision="bf16")
    chosen = {r.source_image_id for r in fast.records}
    assert fast.precision == "bf16" and fast.images_seen == len(images)
    assert scanned == [len(images), len(chosen)]
    same = 0
    for j, r in enumerate(fast.records):
        i = int(r.source_image_id.split("/")[-1])  # type: ignore[union-attr]
        assert images.labels[i] == r.class_index
        # The nearest float32 patch within the chosen image, by loops.
        cells = [
            (float(((z[i][:, h : h + 2, w : w + 2] - protos[j]) ** 2).sum()), h, w)
            for h in range(z[i].shape[1] - 1)
            for w in range(z[i].shape[2] - 1)
        ]
        d, h, w = min(cells)
        assert r.patch_hw == (h, w)
        assert r.distance == pytest.approx(d, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(
            model2.prototype_vectors[j].detach(), z[i][:, h : h + 2, w : w + 2], atol=1e-5, rtol=0
        )
        m = fast.activation_maps[j]
        assert divmod(int(m.argmax()), m.shape[1]) == (h, w) and float(m.max()) > 8.5
        # Never worse than float32's choice by more than bfloat16's rounding.
        assert r.distance <= expected[j][0] * 1.05 + 1e-3
        same += r.source_image_id == exact.records[j].source_image_id and r.patch_hw == (
            exact.records[j].patch_hw
        )
    assert same >= len(fast.records) // 2


def test_bf16_push_runs_float32_when_it_cannot_pay() -> None:
    """6 prototypes, 11 images: the float32 pass after a bfloat16 search could take 6 of
    them, more than bfloat16 saves. Push runs once, in float32, and says so."""
    model, images = model_and_images()
    fewer = images.subset(list(range(11)))
    expected, _ = brute_force_nearest(model, fewer)
    result = push_prototypes(model, fewer, PREP, visualize=False, precision="bf16")
    assert result.precision == "fp32"
    assert [r.distance for r in result.records] == pytest.approx(
        [e[0] for e in expected], rel=1e-4, abs=1e-5
    )


def test_an_unknown_push_precision_is_an_error_naming_the_valid_ones() -> None:
    model, images = model_and_images()
    with pytest.raises(ValueError, match="unknown push precision 'fp8'; valid: bf16, fp32"):
        push_prototypes(model, images, PREP, precision="fp8")


@pytest.mark.parametrize("proto_size", [(1, 1), (2, 2), (1, 3)])
def test_self_distance_maps_are_each_prototypes_own_distances(
    proto_size: tuple[int, int],
) -> None:
    """Prototype j's map over latent map j alone equals column j of the full distances
    (the pictures' activation maps), computed per pair by loops."""
    h1, w1 = proto_size
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(4, 6, 5, 7, generator=g, dtype=torch.float64)
    protos = torch.rand(4, 6, h1, w1, generator=g, dtype=torch.float64)
    got = self_distance_maps(latents, protos)
    assert got.shape == (4, 5 - h1 + 1, 7 - w1 + 1)
    for j in range(4):
        ref = patch_distances(latents[j : j + 1].numpy(), protos[j : j + 1].numpy())[0, 0]
        np.testing.assert_allclose(got[j].numpy(), ref, rtol=1e-10, atol=1e-10)
