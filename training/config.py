"""The training run's configuration: a YAML file validated by pydantic, with overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the
valid ones instead of a silently ignored setting. ``--set train.epochs=3`` overrides any
value (parsed as YAML, so ``null``, ``[1, 1]`` and ``true`` work).

Three kinds of configuration stay apart: the architecture (``protopnet.ProtoPNetConfig``,
built from the ``model`` section and saved with every checkpoint), this run
configuration, and the service's settings (not here).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protopnet.backbones import get_backbone_spec
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.drumond import DrumondConfig
from protopnet.errors import ProtoPNetError, UnknownNameError


class ConfigError(ProtoPNetError, ValueError):
    """A configuration file or override that does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(_Section):
    """Online augmentation of training images (torchvision transforms v2).

    The reference augments offline (rotation, skew, shear, flip); the same operations
    run here on every epoch's images. Push and evaluation never see augmented images.
    """

    enabled: bool = True
    rotation: float = Field(default=15.0, ge=0, le=180)  # degrees, uniform in [-r, r]
    perspective: float = Field(default=0.2, ge=0, le=1)  # distortion scale ("skew"); 0 = off
    perspective_p: float = Field(default=0.5, ge=0, le=1)
    shear: float = Field(default=10.0, ge=0, le=45)  # degrees, x and y
    hflip: bool = True


class SyntheticConfig(_Section):
    """The synthetic "parts" dataset (see ``training.synthetic``)."""

    num_classes: int = Field(default=4, ge=2, le=40)
    train_per_class: int = Field(default=60, ge=1)
    test_per_class: int = Field(default=20, ge=1)
    image_size: int = Field(default=32, ge=16, le=512)
    part_size: int = Field(default=8, ge=4)
    clutter: int = Field(default=10, ge=0)  # distractor shapes per image
    # A confound: training images (not test images) of class k carry a solid square of
    # this side in a colour of class k's own, at a random place (0: none). A model that
    # learns the mark instead of the part loses accuracy on the test split.
    confound_mark: int = Field(default=0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _part_fits(self) -> SyntheticConfig:
        if self.part_size > self.image_size // 2:
            raise ValueError(
                f"part_size {self.part_size} must be at most half of image_size {self.image_size}"
            )
        return self


class DataConfig(_Section):
    """Where the images come from, and how training data is split and loaded."""

    kind: Literal["imagefolder", "cub", "fashion_mnist", "synthetic"]
    # imagefolder: a folder with train/ and test/ class folders; cub: the CUB_200_2011
    # folder (images.txt, ...); fashion_mnist: the IDX folder (default: Debian's path).
    root: Path | None = None
    download: bool = False  # fashion_mnist only: fetch with torchvision when missing
    val_fraction: float = Field(default=0.1, ge=0, lt=1)  # carved from training data, per class
    train_subset: int | None = Field(default=None, ge=1)  # at most this many training images
    test_subset: int | None = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)  # DataLoader worker processes
    synthetic: SyntheticConfig = SyntheticConfig()
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _root_given(self) -> DataConfig:
        if self.kind in ("imagefolder", "cub") and self.root is None:
            raise ValueError(f"data.root is required for data.kind {self.kind!r}")
        return self


class DrumondSection(_Section):
    """``model.kind: drumond``: Drumond et al.'s soft-max prototypes on the trunk's pooled
    embedding (``protopnet.drumond``). The head is fitted on the training split's
    embeddings (k-means start, then full-batch Adam); with ``train_trunk`` the whole
    network is then fine-tuned for ``train.epochs`` epochs (Adam, ``train.lr.
    joint_features`` for the trunk)."""

    num_prototypes: int | None = Field(default=None, ge=1)  # None: prototypes_per_class x K
    penalty: Literal["l1", "l2"] = "l1"
    alpha: float = Field(default=1e-3, ge=0)  # weight of the penalty on w
    train_trunk: bool = False
    head_steps: int = Field(default=300, ge=1)
    head_lr: float = Field(default=0.05, gt=0)


class ModelSection(_Section):
    """The architecture (becomes ``ProtoPNetConfig``, or ``DrumondConfig`` for
    ``kind: drumond``) and the input preprocessing."""

    kind: Literal["protopnet", "drumond"] = "protopnet"
    drumond: DrumondSection = DrumondSection()
    backbone: str = "small_cnn"
    weights: str | None = None  # None, "imagenet" or a local state_dict file
    prototypes_per_class: int = Field(default=10, ge=1)
    prototype_depth: int = Field(default=128, ge=1)
    prototype_size: tuple[int, int] = (1, 1)
    add_on: Literal["regular", "bottleneck"] = "bottleneck"
    activation: Literal["log", "linear"] = "log"
    epsilon: float = Field(default=1e-4, gt=0)
    img_size: int = Field(default=224, ge=8, le=2048)
    resize: Literal["stretch", "center_crop", "pad"] = "stretch"
    grayscale: bool = False
    # None: the trunk's own normalisation (ImageNet statistics for torchvision trunks).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _known_backbone(self) -> ModelSection:
        try:
            get_backbone_spec(self.backbone)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        return self

    def architecture(self, num_classes: int) -> ProtoPNetConfig:
        return ProtoPNetConfig(
            backbone=self.backbone,
            num_classes=num_classes,
            prototypes_per_class=self.prototypes_per_class,
            prototype_depth=self.prototype_depth,
            prototype_size=self.prototype_size,
            add_on=self.add_on,
            activation=self.activation,
            epsilon=self.epsilon,
            img_size=self.img_size,
        )

    def drumond_architecture(self, num_classes: int) -> DrumondConfig:
        d = self.drumond
        return DrumondConfig(
            backbone=self.backbone,
            num_classes=num_classes,
            num_prototypes=d.num_prototypes or self.prototypes_per_class * num_classes,
            img_size=self.img_size,
            penalty=d.penalty,
            alpha=d.alpha,
            train_trunk=d.train_trunk,
        )

    def preprocessing(self) -> Preprocessing:
        spec = get_backbone_spec(self.backbone)
        return Preprocessing(
            img_size=self.img_size,
            resize=self.resize,
            mean=self.mean or spec.mean,
            std=self.std or spec.std,
            grayscale=self.grayscale,
        )


