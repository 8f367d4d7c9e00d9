"""The service's JSON: request options and response bodies (all in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

HeatmapMode = Literal["url", "inline", "none"]
HeatmapStyle = Literal["overlay", "heatmap", "mask"]
HeatmapSize = Literal["display", "upload"]
# upsample: the paper's (the latent similarity map, bicubically upsampled); smoothgrad:
# the gradient of the prototype's similarity with respect to the input, averaged over
# noisy copies (captum); prp: prototypical relevance propagation (zennit's LRP rules and
# the prototype layer's own, protopnet/prp.py). Each can be drawn on demand for one prototype.
MapMethod = Literal["upsample", "smoothgrad", "prp"]
ImageKind = Literal["patch", "source", "activation"]


class Size(BaseModel):
    width: int
    height: int


class Box(BaseModel):
    """A 95th-percentile box in the oriented image's pixels; x1, y1 are exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int


class Point(BaseModel):
    x: int
    y: int


class LatentCell(BaseModel):
    """A cell of the model's latent grid (row h, column w)."""

    h: int
    w: int


class ModelRef(BaseModel):
    name: str
    version: str
    manifest_sha256: str


class ImageInfo(BaseModel):
    """The upload as received, after EXIF orientation, and the size heatmaps are drawn at."""

    sha256: str
    format: str
    mode: str = Field(description="the file's own pixel mode: RGB, RGBA, P, L, I;16, CMYK ...")
    received: Size = Field(description="as stored in the file, before EXIF orientation")
    oriented: Size = Field(description="after EXIF orientation; boxes use these pixels")
    display: Size = Field(description="size of heatmap PNGs (the oriented size, capped)")
    exif_orientation: int = 1
    frames: int = Field(default=1, description="> 1 for animations; only the first frame is used")


class ClassScore(BaseModel):
    class_index: int
    label: str
    logit: float
    probability: float


class Prediction(ClassScore):
    """The top class."""


class SheetRow(BaseModel):
    """One prototype's contribution: points = similarity x weight."""

    prototype: int
    similarity: float
    weight: float
    points: float


class ScoringSheet(BaseModel):
    """Why a class got its logit: its own prototypes' points, sorted, then the totals.

    ``total`` = ``own_total`` + ``other_total`` = the class's logit; other classes'
    prototypes usually contribute little after last-layer training.
    """

    class_index: int
    label: str
    logit: float
    rows: list[SheetRow] = Field(description="this class's own prototypes, most points first")
    own_total: float
    other_prototypes: int = Field(description="prototypes of other classes, summed below")
    other_total: float
    total: float


class TopPrototype(BaseModel):
    """One of the most activated prototypes over all classes (the paper's local analysis)."""

    rank: int
    prototype: int
    class_index: int
    label: str
    similarity: float
    latent_cell: LatentCell


class HeatmapLinks(BaseModel):
    overlay: str = Field(description="JET over the image, the paper's 0.5/0.3 blend")
    heatmap: str = Field(description="RGBA, alpha = activation, for front-ends to overlay")
    mask: str = Field(description="white where the map is >= its 95th percentile")


class PrototypeLinks(BaseModel):
    patch: str
    source: str
    activation: str


class FaithfulnessReceipt(BaseModel):
    """Whether the box shows what the model matched: the deletion test beside boxes of
    its size placed at random (``protopnet.faithfulness.receipts``)."""

    deletion_ratio: float = Field(
        description="similarity left at the prototype's cell with the box blanked (after / "
        "before): low means the box held what drove the match"
    )
    random_deletion_ratio: float = Field(
        description="the same for boxes of this size placed at random, averaged"
    )
    verdict: Literal["faithful", "doubtful"] = Field(
        description="faithful: deletion_ratio <= 0.8 x random_deletion_ratio"
    )


class FamiliarityAnswer(BaseModel):
    """Whether the image looks like what the model learned from
    (``protopnet.familiarity``): if not, do not rely on the answer."""

    familiar: bool | None = Field(
        description="false: nothing in this image looks like the training images, do not "
        "rely on the answer; null: this model version has no familiarity calibration"
    )
    score: float | None = Field(
        description="minus the Mahalanobis distance of the image's mean latent features to "
        "the nearest class's training mean: higher is more familiar"
    )
    percentile: float | None = Field(
        description="share of the calibration (validation) images, in percent, that scored "
        "at most this"
    )
    threshold_percentile: float = Field(
        description="answers below this percentile are unfamiliar (a service setting)"
    )
    method: str | None = Field(description="how the score is computed, e.g. latent-mahalanobis")
    reason: str | None = Field(description="why familiar is null, when it is")


