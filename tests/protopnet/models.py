"""Models the protopnet tests and the GPU tests build the same way."""

from __future__ import annotations

import torch

from protopnet import ProtoPNetConfig, create_model


def pushed_model(depth: int = 128, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small_cnn ProtoPNet whose prototypes are exact latent patches of its images (as
    push leaves every trained model), and those 16 images."""
    torch.manual_seed(seed)
    model = create_model(
        ProtoPNetConfig(
            backbone="small_cnn",
            num_classes=4,
            prototypes_per_class=4,
            prototype_depth=depth,
            img_size=64,
        )
    ).eval()
    x = torch.rand(16, 3, 64, 64)
    with torch.no_grad():
        z = model.conv_features(x)  # (16, D, H, W)
        H, W = z.shape[2:]
        for j in range(model.num_prototypes):
            b, h, w = j % 16, (3 * j) % H, (5 * j) % W
            model.prototype_vectors[j] = z[b, :, h, w].reshape(-1, 1, 1)
    return model, x
