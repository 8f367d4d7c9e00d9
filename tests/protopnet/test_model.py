"""The prototype layer and the forward pass against brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protopnet import ProtoPNetConfig, ShapeError, create_model
from protopnet.model import (
    class_identity,
    distance_to_similarity,
    l2_distances,
    last_layer_init,
    max_similarity,
)
from tests.protopnet.models import pushed_model
from tests.protopnet.reference import logits_from_min_distances, patch_distances, similarity


def tiny_model(**overrides: object) -> torch.nn.Module:
    cfg = dict(
        backbone="tiny_cnn", num_classes=3, prototypes_per_class=2, prototype_depth=6, img_size=16
    )
    cfg.update(overrides)
    return create_model(ProtoPNetConfig(**cfg)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("proto_size", [(1, 1), (2, 2), (1, 2), (2, 1), (3, 2)])
def test_l2_distances_match_patch_loops(proto_size: tuple[int, int]) -> None:
    h1, w1 = proto_size
    z = torch.rand(2, 4, 5, 6, dtype=torch.float64)
    protos = torch.rand(3, 4, h1, w1, dtype=torch.float64)
    got = l2_distances(z, protos)
    ref = patch_distances(z.numpy(), protos.numpy())
    assert got.shape == (2, 3, 5 - h1 + 1, 6 - w1 + 1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_l2_distances_model_method_uses_its_prototypes() -> None:
    model = tiny_model(prototype_size=(1, 2))
    z = torch.rand(2, 6, 4, 5)
    ref = patch_distances(z.double().numpy(), model.prototype_vectors.detach().double().numpy())
    np.testing.assert_allclose(model.distances(z).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_distances_never_negative_even_at_an_exact_match() -> None:
    # sum(z^2) - 2<z,p> + ||p||^2 cancels in float32 and can dip below 0 without the clamp.
    z = torch.rand(1, 512, 4, 4)
    protos = torch.stack([z[0, :, 1, 2], z[0, :, 3, 0]]).view(2, 512, 1, 1).clone()
    d = l2_distances(z, protos)
    assert float(d.min()) >= 0.0
    assert float(d[0, 0, 1, 2]) < 1e-3 and float(d[0, 1, 3, 0]) < 1e-3
    big = 100 + torch.rand(1, 64, 4, 4)  # cancellation of order 0.1 here
    big_p = big[0, :, 2, 2].reshape(1, 64, 1, 1).clone()
    assert float(l2_distances(big, big_p).min()) >= 0.0
    # An exact match has the maximal similarity, about 9.21 = log(1 / 1e-4).
    sim = distance_to_similarity(torch.zeros(1), "log", 1e-4)
    assert float(sim) == pytest.approx(math.log(1e4), rel=1e-6)
    assert max_similarity("log") == pytest.approx(9.2103, abs=1e-4)


def test_similarity_log_and_linear_match_the_formulas() -> None:
    d = torch.tensor([0.0, 1e-4, 0.3, 1.0, 7.5, 1e3], dtype=torch.float64)
    log_sim = distance_to_similarity(d, "log", 1e-4)
    lin_sim = distance_to_similarity(d, "linear", 1e-4)
    for i, v in enumerate(d.tolist()):
        assert float(log_sim[i]) == pytest.approx(similarity(v, "log"), rel=1e-12)
        assert float(lin_sim[i]) == -v
    # Monotone decreasing in the distance and bounded by the value at 0.
    assert bool((log_sim[1:] < log_sim[:-1]).all())
    assert float(log_sim.max()) == pytest.approx(9.2103, abs=1e-4)
    with pytest.raises(ValueError, match=r"cosine.*valid: linear, log"):
        distance_to_similarity(d, "cosine")


@pytest.mark.parametrize("activation", ["log", "linear"])
@pytest.mark.parametrize("proto_size", [(1, 1), (2, 2), (1, 2)])
def test_forward_logits_equal_the_scoring_sheet(
    activation: str, proto_size: tuple[int, int]
) -> None:
    model = tiny_model(activation=activation, prototype_size=proto_size)
    with torch.no_grad():  # random last layer: the sheet must hold for any weights
        model.last_layer.weight.normal_()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_full(x)
        logits, min_d = model(x)
        z = model.conv_features(x).double().numpy()
    protos = model.prototype_vectors.detach().double().numpy()
    ref_d = patch_distances(z, protos)
    np.testing.assert_allclose(out.distances.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    ref_min = ref_d.reshape(2, protos.shape[0], -1).min(axis=2)
    np.testing.assert_allclose(min_d.numpy(), ref_min, rtol=1e-4, atol=1e-4)
    w = model.last_layer.weight.detach().double().numpy()
    ref_logits = logits_from_min_distances(ref_min, w, activation)
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-3, atol=1e-3)
    # The scoring sheet: points[k, j] = similarity_j * w[k, j]; rows sum to every logit.
    for b in range(2):
        for k in range(model.num_classes):
            points = [
                similarity(float(ref_min[b, j]), activation) * float(w[k, j])
                for j in range(protos.shape[0])
            ]
            assert float(logits[b, k]) == pytest.approx(sum(points), rel=1e-3, abs=1e-3)
    # min_indices point at a patch that attains the minimum (saturated sigmoids give ties).
    flat = ref_d.reshape(2, protos.shape[0], -1)
    at_index = np.take_along_axis(flat, out.min_indices.numpy()[..., None], axis=2)[..., 0]
    np.testing.assert_allclose(at_index, ref_min, rtol=1e-4, atol=1e-4)


def test_latent_features_lie_in_zero_one() -> None:
    for add_on in ("regular", "bottleneck"):
        model = tiny_model(add_on=add_on, prototype_depth=4)
        with torch.no_grad():
            z = model.conv_features(torch.randn(3, 3, 16, 16) * 5)
        assert z.shape == (3, 4, 8, 8)
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0


def test_bottleneck_halves_the_width_until_the_depth() -> None:
    model = create_model(
        ProtoPNetConfig(backbone="small_cnn", num_classes=2, prototype_depth=32, img_size=16)
    )
    convs = [m for m in model.add_on_layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (256, 128), (128, 128), (128, 64), (64, 64), (64, 32), (32, 32)
    ]  # fmt: skip
    assert isinstance(model.add_on_layers[-1], torch.nn.Sigmoid)
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs)


@pytest.mark.parametrize("per_class", [1, 3, 10])
def test_last_layer_init_one_for_own_class_minus_half_elsewhere(per_class: int) -> None:
    model = tiny_model(num_classes=4, prototypes_per_class=per_class)
    w = model.last_layer.weight.detach()
    assert w.shape == (4, 4 * per_class)
    assert model.last_layer.bias is None
    for k in range(4):
        for j in range(4 * per_class):
            own = j // per_class == k  # contiguous blocks per class
            assert float(w[k, j]) == (1.0 if own else -0.5)
    assert model.prototype_classes.tolist() == [j // per_class for j in range(4 * per_class)]


def test_explicit_prototype_classes_any_order_and_count() -> None:
    classes = (2, 0, 0, 1, 2, 2, 0)
    model = tiny_model(num_classes=3, prototype_classes=classes)
    assert model.num_prototypes == 7
    assert model.prototype_classes.tolist() == list(classes)
    w = model.last_layer.weight.detach()
    for k in range(3):
        for j, c in enumerate(classes):
            assert float(w[k, j]) == (1.0 if c == k else -0.5)
    ident = class_identity(list(classes), 3)
    np.testing.assert_array_equal(last_layer_init(ident, -0.25).numpy()[:, 0], [-0.25, -0.25, 1])


def test_config_rejects_bad_prototype_classes_naming_them() -> None:
    with pytest.raises(ValueError, match=r"\[5\] outside 0..2"):
        ProtoPNetConfig(num_classes=3, prototype_classes=(0, 5))
    with pytest.raises(ValueError, match="must not be empty"):
        ProtoPNetConfig(num_classes=3, prototype_classes=())
    with pytest.raises(ValueError, match="prototype_size must be positive"):
        ProtoPNetConfig(num_classes=3, prototype_size=(0, 1))


def test_state_dict_keys_and_shapes_match_the_reference() -> None:
    model = tiny_model(prototype_size=(2, 1))
    sd = model.state_dict()
    assert sd["prototype_vectors"].shape == (6, 6, 2, 1)
    assert sd["ones"].shape == (6, 6, 2, 1) and bool((sd["ones"] == 1).all())
    assert sd["last_layer.weight"].shape == (3, 6)
    assert "add_on_layers.0.weight" in sd and "add_on_layers.0.bias" in sd
    assert "prototype_class_identity" not in sd  # derived from the config, not stored
    assert "features.features.0.weight" in sd


def test_a_new_model_is_reproducible_from_its_seed_and_scores_sanely() -> None:
    """Training from a seed is repeatable: the same seed builds the same model, another
    seed another one. Prototypes start where the latent features live (the add-on ends in
    a sigmoid, so in (0, 1)): a fresh model's distances are those of points in the unit
    cube, neither zero nor huge, and its similarities lie between the activation's bounds."""

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return tiny_model(num_classes=10, prototypes_per_class=10, prototype_depth=32)

    a, b, c = build(1), build(1), build(2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.prototype_vectors, c.prototype_vectors)
    with torch.no_grad():
        out = a.forward_full(torch.rand(4, 3, 16, 16))
    D = 32
    # Independent uniform points in [0, 1]^D are D / 6 apart in squared distance on
    # average; the closest of a few dozen patches is a fair share of that.
    assert 0.01 * D / 6 < float(out.min_distances.mean()) < D / 6
    sims = a.similarity(out.min_distances)
    assert float(sims.min()) > 0 and float(sims.max()) < max_similarity("log")