class ShownPrototype(BaseModel):
    """A prototype that appears in the explanation, with where it fired on the image."""

    prototype: int
    class_index: int
    label: str
    similarity: float
    box: Box
    peak: Point = Field(description="maximum of the upsampled map, oriented image pixels")
    heatmap: HeatmapLinks | None = Field(default=None, description="with heatmaps=url")
    heatmap_png: str | None = Field(
        default=None, description="with heatmaps=inline: base64 overlay PNG"
    )
    prototype_images: PrototypeLinks
    map_method: MapMethod = Field(
        default="upsample", description="the method that made this row's heatmap and box"
    )
    receipt: FaithfulnessReceipt | None = Field(
        default=None, description="with faithfulness=true: the box's deletion test"
    )


class ExplanationLinks(BaseModel):
    self: str
    boxes: str
    report: str


class ExplainResponse(BaseModel):
    """This looks like that: the prediction, its scoring sheets and where prototypes fired."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    model: ModelRef
    image: ImageInfo
    prediction: Prediction
    top_classes: list[ClassScore]
    scoring_sheets: list[ScoringSheet]
    top_prototypes: list[TopPrototype]
    prototypes: list[ShownPrototype]
    familiarity: FamiliarityAnswer
    heatmaps: HeatmapMode = "url"
    links: ExplanationLinks


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    image: ImageInfo
    prediction: Prediction
    top_classes: list[ClassScore]
    familiarity: FamiliarityAnswer


class ClassShare(BaseModel):
    class_index: int
    label: str
    share: float = Field(description="between 0 and 1")


class NearestImage(BaseModel):
    image_id: str = Field(description="the training image's id in its dataset")
    class_index: int
    label: str


class ClassScoreWeight(BaseModel):
    class_index: int
    label: str
    weight: float


class MatchedPrototype(BaseModel):
    """A prototype a Drumond model matched: a neighbourhood of the embedding space, not
    a class's own; what it says about each class is its class association."""

    prototype: int
    q: float = Field(description="the probability that the image falls in its neighbourhood")
    class_weights: list[ClassScoreWeight] = Field(
        description="its column of w: what matching it adds to each class's logit"
    )
    neighbourhood: list[ClassShare] = Field(
        description="the classes of the training images whose most probable prototype it "
        "is, largest share first"
    )
    neighbourhood_images: int = Field(description="training images in its neighbourhood")
    nearest: list[NearestImage] = Field(description="its nearest training images, nearest first")
    nearest_png: str | None = Field(description="those images side by side, from the store")


class Ambiguity(BaseModel):
    """Whether the matched neighbourhoods are split between classes."""

    ambiguous: bool = Field(
        description="true: the prototypes this image matched also hold many training "
        "images of other classes, so the answer rests on a region the classes share"
    )
    answered_share: float = Field(
        description="q-weighted share of the matched neighbourhoods' training images in "
        "the answered class"
    )
    threshold: float = Field(description="ambiguous below this share")
    other_class: ClassShare | None = Field(
        description="the largest other class in those neighbourhoods"
    )


class DrumondLinks(BaseModel):
    self: str
    report: str


class DrumondExplainResponse(BaseModel):
    """A Drumond et al. soft-max prototype model's answer: the classes, the prototypes
    (whole-image neighbourhoods) the image matched, and whether they are shared between
    classes. It has no heatmaps: its prototypes are whole images, not parts."""

    model_config = ConfigDict(protected_namespaces=())

    kind: Literal["drumond"] = "drumond"
    id: str
    model: ModelRef
    image: ImageInfo
    prediction: Prediction
    top_classes: list[ClassScore]
    prototypes: list[MatchedPrototype]
    ambiguity: Ambiguity
    familiarity: FamiliarityAnswer
    links: DrumondLinks


# -- models ---------------------------------------------------------------------------


class ModelListEntry(BaseModel):
    name: str
    versions: list[str]
    aliases: dict[str, str]
    loaded: list[str] = Field(description="versions loaded in this replica")


class ModelList(BaseModel):
    default_model: str
    models: list[ModelListEntry]


