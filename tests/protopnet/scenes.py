"""Shared test scenes: a red square on grey, and a model whose prototype 0 is "red"."""

from __future__ import annotations

import torch
from PIL import Image

from protopnet import Preprocessing, ProtoPNet, ProtoPNetConfig, create_model
from protopnet.preprocess import eval_transform

IMG = 32  # tiny_cnn: stride 2, a 16 x 16 latent grid, 14 px receptive field
RED, GREY = (220, 30, 30), (110, 110, 110)
PREP = Preprocessing(img_size=IMG, mean=(0.5,) * 3, std=(0.5,) * 3)


def red_square_image(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A grey w x h image with a red rectangle at box (x0, y0, x1, y1), end exclusive."""
    img = Image.new("RGB", (w, h), GREY)
    img.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), RED), box[:2])
    return img


def texture_model(seed: int = 0) -> ProtoPNet:
    """tiny_cnn ProtoPNet whose prototype 0 is the latent vector of a plain red image, so
    it lights up exactly on red regions; the other five prototypes are random. The same
    weights whatever ran before: module-scoped fixtures are built before the per-test
    seed is set, from whatever random state the previous test left."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _texture_model()


def _texture_model() -> ProtoPNet:
    model = create_model(
        ProtoPNetConfig(
            backbone="tiny_cnn", num_classes=3, prototypes_per_class=2, prototype_depth=8,
            img_size=IMG,
        )
    ).eval()  # fmt: skip
    red = eval_transform(PREP)(Image.new("RGB", (IMG, IMG), RED))[None]
    with torch.no_grad():
        # Untrained batch norms give tiny trunk outputs on plain colours, so every latent
        # vector sits near the sigmoid's 0.5 and all colours look alike. Scaling the add-on
        # convs spreads the features over (0, 1): red vs grey is then a distance of ~0.6.
        for layer in model.add_on_layers:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.mul_(30**0.5)
        z = model.conv_features(red)  # (1, D, 16, 16)
        model.prototype_vectors[0] = z[0, :, 8, 8].view(-1, 1, 1)
    return model