def test_wrong_input_shape_is_a_clear_shape_error() -> None:
    model = tiny_model()
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\), got \(1, 1, 16, 16\)"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ShapeError, match=r"got \(3, 16, 16\)"):
        model(torch.zeros(3, 16, 16))


def test_grid_too_small_for_the_prototypes_is_refused() -> None:
    with pytest.raises(ShapeError, match="small_cnn at 8 px gives a 2 x 2 latent grid"):
        create_model(
            ProtoPNetConfig(backbone="small_cnn", num_classes=2, img_size=8, prototype_size=(3, 3))
        )
    # A wide prototype on a short grid: caught at build time, not at the first forward.
    with pytest.raises(ShapeError, match=r"too small for 1 x 3 prototypes"):
        create_model(
            ProtoPNetConfig(backbone="small_cnn", num_classes=2, img_size=8, prototype_size=(1, 3))
        )


def test_pushed_prototypes_score_the_same_at_any_batch_size_and_layout() -> None:
    """At a pushed prototype the expanded distance in float32 is cancellation residue,
    which moved similarities by ~0.05 and logits by ~0.03 between batch sizes and layouts
    (and picked another of several near matches); the model's distances are precise."""
    model, x = pushed_model()
    with torch.inference_mode():
        alone = [model.forward_full(x[i : i + 1]) for i in range(16)]
        batch = model.forward_full(x)
        model.to(memory_format=torch.channels_last)
        cl = model.forward_full(x.contiguous(memory_format=torch.channels_last))
    for name, out in (("batch 16", batch), ("channels-last", cl)):
        for i in range(16):
            np.testing.assert_allclose(
                out.logits[i].numpy(), alone[i].logits[0].numpy(), rtol=1e-5, atol=1e-5,
                err_msg=f"{name}: logits of image {i}",
            )  # fmt: skip
            np.testing.assert_allclose(
                model.similarity(out.min_distances[i]).numpy(),
                model.similarity(alone[i].min_distances[0]).numpy(),
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{name}: similarities of image {i}",
            )
    # Each prototype's own image scores it at the maximum, log(1 / eps), to float32.
    own = torch.stack([batch.min_distances[j % 16, j] for j in range(model.num_prototypes)])
    assert float(own.max()) < 1e-9
    # The float32 sum, for comparison, is off by the residue the test guards against.
    with torch.inference_mode():
        z = model.conv_features(x.contiguous())
        rough = l2_distances(z, model.prototype_vectors).flatten(2).amin(dim=2)
    assert float((rough - batch.min_distances).abs().max()) > 1e-7
