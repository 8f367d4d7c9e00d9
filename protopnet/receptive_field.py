"""Receptive-field arithmetic along a trunk's main path.

For every conv / pool layer (kernel k, stride s, padding p) the usual recurrences hold:
    n_out = floor((n_in + 2p - k) / s) + 1      cells per side
    j_out = j_in * s                             jump (pixels between cell centres)
    r_out = r_in + (k - 1) * j_in                receptive field size
    c_out = c_in + ((k - 1) / 2 - p) * j_in      centre of the first cell
Residual shortcuts and dense concatenations are parallel paths no longer than the main
one, so walking the main path's layers in registration order gives the receptive field.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerGeometry:
    kernel: int
    stride: int
    padding: int  # before (top / left)
    padding_after: int | None = None  # bottom / right when asymmetric ("same" convs)


@dataclass(frozen=True)
class ReceptiveField:
    """Geometry of one latent cell: grid size, jump, field size, centre of cell (0, 0)."""

    size: int  # n: latent cells per side
    jump: float  # j: input pixels between neighbouring cell centres
    field: float  # r: receptive field side in input pixels
    start: float  # centre of cell 0 in input pixel coordinates

    def box(self, h: int, w: int, img_size: int) -> tuple[int, int, int, int]:
        """Receptive field of latent cell (h, w) as (x0, y0, x1, y1), end exclusive, clipped."""
        half = self.field / 2
        cy, cx = self.start + h * self.jump, self.start + w * self.jump
        y0, y1 = max(int(cy - half + 0.5), 0), min(int(cy + half + 0.5), img_size)
        x0, x1 = max(int(cx - half + 0.5), 0), min(int(cx + half + 0.5), img_size)
        return x0, y0, x1, y1


@dataclass(frozen=True)
class PatchField:
    """Receptive field of an h1 x w1 window of latent cells (a prototype's patch):
    rows and columns have their own field when the window is not square."""

    rows: ReceptiveField  # vertical geometry, window h1
    cols: ReceptiveField  # horizontal geometry, window w1

    @property
    def grid(self) -> tuple[int, int]:
        """(H', W'): window positions per column and per row."""
        return self.rows.size, self.cols.size

    def box(self, h: int, w: int, img_size: int) -> tuple[int, int, int, int]:
        """Input pixels seen by the window at latent cell (h, w): (x0, y0, x1, y1)."""
        x0, _, x1, _ = self.cols.box(0, w, img_size)
        _, y0, _, y1 = self.rows.box(h, 0, img_size)
        return x0, y0, x1, y1


def _pair(v: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(v, tuple | list):
        if len(set(v)) != 1:
            raise ValueError(f"non-square layer geometry {v} is not supported")
        return int(v[0])
    return int(v)


def layer_geometry(trunk: nn.Module) -> list[LayerGeometry]:
    """Conv and pool layers on the main path of ``trunk``, in forward order.

    Shortcut branches (ResNet's ``downsample``) are skipped; global / adaptive pools
    never appear inside the trunks we build.
    """
    layers: list[LayerGeometry] = []
    for name, module in trunk.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(module, nn.Conv2d):
            pad = module.padding
            if isinstance(pad, str):
                raise ValueError(f"string padding {pad!r} in {name} is not supported")
            before = after = _pair(pad)
            # TF-style "same" convs (EfficientNet) pad asymmetrically with a ZeroPad2d child.
            static = getattr(module, "static_padding", None)
            if isinstance(static, nn.ZeroPad2d):
                before += int(static.padding[0])  # (left, right, top, bottom)
                after += int(static.padding[1])
            layers.append(
                LayerGeometry(_pair(module.kernel_size), _pair(module.stride), before, after)
            )
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            stride = module.stride if module.stride is not None else module.kernel_size
            layers.append(
                LayerGeometry(
                    _pair(module.kernel_size),
                    _pair(stride),  # type: ignore[arg-type]
                    _pair(module.padding),  # type: ignore[arg-type]
                )
            )
    return layers


def compute_receptive_field(
    layers: list[LayerGeometry], img_size: int, prototype_size: int = 1
) -> ReceptiveField:
    n, j, r, start = float(img_size), 1.0, 1.0, 0.5
    for layer in [*layers, LayerGeometry(prototype_size, 1, 0)]:
        k, s, p = layer.kernel, layer.stride, layer.padding
        p_after = p if layer.padding_after is None else layer.padding_after
        n_out = (n + p + p_after - k) // s + 1
        start = start + ((k - 1) / 2 - p) * j
        r = r + (k - 1) * j
        j = j * s
        n = n_out
    return ReceptiveField(size=int(n), jump=j, field=r, start=start)


def compute_patch_field(
    layers: list[LayerGeometry], img_size: int, window: tuple[int, int]
) -> PatchField:
    """The field of an (h1, w1) window on the latent grid of a square ``img_size`` input."""
    h1, w1 = window
    return PatchField(
        rows=compute_receptive_field(layers, img_size, h1),
        cols=compute_receptive_field(layers, img_size, w1),
    )
