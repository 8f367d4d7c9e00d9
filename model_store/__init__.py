"""The model store: versioned, verifiable ProtoPNet (and Drumond) artifacts between training and serving.

store = ModelStore(root)                 # None -> $PROTOPNET_STORE, else ./store
store.publish(name, model, preprocessing, class_names, prototypes, ...)
loaded = store.load("name@production")   # verified, eval mode, CPU
"""

from model_store.errors import (
    IntegrityError,
    InvalidNameError,
    PublishError,
    StoreError,
    UnsafePickleError,
    VersionExistsError,
    WrongKindError,
)
from model_store.manifest import (
    AnyManifest,
    DrumondManifest,
    DrumondPrototype,
    Manifest,
    Metrics,
    PrototypeRecord,
)
from model_store.store import (
    IMAGE_KINDS,
    LoadedDrumond,
    LoadedModel,
    ModelEntry,
    ModelStore,
    PrototypeVisuals,
    prototype_image_path,
)

__all__ = [
    "IMAGE_KINDS",
    "AnyManifest",
    "DrumondManifest",
    "DrumondPrototype",
    "IntegrityError",
    "InvalidNameError",
    "LoadedDrumond",
    "LoadedModel",
    "Manifest",
    "Metrics",
    "ModelEntry",
    "ModelStore",
    "PrototypeRecord",
    "PrototypeVisuals",
    "PublishError",
    "StoreError",
    "UnsafePickleError",
    "VersionExistsError",
    "WrongKindError",
    "prototype_image_path",
]
