"""Architecture and preprocessing configuration: everything needed to rebuild a model.

These are frozen pydantic models so that they serialise to JSON (the model store's
manifest and every checkpoint keep them) and validate on the way back in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Preprocessing(BaseModel):
    """How an RGB image becomes the model's input tensor.

    Pixels are scaled to [0, 1], then normalised per channel: (x - mean) / std.
    ``resize``: "stretch" resizes to img_size x img_size ignoring aspect ratio (the
    reference implementation's choice); "center_crop" resizes the short side then
    crops the centre; "pad" letterboxes with black.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    img_size: int = Field(224, ge=8, le=2048)
    resize: Literal["stretch", "center_crop", "pad"] = "stretch"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    grayscale: bool = False  # convert to L then replicate to 3 channels (Fashion-MNIST, X-rays)


class ProtoPNetConfig(BaseModel):
    """The architecture of a ProtoPNet. Saved with every checkpoint and artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = "small_cnn"
    num_classes: int = Field(ge=1)
    prototypes_per_class: int = Field(10, ge=1)
    # Explicit class of each prototype; overrides prototypes_per_class (pruned models,
    # uneven classes). Contiguous blocks are not required.
    prototype_classes: tuple[int, ...] | None = None
    prototype_depth: int = Field(128, ge=1)
    prototype_size: tuple[int, int] = (1, 1)  # (h1, w1)
    add_on: Literal["regular", "bottleneck"] = "bottleneck"
    activation: Literal["log", "linear"] = "log"
    epsilon: float = Field(1e-4, gt=0)
    img_size: int = Field(224, ge=8, le=2048)

    @field_validator("prototype_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < 1:
            raise ValueError(f"prototype_size must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _check_classes(self) -> ProtoPNetConfig:
        if self.prototype_classes is not None:
            if len(self.prototype_classes) == 0:
                raise ValueError("prototype_classes must not be empty")
            bad = [c for c in self.prototype_classes if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(
                    f"prototype_classes holds {bad[:5]} outside 0..{self.num_classes - 1}"
                )
        return self

    @property
    def num_prototypes(self) -> int:
        if self.prototype_classes is not None:
            return len(self.prototype_classes)
        return self.num_classes * self.prototypes_per_class

    def classes_of_prototypes(self) -> list[int]:
        """Class index of every prototype, in prototype order."""
        if self.prototype_classes is not None:
            return list(self.prototype_classes)
        return [k for k in range(self.num_classes) for _ in range(self.prototypes_per_class)]