class LearningRates(_Section):
    """Adam learning rates per stage and parameter group (the reference's defaults)."""

    warm_add_on: float = Field(default=3e-3, gt=0)
    warm_prototypes: float = Field(default=3e-3, gt=0)
    joint_features: float = Field(default=1e-4, gt=0)
    joint_add_on: float = Field(default=3e-3, gt=0)
    joint_prototypes: float = Field(default=3e-3, gt=0)
    last_layer: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-3, ge=0)  # trunk and add-on layers
    joint_step_size: int = Field(default=5, ge=1)  # joint epochs between decays
    joint_gamma: float = Field(default=0.1, gt=0, le=1)


class LossCoefficients(_Section):
    """loss = crs_ent * CE + clst * Clst + sep * Sep + l1 * L1 (sep enters negative).

    ``class_weights: balanced`` is for imbalanced data (a rare finding among normal
    scans): each training image's CE counts N / (K * n_class), so every class weighs as
    much in total, in the SGD stages and the last layer alike; the best checkpoint is
    then the one with the highest validation balanced accuracy (mean recall), not
    accuracy, which a model can raise by ignoring a rare class.
    """

    crs_ent: float = 1.0
    clst: float = 0.8
    sep: float = -0.08
    l1: float = 1e-4
    class_weights: Literal["none", "balanced"] = "none"


class TrainConfig(_Section):
    """The stage schedule. Defaults follow the paper and its reference implementation:
    5 warm-up epochs, push every 10 epochs from epoch 10, 20 last-layer epochs per push.
    The last epoch always ends with a push, so the final model's prototypes are real
    training patches."""

    epochs: int = Field(default=50, ge=1)
    warm_epochs: int = Field(default=5, ge=0)
    push_start: int = Field(default=10, ge=0)
    push_every: int = Field(default=10, ge=1)
    last_layer_epochs: int = Field(default=20, ge=0)
    batch_size: int = Field(default=80, ge=1)
    eval_batch_size: int = Field(default=100, ge=1)
    push_batch_size: int = Field(default=75, ge=1)
    # Last-layer stage: features are frozen, so each image's similarity scores are
    # computed once (unaugmented) and the convex problem runs on them.
    last_layer_batch_size: int = Field(default=256, ge=1)
    lr: LearningRates = LearningRates()
    loss: LossCoefficients = LossCoefficients()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    # Trunk precision during push's search. "bf16" searches with a bfloat16 trunk, then
    # runs the chosen images again in float32 and projects onto float32 patches there.
    # On the demo (18000 images, 100 prototypes, 2-core AVX512-BF16 CPU) 4.9 s against
    # 8.2 s, 91 of 100 prototypes on the same patch as float32 (the rest at most 0.6 %
    # farther); with fewer than two images per prototype it runs float32. "fp32" is exact.
    push_precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = True  # faster convolutions on CPU and tensor cores
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; None = torch's default
    seed: int = 0


class PruneConfig(_Section):
    """The paper's pruning (section 2.6): k nearest patches, fewer than tau own-class."""

    enabled: bool = False  # run after training (the `prune` verb runs it on demand)
    k: int = Field(default=6, ge=1)
    tau: int = Field(default=3, ge=1)
    last_layer_epochs: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _tau_le_k(self) -> PruneConfig:
        if self.tau > self.k:
            raise ValueError(f"prune.tau ({self.tau}) must be at most prune.k ({self.k})")
        return self


class ExportConfig(_Section):
    """How `export` publishes to the model store."""

    name: str | None = None  # None: the run's name
    store: Path | None = None  # None: $PROTOPNET_STORE, else ./store
    aliases: tuple[str, ...] = ("latest",)
    checkpoint: Literal["best", "last", "pruned"] = "best"


class RunConfig(_Section):
    """One training run: data, architecture, schedule, pruning and export."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    runs_dir: Path = Path("runs")
    data: DataConfig
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    export: ExportConfig = ExportConfig()

    def to_plain(self) -> dict[str, Any]:
        """JSON/YAML-safe dict (paths as strings, tuples as lists)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------
# Loading


def _configs_folder() -> Path:
    return Path(str(resources.files("training").joinpath("configs")))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in training/configs (without .yaml)."""
    return sorted(p.stem for p in _configs_folder().glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped config (e.g. ``fashion_mnist``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    shipped = shipped_configs()
    if str(name_or_path) not in shipped:
        raise UnknownNameError("config", str(name_or_path), shipped)
    return _configs_folder() / f"{name_or_path}.yaml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are left for validation to reject."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at the section a validation error points into."""
    model: Any = RunConfig
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = fields[part].annotation
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid training config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(x) for x in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(loc)
            lines.append(f"  {where}: unknown key; valid keys here: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_raw(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run configuration."""
    path = config_path(name_or_path)
    raw = apply_overrides(load_raw(path), list(overrides or []))
    return validate_config(raw, source=str(path))


def dump_config(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (kept in the run directory)."""
    return yaml.safe_dump(cfg.to_plain(), sort_keys=False)
