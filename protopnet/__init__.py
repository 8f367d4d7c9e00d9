"""ProtoPNet: the model and its math. No files, no HTTP, no settings."""

from protopnet.backbones import create_backbone, get_backbone_spec, list_backbones
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.errors import ProtoPNetError, ShapeError, UnknownNameError, WeightsError
from protopnet.explain import ImageExplanation, PrototypeExplainer, percentile_boxes
from protopnet.model import ProtoPNet, ProtoPNetOutput, create_model

__all__ = [
    "ImageExplanation",
    "Preprocessing",
    "ProtoPNet",
    "ProtoPNetConfig",
    "ProtoPNetError",
    "ProtoPNetOutput",
    "PrototypeExplainer",
    "ShapeError",
    "UnknownNameError",
    "WeightsError",
    "create_backbone",
    "create_model",
    "get_backbone_spec",
    "list_backbones",
    "percentile_boxes",
]
