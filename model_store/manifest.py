"""The artifact's manifest: a versioned pydantic schema, stored as manifest.json.

A published version is a folder that never changes again:

    manifest.json              this schema
    weights.safetensors        the state_dict, reference key names
    familiarity.safetensors    the familiarity score's class means, precision, calibration
    prototypes/activations.safetensors   raw low-resolution self-activation maps (P, H', W')
    prototypes/<j>_patch.png   the prototype's box crop of its source image
    prototypes/<j>_source.png  the source image with the box drawn
    prototypes/<j>_activation.png  the self-activation overlay on the source image

A version's ``kind`` says which model it holds: "protopnet" (:class:`Manifest`, every
version published before kinds existed) or "drumond" (:class:`DrumondManifest`, Drumond
et al.'s soft-max prototypes: weights.safetensors and prototypes/<j>_nearest.png, each
prototype's nearest training images).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.drumond import DrumondConfig

SCHEMA_VERSION: Final = 1


class PrototypeRecord(BaseModel):
    """One prototype's provenance, as recorded at push (or at an import's visualisation)."""

    model_config = ConfigDict(extra="forbid")

    index: int  # column in the last layer / row in prototype_vectors
    class_index: int
    source_image_id: str | None = None  # dataset id (e.g. CUB image id or file name)
    source_path: str | None = None  # path as recorded at push, relative to the data root
    source_size: tuple[int, int] | None = None  # (width, height) of the source image
    patch_hw: tuple[int, int] | None = None  # latent cell (h, w) of the nearest patch
    distance: float | None = None  # squared L2 at push
    box: tuple[int, int, int, int] | None = None  # 95th-pct box (x0, y0, x1, y1), source px
    pruned: bool = False
    has_images: bool = False  # prototypes/<j>_*.png present


class ClassMetrics(BaseModel):
    """One class on the test split: its images, recall (sensitivity: the share of its
    images given this class) and precision (the share of this answer that was right)."""

    label: str
    images: int
    recall: float | None = None  # None: no test image of the class
    precision: float | None = None  # None: never predicted


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_balanced_accuracy: float | None = None  # mean recall over the classes
    test_per_class: list[ClassMetrics] | None = None
    test_confusion: list[list[int]] | None = None  # rows: true class, columns: predicted
    baseline_gap_points: float | None = None


class FamiliarityInfo(BaseModel):
    """How the version's familiarity score was fitted and calibrated (``protopnet.
    familiarity``); its tensors are ``familiarity.safetensors``."""

    model_config = ConfigDict(extra="forbid")

    method: str  # e.g. "latent-mahalanobis"
    fitted_on: str
    fitted_images: int
    calibrated_on: str
    calibration_images: int
    percentiles: dict[str, float]  # of the calibration images' scores: p1, p5, p50, p95


class PrototypeQuality(BaseModel):
    """One prototype's figures (``protopnet.quality``)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    class_index: int
    duplicate_of: int | None = None  # an earlier prototype on the same patch or vector
    # Background: its source patch is nearly flat, or (where the data has part or object
    # boxes) it misses the object: ``off_object``. None: neither could be measured.
    background: bool | None = None
    off_object: bool | None = None  # its source box does not overlap the image's part box
    patch_std: float | None = None  # luminance std of its source patch, 0..1
    images: int = 0  # images of its class it was measured on
    stability: float | None = None
    part_share: float | None = None  # share of those images whose box holds the part
    # Its k nearest training patches (one per image; a stratified sample of the training
    # split): their images' classes, and the share of them from its own class.
    nearest_classes: list[int] = Field(default_factory=list)
    nearest_own_share: float | None = None


class Interpretability(BaseModel):
    """How good the version's prototypes are, measured at export (``protopnet.quality``).
    Higher is better for every figure but the counts of duplicates and background
    prototypes; None where it could not be measured (consistency without part boxes)."""

    model_config = ConfigDict(extra="forbid")

    prototypes: int  # not pruned
    unique_prototypes: int
    duplicates: int  # prototypes on an earlier one's patch or vector
    background_prototypes: int
    sparsity: float  # share of the last layer's |w| on own-class prototypes
    stability: float | None = None
    consistency: float | None = None  # needs part boxes
    measured_on: str = ""  # e.g. "test split, 400 images"
    images: int = 0
    per_prototype: list[PrototypeQuality] = Field(default_factory=list)


class Lineage(BaseModel):
    """Where a revised version came from (``python -m training revise``)."""

    model_config = ConfigDict(extra="forbid")

    derived_from: str  # name@version
    removed_prototypes: list[int]  # indices in that version
    reason: str | None = None
    by: str
    at: datetime
    kept_prototypes: list[int] = Field(default_factory=list)  # new index -> old index


class ManifestBase(BaseModel):
    """What every kind of version records: its name, input, classes, files."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    preprocessing: Preprocessing
    class_names: list[str]
    training_config: dict[str, Any] = Field(default_factory=dict)
    metrics: Metrics = Field(default_factory=Metrics)
    code_version: str = "unknown"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256 hex


class DrumondPrototype(BaseModel):
    """One of a Drumond model's prototypes, measured at export on (a stratified sample
    of) the training split. Its neighbourhood: the training images whose most probable
    prototype it is."""

    model_config = ConfigDict(extra="forbid")

    index: int
    class_weights: list[float]  # its column of w: what matching it adds to each class logit
    matched_images: int  # training images in its neighbourhood
    matched_classes: list[int]  # of those, per class
    nearest_image_ids: list[str] = Field(default_factory=list)  # nearest first
    nearest_classes: list[int] = Field(default_factory=list)
    nearest_distances: list[float] = Field(default_factory=list)  # squared L2 to p_j
    has_images: bool = False  # prototypes/<j>_nearest.png present

    @property
    def class_shares(self) -> list[float]:
        """``matched_classes`` as shares (all zero for an empty neighbourhood)."""
        n = sum(self.matched_classes)
        return [c / n if n else 0.0 for c in self.matched_classes]


class DrumondManifest(ManifestBase):
    """A version of Drumond et al.'s soft-max prototype model (``protopnet.drumond``)."""

    kind: Literal["drumond"]
    architecture: DrumondConfig
    prototypes: list[DrumondPrototype]
    embedded_images: int = 0  # training images the neighbourhoods were measured on


class Manifest(ManifestBase):
    """A ProtoPNet version."""

    kind: Literal["protopnet"] = "protopnet"
    architecture: ProtoPNetConfig
    prototypes: list[PrototypeRecord]
    source: Literal["training", "import-reference"] = "training"
    familiarity: FamiliarityInfo | None = None  # None: published without calibration
    interpretability: Interpretability | None = None  # None: published before it existed
    lineage: Lineage | None = None  # None: not a revision of another version


AnyManifest = Manifest | DrumondManifest


def parse_manifest(raw: bytes | str) -> AnyManifest:
    """A manifest.json of any kind (raises pydantic's ValidationError)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None  # the ProtoPNet schema reports it
    if isinstance(data, dict) and data.get("kind") == "drumond":
        return DrumondManifest.model_validate_json(raw)
    return Manifest.model_validate_json(raw)