class ModelDetail(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    manifest_sha256: str | None = None
    aliases: list[str]
    trunk: str
    image_size: int
    num_classes: int
    classes: list[str]
    num_prototypes: int
    prototypes_per_class: dict[str, int]
    prototype_shape: list[int]
    activation: str
    preprocessing: dict
    metrics: dict
    accuracy: float | None = Field(default=None, description="test accuracy, else validation")
    created_at: str
    source: str
    familiarity: dict | None = Field(
        default=None,
        description="how the familiarity score was fitted and calibrated; null: uncalibrated",
    )
    interpretability: dict | None = Field(
        default=None,
        description="how good the prototypes are, measured at export (unique and background "
        "prototypes, sparsity, stability, consistency; per_prototype figures); null: "
        "published before these were measured",
    )
    lineage: dict | None = Field(
        default=None,
        description="for a revised version: derived_from, removed_prototypes, reason, by, "
        "at; null: trained, not revised",
    )


class PrototypeInfo(BaseModel):
    prototype: int
    class_index: int
    label: str
    source_image_id: str | None = None
    source_size: Size | None = None
    latent_cell: LatentCell | None = None
    box: Box | None = None
    distance: float | None = None
    pruned: bool = False
    images: PrototypeLinks | None = None


class PrototypeList(BaseModel):
    name: str
    version: str
    prototypes: list[PrototypeInfo]


# -- changing the store (admin keys) ----------------------------------------------------

WHO = Field(
    default=None,
    max_length=200,
    description="who asks, recorded in the store's history (default: 'http')",
)


class AliasMove(BaseModel):
    """PUT /models/{name}/aliases/{alias}: point the alias at a version, through the
    promotion gate."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64, description="a version or an alias")
    tolerance: float = Field(
        default=0.01, ge=0, le=1, description="how much worse a figure may be (points of 1)"
    )
    force: bool = Field(default=False, description="move even if the gate refuses")
    by: str | None = WHO


class GateFigure(BaseModel):
    figure: str
    current: float | None
    candidate: float | None
    higher_is_better: bool
    worse_by: float | None = Field(description="None: not measured on both, not judged")
    passed: bool


class AliasMoved(BaseModel):
    name: str
    alias: str
    version: str
    previous: str | None
    promoted: bool
    forced: bool
    failed: list[str] = Field(description="figures worse by more than the tolerance")
    tolerance: float
    comparison: list[GateFigure] = Field(
        description="candidate against the alias's current version; empty when there was "
        "nothing to compare (a new alias, or the same version)"
    )


class RevisionRequest(BaseModel):
    """POST /models/{name}/revisions: remove prototypes and refit the last layer."""

    model_config = ConfigDict(extra="forbid")

    remove: list[int] = Field(min_length=1, max_length=10_000, description="prototype indices")
    reason: str | None = Field(default=None, max_length=2000)
    name: str | None = Field(default=None, max_length=64, description="publish under another name")
    aliases: list[str] = Field(
        default_factory=lambda: ["latest"], max_length=16, description="aliases to point at it"
    )
    by: str | None = WHO


class Revision(BaseModel):
    """A revision's record: running, then done (with the command line's result) or
    failed (with its error)."""

    id: str
    model: str = Field(description="the version it derives from, name@version")
    remove: list[int]
    reason: str | None
    name: str | None
    aliases: list[str]
    by: str
    state: Literal["running", "done", "failed"]
    started_at: str
    finished_at: str | None
    result: dict | None = Field(
        description="published (name@version), test accuracy before and after, seconds"
    )
    error: str | None
    url: str | None = None


# -- health ---------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    """ready: models loaded and warmed up, Redis reachable. degraded (still 200): serving,
    but Redis is unreachable (explanations cached in this replica only) or a start-up model
    failed to load (named in ``detail``). starting / failed (503): nothing to serve yet."""

    status: Literal["ready", "degraded", "starting", "failed"]
    models: list[str]
    devices: dict[str, str] = Field(
        default_factory=dict, description='where each loaded model runs: "cpu" or "cuda:N"'
    )
    cache: Literal["ok", "degraded", "local"]
    detail: str | None = None


# -- KServe v1 ------------------------------------------------------------------------


class KServeB64(BaseModel):
    b64: str


class KServeInstance(BaseModel):
    """One image: {"b64": ...}, {"image": {"b64": ...}} or {"image_bytes": {"b64": ...}}."""

    model_config = ConfigDict(extra="forbid")

    b64: str | None = None
    image: KServeB64 | None = None
    image_bytes: KServeB64 | None = None


class KServeRequest(BaseModel):
    """KServe v1 protocol: {"instances": [...]}, each a base64 string or an object."""

    instances: list[KServeInstance | str] = Field(min_length=1)
    parameters: dict[str, int | str] | None = Field(
        default=None, description="top_classes, top_prototypes, heatmaps"
    )


class KServePredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[PredictResponse]


class KServeExplainResponse(BaseModel):
    model_name: str
    model_version: str
    explanations: list[ExplainResponse]
