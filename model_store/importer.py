"""Import a state_dict saved by the reference ProtoPNet code as a store version.

The reference saves ``model.state_dict()`` (plain tensors: loads with
``weights_only=True``) or the whole pickled model (``torch.save(model)``: loading it
runs code from the file). The latter is refused unless the caller trusts the file.

The architecture comes from the tensors where it can (P, D, prototype shape, K, add-on
depth) and from the caller where it cannot (trunk, image size, activation). Prototype
classes are the reference's contiguous blocks of P / K per class.

Prototype pictures come from a push-free pass over a folder of training images: each
prototype's nearest patch among images of its own class, without changing the weights.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_store.errors import PublishError, UnsafePickleError
from model_store.integrity import sha256_file
from model_store.manifest import Manifest, PrototypeRecord
from model_store.store import DEFAULT_ALIAS, ModelStore, PrototypeVisuals
from protokit.image_files import (
    IMAGE_SUFFIXES,
    ImageFileError,
    class_folders,
    images_under,
    open_image_file,
)
from protopnet import familiarity
from protopnet.backbones import clean_state_dict_keys, get_backbone_spec
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.errors import ShapeError, UnknownNameError, WeightsError
from protopnet.explain import source_boxes
from protopnet.familiarity import Familiarity
from protopnet.model import ProtoPNet, create_model
from protopnet.preprocess import eval_transform, to_model_mode
from protopnet.push import NearestPatchSearch

# Keys of the reference's ProtoPNet that hold no weights of ours.
_IGNORED_KEYS = ("prototype_class_identity",)


@dataclass
class ImportResult:
    manifest: Manifest
    without_images: list[int] = field(default_factory=list)  # prototypes left without pictures
    images_seen: int = 0
    familiarity_skipped: str | None = None  # why no familiarity score was calibrated


# ---------------------------------------------------------------------------------------
# Reading the file


@contextlib.contextmanager
def _on_path(folder: str | Path | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def read_reference_weights(
    path: str | Path, trust_pickle: bool = False, reference_code: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """A reference checkpoint -> a clean state_dict (``module.`` prefixes stripped).

    Plain state_dicts and safetensors load without running any code. A whole-model pickle
    raises UnsafePickleError unless ``trust_pickle``; unpickling it then needs the
    reference code importable (``reference_code``: the reference repository's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"reference weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return clean_state_dict_keys(load_file(str(path)))
        except Exception as exc:
            raise WeightsError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # garbage, not a pickle of objects
            raise WeightsError(f"{str(path)!r} is not a torch checkpoint: {exc}") from exc
        if not trust_pickle:
            raise UnsafePickleError(
                f"{str(path)!r} is a pickled Python object (such as the reference's "
                "torch.save(model)), not a plain state_dict; loading it would run code "
                "stored in the file. Re-save it as a state_dict with the reference code "
                "(torch.save(model.state_dict(), 'weights.pth')), or, only if you trust "
                "where the file came from, pass --trust-pickle (trust_pickle=True)."
            ) from exc
        obj = _load_trusted_pickle(path, reference_code)
    except Exception as exc:
        raise WeightsError(
            f"{str(path)!r} is neither a torch checkpoint nor a safetensors file "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return _as_state_dict(obj, path)


def _load_trusted_pickle(path: Path, reference_code: str | Path | None) -> Any:
    with _on_path(reference_code):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise WeightsError(
                f"unpickling {str(path)!r} needs the code that saved it ({exc}); pass "
                "--reference-code with the reference repository's folder"
            ) from exc


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and "prototype_vectors" not in obj:
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{str(path)!r} does not hold a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{str(path)!r} holds non-tensor entries, e.g. {bad[:3]}")
    return clean_state_dict_keys(obj)


# ---------------------------------------------------------------------------------------
# The architecture


def _tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise WeightsError(
            f"the state_dict has no {key!r}: not a ProtoPNet state_dict with the reference's "
            "key names (prototype_vectors, ones, add_on_layers.*, last_layer.weight, features.*)"
        )
    return state[key]


def infer_architecture(
    state: dict[str, torch.Tensor],
    backbone: str,
    img_size: int = 224,
    activation: str = "log",
    add_on: str | None = None,
    epsilon: float = 1e-4,
) -> ProtoPNetConfig:
    """Rebuild the architecture from the tensors' shapes plus what shapes cannot say."""
    get_backbone_spec(backbone)  # unknown trunk: UnknownNameError listing the valid ones
    P, D, h1, w1 = _tensor(state, "prototype_vectors").shape
    K, P_last = _tensor(state, "last_layer.weight").shape
    if P_last != P:
        raise WeightsError(f"last_layer.weight has {P_last} columns for {P} prototypes")
    if add_on is None:
        # Two 1x1 convs are the "regular" layers, and also what "bottleneck" builds when
        # the trunk has at most 2 D channels: the same modules either way.
        convs = [k for k, v in state.items() if k.startswith("add_on_layers.") and v.dim() == 4]
        add_on = "regular" if len(convs) == 2 else "bottleneck"
    classes: tuple[int, ...] | None = None
    ident = state.get("prototype_class_identity")
    if ident is not None and tuple(ident.shape) == (P, K):
        found = tuple(int(c) for c in ident.argmax(dim=1).tolist())
        if P % K or found != tuple(j // (P // K) for j in range(P)):
            classes = found  # not the contiguous blocks: keep the explicit classes
    if classes is None and P % K:
        raise WeightsError(
            f"{P} prototypes do not split into {K} equal class blocks; the reference "
            "assigns P / K contiguous prototypes to each class"
        )
    try:
        return ProtoPNetConfig(
            backbone=backbone,
            num_classes=K,
            prototypes_per_class=max(1, P // K),
            prototype_classes=classes,
            prototype_depth=D,
            prototype_size=(h1, w1),
            add_on=add_on,  # type: ignore[arg-type]
            activation=activation,  # type: ignore[arg-type]
            epsilon=epsilon,
            img_size=img_size,
        )
    except ValueError as exc:
        raise PublishError(f"invalid architecture settings: {exc}") from None


def build_model(state: dict[str, torch.Tensor], config: ProtoPNetConfig) -> ProtoPNet:
    """The model of ``config`` holding exactly the tensors of ``state``."""
    model = create_model(config)
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape, e.g. {k} {tuple(state[k].shape)} where "
                f"{config.backbone} needs {tuple(expected[k].shape)}"
            )
        raise WeightsError(
            f"the state_dict does not fit a {config.backbone} ProtoPNet with "
            f"{config.add_on} add-on layers: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Push-free pictures


def image_folder(root: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) of every image under root/<class name>/, sorted."""
    if not root.is_dir():
        raise PublishError(f"image folder {str(root)!r} does not exist")
    index = {c: k for k, c in enumerate(class_names)}
    items: list[tuple[Path, int]] = []
    for name in class_folders(root):
        if name not in index:
            raise UnknownNameError("class folder", name, class_names)
        items += [(p, index[name]) for p in images_under(root / name)]
    if not items:
        raise PublishError(
            f"no images under {str(root)!r}: expected <class name>/<image> files "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return items


@dataclass
class FolderPass:
    """What one pass over an import's image folder gives."""

    records: list[PrototypeRecord]
    visuals: dict[int, PrototypeVisuals]
    maps: torch.Tensor  # (P, H', W') self-activation maps (zeros: class without image)
    images_seen: int
    pooled: torch.Tensor  # (N, D) each image's mean latent vector
    labels: torch.Tensor  # (N,) its class


HELD_OUT_EVERY = 5  # every 5th image of the folder calibrates the familiarity score


def folder_familiarity(folder: FolderPass, num_classes: int) -> Familiarity:
    """The familiarity score of an imported model: fitted on 4 in 5 of the folder's
    images, calibrated on the 5th (ShapeError when there are too few)."""
    held = torch.arange(len(folder.labels)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return familiarity.fit(
        folder.pooled[~held],
        folder.labels[~held],
        num_classes,
        folder.pooled[held],
        fitted_on="import images (4 in 5)",
        calibrated_on="import images (1 in 5, held out)",
    )


@torch.inference_mode()
def nearest_patch_pictures(
    model: ProtoPNet,
    prep: Preprocessing,
    class_names: Sequence[str],
    images_dir: str | Path,
    batch_size: int = 32,
    progress: bool = False,
) -> FolderPass:
    """Each prototype's nearest same-class patch over a folder, without moving prototypes,
    and every image's mean latent vector (for the familiarity score)."""
    from tqdm import tqdm

    root = Path(images_dir)
    items = image_folder(root, class_names)
    transform = eval_transform(prep)
    classes = model.prototype_classes.cpu()  # (P,)
    D, h1, w1 = model.prototype_vectors.shape[1:]
    search = NearestPatchSearch(classes, (D, h1, w1))
    pooled = []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc="nearest patches", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        x = torch.stack([transform(_open_image(p)) for p, _ in chunk])  # (B, 3, S, S)
        out = model.forward_full(x)
        labels = torch.tensor([k for _, k in chunk])
        search.update(out.distances, out.features, labels, torch.arange(start, start + len(x)))
        pooled.append(out.features.float().mean(dim=(2, 3)))
    best = search.result()

    P = model.num_prototypes
    maps = torch.zeros(best.distance_map.shape)  # (P, H', W')
    found = best.image_index >= 0
    maps[found] = model.similarity(best.distance_map[found]).float()
    records: list[PrototypeRecord] = []
    visuals: dict[int, PrototypeVisuals] = {}
    for j in range(P):
        k = int(classes[j])
        i = int(best.image_index[j])
        if i < 0:
            records.append(PrototypeRecord(index=j, class_index=k))
            continue
        path = items[i][0]
        img = to_model_mode(_open_image(path), prep)
        pic = np.asarray(img)  # (H, W, 3) uint8, what the model saw before resizing
        W, H = img.size
        canvas, boxes = source_boxes(maps[j : j + 1], (W, H), prep)
        x0, y0, x1, y1 = (int(v) for v in boxes[0].tolist())
        box = (x0, y0, x1, y1)
        rel = path.relative_to(root).as_posix()
        records.append(
            PrototypeRecord(
                index=j,
                class_index=k,
                source_image_id=rel,
                source_path=rel,
                source_size=(W, H),
                patch_hw=(int(best.patch_hw[j, 0]), int(best.patch_hw[j, 1])),
                distance=float(best.distance[j]),
                box=box,
            )
        )
        visuals[j] = PrototypeVisuals.draw(pic, box, canvas[0].numpy())
    labels = torch.tensor([k for _, k in items])
    return FolderPass(records, visuals, maps, len(items), torch.cat(pooled), labels)


def _open_image(path: Path) -> Any:
    try:
        return open_image_file(path)
    except ImageFileError as exc:
        raise PublishError(f"cannot read image {str(path)!r}: {exc}") from None


# ---------------------------------------------------------------------------------------
# The check after publishing

PROBES = 4  # random inputs whose logits the stored version must reproduce


def check_published(store: ModelStore, ref: str, model: ProtoPNet) -> None:
    """The version ``ref``, loaded back from the store, holds ``model``'s tensors and gives
    its logits on a few seeded random inputs; else PublishError naming what differs."""
    loaded = store.load(ref).model.eval()
    want, got = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in set(want) | set(got) if k not in got or k not in want)
    differ += sorted(
        k for k in set(want) & set(got)
        if want[k].shape != got[k].shape or not torch.equal(want[k], got[k])
    )  # fmt: skip
    S = model.config.img_size
    x = torch.rand(PROBES, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(x)[0], loaded(x)[0]  # (PROBES, K)
    gap = float((a - b).abs().max())
    if differ or not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise PublishError(
            f"the published {ref} does not reproduce the checkpoint: its logits on "
            f"{PROBES} probe inputs differ by up to {gap:.3g}"
            + (f"; tensors that differ: {', '.join(differ[:5])}" if differ else "")
            + "; it was removed from the store"
        )


# ---------------------------------------------------------------------------------------
# The whole import


def import_reference(
    store: ModelStore,
    weights: str | Path,
    name: str,
    backbone: str,
    class_names: Sequence[str] | None = None,
    img_size: int = 224,
    activation: str = "log",
    add_on: str | None = None,
    epsilon: float = 1e-4,
    preprocessing: Preprocessing | None = None,
    images_dir: str | Path | None = None,
    batch_size: int = 32,
    trust_pickle: bool = False,
    reference_code: str | Path | None = None,
    aliases: Sequence[str] = (DEFAULT_ALIAS,),
    version: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Publish a reference checkpoint as a store version (source "import-reference").

    ``class_names`` default to the sorted class folders of ``images_dir`` (the order of
    the reference's ImageFolder). ``preprocessing`` defaults to the trunk's mean/std
    with the reference's stretch resize to ``img_size``.
    """
    state = read_reference_weights(weights, trust_pickle, reference_code)
    config = infer_architecture(state, backbone, img_size, activation, add_on, epsilon)
    if class_names is None:
        if images_dir is None:
            raise PublishError(
                "class names are needed: pass class_names (--class-names) or an image "
                "folder whose class sub-folders name them (--images)"
            )
        if not Path(images_dir).is_dir():
            raise PublishError(f"image folder {str(images_dir)!r} does not exist")
        class_names = sorted(p.name for p in Path(images_dir).iterdir() if p.is_dir())
    class_names = list(class_names)
    if len(class_names) != config.num_classes:
        raise PublishError(
            f"{len(class_names)} class names for a checkpoint with {config.num_classes} "
            f"classes (last_layer.weight has {config.num_classes} rows)"
        )
    if preprocessing is None:
        preprocessing = get_backbone_spec(backbone).preprocessing(img_size)
    elif preprocessing.img_size != img_size:
        raise PublishError(
            f"preprocessing.img_size {preprocessing.img_size} differs from img_size {img_size}"
        )
    model = build_model(state, config)

    seen = 0
    maps: torch.Tensor | None = None
    visuals: dict[int, PrototypeVisuals] = {}
    fam: Familiarity | None = None
    skipped: str | None = "no image folder given (--images)"
    if images_dir is not None:
        folder = nearest_patch_pictures(
            model, preprocessing, class_names, images_dir, batch_size, progress
        )
        records, visuals, maps, seen = (
            folder.records, folder.visuals, folder.maps, folder.images_seen
        )  # fmt: skip
        try:
            fam, skipped = folder_familiarity(folder, config.num_classes), None
        except ShapeError as exc:
            skipped = str(exc)
    else:
        records = [
            PrototypeRecord(index=j, class_index=k)
            for j, k in enumerate(config.classes_of_prototypes())
        ]
    digest = sha256_file(Path(weights))
    # Published without aliases, checked, then aliased: a version that does not give the
    # file's logits is removed before any alias points at it.
    manifest = store.publish(
        name,
        model,
        preprocessing,
        class_names,
        records,
        visuals=visuals,
        activation_maps=maps,
        training_config={
            "imported_from": str(Path(weights).resolve()),
            "imported_sha256": digest,
            "images_dir": None if images_dir is None else str(Path(images_dir).resolve()),
            "images_seen": seen,
        },
        aliases=(),
        source="import-reference",
        version=version,
        familiarity=fam,
    )
    try:
        check_published(store, f"{manifest.name}@{manifest.version}", model)
    except BaseException:
        store.remove(manifest.name, manifest.version, force=True)
        raise
    for alias in aliases:
        store.promote(manifest.name, manifest.version, alias)
    without = [j for j in range(config.num_prototypes) if j not in visuals]
    return ImportResult(
        manifest=manifest, without_images=without, images_seen=seen, familiarity_skipped=skipped
    )
