"""The registry of published versions: publish, load, resolve, list, verify, promote, remove.

Layout under the store root::

    <name>/<version>/           one published version (see model_store.manifest); never
                                changed after it appears
    <name>/registry.json        {"aliases": {alias: version}, "highest_version": n}
    <name>/.lock                taken (flock) while versions or aliases change
    <name>/.publish-*/          a publish in progress (or one that crashed); never read

A publish writes everything into a hidden temporary folder and renames it into place,
so a reader sees a whole version or none. Version numbers and aliases change under
an exclusive lock on ``<name>/.lock``, so concurrent publishers (threads or processes)
get distinct versions. Loading checks every file's SHA-256 and never unpickles.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model_store.errors import (
    IntegrityError,
    InvalidNameError,
    PublishError,
    StoreError,
    VersionExistsError,
    WrongKindError,
)
from model_store.integrity import (
    MANIFEST,
    MANIFEST_HASH,
    check_files,
    manifest_hash_line,
    read_manifest,
    read_verified,
    sha256_bytes,
)
from model_store.manifest import (
    AnyManifest,
    DrumondManifest,
    DrumondPrototype,
    FamiliarityInfo,
    Interpretability,
    Lineage,
    Manifest,
    ManifestBase,
    Metrics,
    PrototypeRecord,
)
from protokit.atomic import atomic_write, fsync_dir
from protopnet.config import Preprocessing
from protopnet.drumond import DrumondNet, create_drumond
from protopnet.errors import ShapeError, UnknownNameError, WeightsError
from protopnet.familiarity import METHOD as FAMILIARITY_METHOD
from protopnet.familiarity import Familiarity
from protopnet.model import ProtoPNet, create_model
from protopnet.visualize import crop, draw_boxes, encode_png, overlay

WEIGHTS = "weights.safetensors"
ACTIVATIONS = "prototypes/activations.safetensors"
ACTIVATIONS_KEY = "maps"
FAMILIARITY = "familiarity.safetensors"
IMAGE_KINDS = ("patch", "source", "activation")
NEAREST = "nearest"  # prototypes/<j>_nearest.png, when export drew it (model card)
ImageKind = Literal["patch", "source", "activation"]
DEFAULT_ALIAS = "latest"
REGISTRY = "registry.json"
_TMP_PREFIX = ".publish-"
_RACY_NS = 2_000_000_000  # a change this recent may not show in stat times yet
_STALE_SECONDS = 24 * 3600  # a temp folder of a live process older than this is abandoned
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
M = TypeVar("M", bound=ManifestBase)


def _who() -> str:
    """The user making a change, for the alias history."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _record_move(
    registry: dict[str, Any],
    alias: str,
    version: str,
    forced: bool = False,
    failed: Sequence[str] = (),
    by: str | None = None,
) -> None:
    """Point ``alias`` at ``version`` in ``registry`` and append the move to its history
    (``by``: who moved it; default the user running this process)."""
    previous = registry["aliases"].get(alias)
    registry["aliases"][alias] = version
    registry.setdefault("history", []).append(
        {
            "alias": alias,
            "version": version,
            "previous": previous,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": by or _who(),
            "forced": forced,
            "failed": list(failed),
        }
    )


def prototype_image_path(index: int, kind: str) -> str:
    """Relative path of prototype ``index``'s image of ``kind`` inside a version folder."""
    return f"prototypes/{index}_{kind}.png"


def prototype_image_rel(manifest: Manifest, j: int, kind: str) -> str | None:
    """The manifest's file for prototype j's picture of ``kind``; None when the version
    has none; UnknownNameError for a kind or index the version does not have."""
    if kind not in IMAGE_KINDS:
        raise UnknownNameError("prototype image kind", str(kind), IMAGE_KINDS)
    P = len(manifest.prototypes)
    if not isinstance(j, int) or not 0 <= j < P:
        raise UnknownNameError("prototype", str(j), [f"0..{P - 1}"])
    rel = prototype_image_path(j, kind)
    return rel if rel in manifest.files else None


def check_name(kind: str, value: str) -> str:
    """Model, version and alias names become folder names: keep them plain."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidNameError(
            f"invalid {kind} name {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order, then any named versions alphabetically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass
class PrototypeVisuals:
    """One prototype's pictures, all uint8 RGB (H, W, 3) arrays."""

    patch: np.ndarray  # the 95th-percentile box cropped from the source image
    source: np.ndarray  # the source image with the box drawn
    activation: np.ndarray  # the self-activation heatmap overlaid on the source image
    # The prototype's nearest training patches side by side (the paper's global
    # analysis; model card), or None.
    nearest: np.ndarray | None = None

    @classmethod
    def draw(
        cls, rgb: np.ndarray, box: tuple[int, int, int, int], activation: np.ndarray
    ) -> PrototypeVisuals:
        """The pictures of a prototype found at ``box`` of the source image ``rgb``
        (H, W, 3), with its (H, W) activation map: push and the importer both draw here."""
        return cls(
            patch=crop(rgb, box), source=draw_boxes(rgb, [box]), activation=overlay(rgb, activation)
        )


@dataclass
class ModelEntry:
    """One model name in the store: its versions (oldest first) and aliases."""

    name: str
    versions: list[str]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version


@dataclass
class LoadedModel:
    """A verified version, with its model rebuilt and ready for inference."""

    manifest: Manifest
    model: ProtoPNet  # eval mode, CPU, weights loaded strictly
    path: Path  # the version folder
    manifest_sha256: str  # identifies this exact version (cache keys, ETags)

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def _image_rel(self, j: int, kind: str) -> str | None:
        return prototype_image_rel(self.manifest, j, kind)

    def prototype_image(self, j: int, kind: ImageKind) -> Path | None:
        """Path of prototype j's PNG of ``kind``; None when the version has no such image."""
        rel = self._image_rel(j, kind)
        return None if rel is None else self.path / rel

    def prototype_image_bytes(self, j: int, kind: ImageKind) -> bytes | None:
        """Prototype j's PNG bytes, re-checked against the manifest's hash; None if absent."""
        rel = self._image_rel(j, kind)
        return None if rel is None else read_verified(self.path, self.manifest, rel)

    def nearest_image_bytes(self, j: int) -> bytes | None:
        """Prototype j's strip of nearest training patches (verified); None if absent."""
        rel = prototype_image_path(j, NEAREST)
        return read_verified(self.path, self.manifest, rel) if rel in self.manifest.files else None

    def activation_maps(self) -> torch.Tensor | None:
        """(P, H', W') self-activation similarity maps, or None when not published."""
        if ACTIVATIONS not in self.manifest.files:
            return None
        data = read_verified(self.path, self.manifest, ACTIVATIONS)
        return load_safetensors(data)[ACTIVATIONS_KEY]

    def familiarity(self) -> Familiarity | None:
        """The calibrated familiarity score, or None when the version has none."""
        info = self.manifest.familiarity
        if info is None:
            return None
        data = read_verified(self.path, self.manifest, FAMILIARITY)
        try:
            return Familiarity.from_tensors(
                load_safetensors(data), info.fitted_on, info.fitted_images, info.calibrated_on
            )
        except (ShapeError, ValueError) as exc:  # a hash match with bad content
            raise IntegrityError(str(self.path / FAMILIARITY), str(exc)) from exc


@dataclass
class LoadedDrumond:
    """A verified Drumond version (``protopnet.drumond``), its model rebuilt."""

    manifest: DrumondManifest
    model: DrumondNet  # eval mode, CPU, weights loaded strictly
    path: Path
    manifest_sha256: str

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


# ---------------------------------------------------------------------------------------
# Small file-system helpers


def _write(path: Path, data: bytes) -> str:
    """Write and flush ``data`` to disk; returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return sha256_bytes(data)


def _protopnet(manifest: AnyManifest) -> Manifest:
    if not isinstance(manifest, Manifest):
        ref = f"{manifest.name}@{manifest.version}"
        raise WrongKindError(ref, manifest.kind, "protopnet", "this")
    return manifest


def _plain_json(training_config: dict[str, Any] | None) -> dict[str, Any]:
    config = dict(training_config or {})
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PublishError(f"training_config must be plain JSON data: {exc}") from None
    return config


def _write_weights(tmp: Path, model: torch.nn.Module) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _write(tmp / WEIGHTS, save_safetensors(state, metadata={"format": "pt"}))


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def code_version() -> str:
    """Package version plus the git commit of the checkout it runs from, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("protopnet-service")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return v
    return f"{v}+g{sha}" if sha else v


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_image(j: int, kind: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise PublishError(f"visuals[{j}].{kind} must be a uint8 numpy array, got {got}")
    if not (arr.ndim == 3 and arr.shape[2] == 3 and arr.shape[0] > 0 and arr.shape[1] > 0):
        raise PublishError(
            f"visuals[{j}].{kind} must be an RGB image of shape (H, W, 3), got {arr.shape}"
        )
    return arr


# ---------------------------------------------------------------------------------------
# The store


class ModelStore:
    """A directory of published ProtoPNet versions and the aliases that point at them."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        if root is None:
            root = os.environ.get("PROTOPNET_STORE") or "store"
        self.root = Path(root).expanduser().resolve()
        # ref -> (the name's on-disk signature, (name, version)); see ``resolve``.
        self._resolved: dict[str, tuple[tuple[int, ...], tuple[str, str]]] = {}

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- reading the registry -----------------------------------------------------------
    def names(self) -> builtins.list[str]:
        """Every model name with at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._versions(p.name))

    def _versions(self, name: str) -> builtins.list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        # Temp and removed folders are hidden; any other folder is a version, so a damaged
        # one is reported as damaged rather than silently missing.
        found = [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=version_sort_key)

    def _registry(self, name: str) -> dict[str, Any]:
        path = self.root / name / REGISTRY
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"aliases": {}, "highest_version": 0}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IntegrityError(str(path), "is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("aliases"), dict):
            raise IntegrityError(str(path), "expected {'aliases': {...}, 'highest_version': n}")
        return data

    def versions(self, name: str) -> builtins.list[str]:
        """Published versions of ``name``, oldest first."""
        versions = self._versions(check_name("model", name))
        if not versions:
            raise UnknownNameError("model", name, self.names())
        return versions

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for ``name``."""
        self.versions(name)
        return dict(self._registry(name)["aliases"])

    def list(self) -> builtins.list[ModelEntry]:
        """Every model name with its versions and aliases."""
        out = []
        for name in self.names():
            out.append(
                ModelEntry(name, self._versions(name), dict(self._registry(name)["aliases"]))
            )
        return out

    @staticmethod
    def parse_ref(ref: str) -> tuple[str, str | None]:
        """ "name" -> (name, None); "name@x" -> (name, x)."""
        if not isinstance(ref, str) or not ref:
            raise InvalidNameError(f"invalid model reference {ref!r}: use name or name@version")
        name, sep, rest = ref.partition("@")
        if sep and not rest:
            raise InvalidNameError(
                f"invalid model reference {ref!r}: nothing after '@' (use name@version "
                "or name@alias)"
            )
        return name, (rest if sep else None)

    def _signature(self, name: str) -> tuple[int, ...] | None:
        """What changes whenever ``name``'s versions or aliases do: the model folder's
        stat (a publish or remove renames a folder in it) and registry.json's (every
        alias change replaces the file, so its inode changes). None if either is too
        recent to trust: a change within the file system's timestamp granularity could
        leave them equal (the "racily clean" case git handles the same way)."""
        try:
            d = os.stat(self.root / name)
        except OSError:
            return None
        try:
            r = os.stat(self.root / name / REGISTRY)
            reg: tuple[int, ...] = (r.st_ino, r.st_mtime_ns, r.st_size)
        except FileNotFoundError:
            reg, r = (), d
        newest = max(d.st_mtime_ns, d.st_ctime_ns, r.st_mtime_ns, r.st_ctime_ns)
        if time.time_ns() - newest < _RACY_NS:
            return None
        return (d.st_ino, d.st_mtime_ns, d.st_ctime_ns, d.st_nlink, *reg)

    def resolve(self, ref: str) -> tuple[str, str]:
        """ "name", "name@<version>" or "name@<alias>" -> (name, version).

        A bare name means ``name@latest``; without a "latest" alias, the newest version.
        Answers are remembered while the name's folder and registry.json are unchanged
        (two ``stat`` calls instead of a listing and a JSON read per request).
        """
        hit = self._resolved.get(ref)
        if hit is not None:
            if hit[0] == self._signature(hit[1][0]):
                return hit[1]
            self._resolved.pop(ref, None)
        name, version = self._resolve(ref)
        sig = self._signature(name)
        if sig is not None:
            if len(self._resolved) >= 1024:  # references are client input: keep it bounded
                self._resolved.clear()
            self._resolved[ref] = (sig, (name, version))
        return name, version

    def _resolve(self, ref: str) -> tuple[str, str]:
        name, tag = self.parse_ref(ref)
        if not _NAME_RE.match(name):
            raise UnknownNameError("model", name, self.names())
        versions = self.versions(name)
        aliases = self._registry(name)["aliases"]
        if tag is None:
            tag = DEFAULT_ALIAS if DEFAULT_ALIAS in aliases else versions[-1]
        if tag in versions:
            return name, tag
        if tag in aliases:
            target = str(aliases[tag])
            if target not in versions:
                raise UnknownNameError("version", f"{target} (alias {tag!r} of {name})", versions)
            return name, target
        kind = "version" if tag.isdigit() else "alias"
        raise UnknownNameError(kind, tag, [*versions, *aliases])

    def path(self, ref: str) -> Path:
        """The version folder that ``ref`` resolves to."""
        name, version = self.resolve(ref)
        return self.root / name / version

    # -- load and verify ---------------------------------------------------------------
    def _open(self, ref: str, skip: Sequence[str] = ()) -> tuple[Path, AnyManifest, str]:
        name, version = self.resolve(ref)
        folder = self.root / name / version
        manifest, digest = read_manifest(folder)
        if (manifest.name, manifest.version) != (name, version):
            raise IntegrityError(
                str(folder / MANIFEST),
                f"describes {manifest.name}@{manifest.version} but lies in {name}/{version}",
            )
        check_files(folder, manifest, skip=skip)
        return folder, manifest, digest

    def verify(self, ref: str) -> AnyManifest:
        """Check every file of a version; raises IntegrityError naming the first bad one."""
        return self._open(ref)[1]

    def any_manifest(self, ref: str) -> AnyManifest:
        """The manifest of a version of any kind, checked against manifest.sha256."""
        name, version = self.resolve(ref)
        return read_manifest(self.root / name / version)[0]

    def manifest(self, ref: str) -> Manifest:
        """The manifest of a ProtoPNet version, checked against manifest.sha256 (files not
        hashed); WrongKindError for another kind."""
        return _protopnet(self.any_manifest(ref))

    def prototype_image_bytes(self, manifest: Manifest, j: int, kind: ImageKind) -> bytes | None:
        """Prototype j's PNG of the version ``manifest`` describes, checked against its
        hash, without loading the model; None when the version has no such picture."""
        rel = prototype_image_rel(manifest, j, kind)
        folder = self.root / manifest.name / manifest.version
        return None if rel is None else read_verified(folder, manifest, rel)

    def nearest_image_bytes(self, manifest: ManifestBase, j: int) -> bytes | None:
        """Prototype j's strip of nearest training patches (ProtoPNet) or images
        (Drumond), verified; None if absent."""
        rel = prototype_image_path(j, NEAREST)
        folder = self.root / manifest.name / manifest.version
        return read_verified(folder, manifest, rel) if rel in manifest.files else None

    def _weights(self, folder: Path, manifest: ManifestBase) -> dict[str, torch.Tensor]:
        # Hash the very bytes that are deserialised, so nothing changes in between.
        raw = read_verified(folder, manifest, WEIGHTS)
        try:
            return load_safetensors(raw)
        except Exception as exc:  # a hash match with unreadable content: a publish bug
            raise IntegrityError(str(folder / WEIGHTS), f"unreadable safetensors: {exc}") from exc

    @staticmethod
    def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"{folder / WEIGHTS} does not fit the manifest's architecture: {exc}"
            ) from exc
        model.eval()

    def load(self, ref: str) -> LoadedModel:
        """Verify a ProtoPNet version and rebuild its model (eval mode, CPU, strict
        weights); WrongKindError for another kind."""
        folder, manifest, digest = self._open(ref, skip=(WEIGHTS,))
        manifest = _protopnet(manifest)
        model = create_model(manifest.architecture)
        self._fill(model, self._weights(folder, manifest), folder)
        return LoadedModel(manifest=manifest, model=model, path=folder, manifest_sha256=digest)

    def load_drumond(self, ref: str) -> LoadedDrumond:
        """Verify a Drumond version and rebuild its model (eval mode, CPU, strict weights)."""
        folder, manifest, digest = self._open(ref, skip=(WEIGHTS,))
        if not isinstance(manifest, DrumondManifest):
            raise WrongKindError(
                f"{manifest.name}@{manifest.version}", manifest.kind, "drumond", "load_drumond"
            )
        model = create_drumond(manifest.architecture)
        self._fill(model, self._weights(folder, manifest), folder)
        return LoadedDrumond(manifest=manifest, model=model, path=folder, manifest_sha256=digest)

    # -- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _clean_abandoned(self, d: Path) -> None:
        """Remove temp folders of publishes whose process died (or that are very old)."""
        host = socket.gethostname()
        for p in d.glob(f"{_TMP_PREFIX}*"):
            parts = p.name[len(_TMP_PREFIX) :].split("~")
            pid_ok = len(parts) == 3 and parts[1].isdigit()
            dead = pid_ok and parts[0] == host and not _pid_alive(int(parts[1]))
            try:
                old = time.time() - p.stat().st_mtime > _STALE_SECONDS
            except FileNotFoundError:
                continue
            if dead or old:
                shutil.rmtree(p, ignore_errors=True)

    def publish(
        self,
        name: str,
        model: ProtoPNet,
        preprocessing: Preprocessing,
        class_names: builtins.list[str],
        prototypes: builtins.list[PrototypeRecord],
        visuals: Mapping[int, PrototypeVisuals] | None = None,
        activation_maps: torch.Tensor | None = None,
        training_config: dict[str, Any] | None = None,
        metrics: Metrics | dict[str, Any] | None = None,
        aliases: Sequence[str] = (DEFAULT_ALIAS,),
        source: Literal["training", "import-reference"] = "training",
        version: str | None = None,
        familiarity: Familiarity | None = None,
        interpretability: Interpretability | None = None,
        lineage: Lineage | None = None,
    ) -> Manifest:
        """Write a new immutable version of ``name`` and point ``aliases`` at it.

        ``version=None`` takes the next number ("1", "2", ...). Inputs are checked
        against each other before anything is written; the folder appears atomically.
        """
        check_name("model", name)
        if version is not None:
            check_name("version", version)
            if version.isdigit() and version != str(int(version)):
                raise InvalidNameError(
                    f"invalid version name {version!r}: write numbers without leading zeros "
                    f"({int(version)})"
                )
        alias_list = self._checked_aliases(aliases)
        if version is not None and version in alias_list:
            raise InvalidNameError(f"version {version!r} cannot also be one of its aliases")
        visuals = dict(visuals or {})
        self._check_inputs(model, preprocessing, class_names, prototypes, visuals, activation_maps)
        if familiarity is not None and familiarity.class_means.shape[1] != (
            model.config.prototype_depth
        ):
            raise PublishError(
                f"familiarity fitted on {familiarity.class_means.shape[1]}-channel features, "
                f"but the model's latent features have {model.config.prototype_depth}"
            )
        if isinstance(metrics, dict):
            metrics = Metrics.model_validate(metrics)
        training_config = _plain_json(training_config)

        records = [
            r.model_copy(update={"has_images": r.index in visuals}) for r in prototypes
        ]  # the store, not the caller, says which images exist

        def write(tmp: Path) -> dict[str, str]:
            files = {WEIGHTS: _write_weights(tmp, model)}
            if activation_maps is not None:
                maps = activation_maps.detach().float().cpu().contiguous()  # (P, H', W')
                files[ACTIVATIONS] = _write(
                    tmp / ACTIVATIONS, save_safetensors({ACTIVATIONS_KEY: maps})
                )
            if familiarity is not None:
                files[FAMILIARITY] = _write(
                    tmp / FAMILIARITY, save_safetensors(familiarity.tensors())
                )
            files.update(self._write_images(tmp, visuals))
            return files

        familiarity_info = None
        if familiarity is not None:
            familiarity_info = FamiliarityInfo(
                method=FAMILIARITY_METHOD,
                fitted_on=familiarity.fitted_on,
                fitted_images=familiarity.fitted_images,
                calibrated_on=familiarity.calibrated_on,
                calibration_images=len(familiarity.validation_scores),
                percentiles=familiarity.summary(),
            )

        def describe(chosen: str, files: dict[str, str]) -> Manifest:
            return Manifest(
                name=name,
                version=chosen,
                architecture=model.config,
                preprocessing=preprocessing,
                class_names=list(class_names),
                prototypes=records,
                training_config=training_config,
                metrics=metrics or Metrics(),
                code_version=code_version(),
                source=source,
                familiarity=familiarity_info,
                interpretability=interpretability,
                lineage=lineage,
                files=dict(sorted(files.items())),
            )

        return self._commit(name, version, alias_list, write, describe)

    def publish_drumond(
        self,
        name: str,
        model: DrumondNet,
        preprocessing: Preprocessing,
        class_names: builtins.list[str],
        prototypes: builtins.list[DrumondPrototype],
        nearest: Mapping[int, np.ndarray] | None = None,
        training_config: dict[str, Any] | None = None,
        metrics: Metrics | dict[str, Any] | None = None,
        aliases: Sequence[str] = (DEFAULT_ALIAS,),
        embedded_images: int = 0,
    ) -> DrumondManifest:
        """Write a new version of a Drumond model (``protopnet.drumond``): its weights and
        each prototype's strip of nearest training images (``nearest``: j -> RGB)."""
        check_name("model", name)
        alias_list = self._checked_aliases(aliases)
        config = model.config
        if config is None:
            raise PublishError("the model has no DrumondConfig: build it with create_drumond")
        if len(class_names) != config.num_classes:
            raise PublishError(
                f"{len(class_names)} class names for a model of {config.num_classes} classes"
            )
        if [p.index for p in prototypes] != list(range(config.num_prototypes)):
            raise PublishError(
                f"prototypes must be indexed 0..{config.num_prototypes - 1}, in order"
            )
        if preprocessing.img_size != config.img_size:
            raise PublishError(
                f"preprocessing img_size {preprocessing.img_size} differs from the "
                f"architecture's img_size {config.img_size}"
            )
        plain_config = _plain_json(training_config)
        strips = {j: _check_image(j, NEAREST, a) for j, a in (nearest or {}).items()}
        records = [p.model_copy(update={"has_images": p.index in strips}) for p in prototypes]
        if isinstance(metrics, dict):
            metrics = Metrics.model_validate(metrics)

        def write(tmp: Path) -> dict[str, str]:
            files = {WEIGHTS: _write_weights(tmp, model)}
            for j, arr in strips.items():
                rel = prototype_image_path(j, NEAREST)
                files[rel] = _write(tmp / rel, encode_png(arr))
            return files

        def describe(chosen: str, files: dict[str, str]) -> DrumondManifest:
            return DrumondManifest(
                kind="drumond",
                name=name,
                version=chosen,
                architecture=config,
                preprocessing=preprocessing,
                class_names=list(class_names),
                prototypes=records,
                training_config=plain_config,
                metrics=metrics or Metrics(),
                code_version=code_version(),
                embedded_images=embedded_images,
                files=dict(sorted(files.items())),
            )

        return self._commit(name, None, alias_list, write, describe)

    def _commit(
        self,
        name: str,
        version: str | None,
        alias_list: builtins.list[str],
        write: Callable[[Path], dict[str, str]],
        describe: Callable[[str, dict[str, str]], M],
    ) -> M:
        """Write a version's files (``write`` into a temporary folder: relative path ->
        SHA-256), choose its number under the lock, write the manifest ``describe``
        makes, and rename the folder into place; point ``alias_list`` at it."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{_TMP_PREFIX}{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            files = write(tmp)
            if (tmp / "prototypes").is_dir():
                fsync_dir(tmp / "prototypes")

            with self._locked(name):
                self._clean_abandoned(d)
                registry = self._registry(name)
                existing = self._versions(name)
                clash = [a for a in alias_list if a in existing]
                if clash:
                    raise InvalidNameError(
                        f"alias {clash[0]!r} is already a version of {name}; "
                        "aliases and versions share one namespace"
                    )
                if version is None:
                    numbers = [int(v) for v in existing if v.isdigit()]
                    highest = max([int(registry.get("highest_version", 0)), *numbers, 0])
                    chosen = str(highest + 1)
                else:
                    if version in existing:
                        raise VersionExistsError(
                            f"{name}@{version} already exists; versions never change "
                            f"(existing: {', '.join(existing)})"
                        )
                    if version in registry["aliases"]:
                        raise InvalidNameError(
                            f"{version!r} is already an alias of {name}; pick another version"
                        )
                    chosen = version
                manifest = describe(chosen, files)
                raw = manifest.model_dump_json(indent=2).encode()
                _write(tmp / MANIFEST, raw)
                _write(tmp / MANIFEST_HASH, manifest_hash_line(sha256_bytes(raw)).encode())
                fsync_dir(tmp)
                # rename(2) of a directory fails if the target exists and is not empty, and
                # every version folder holds files: the lock plus this keep versions unique.
                os.rename(tmp, d / chosen)
                fsync_dir(d)
                if chosen.isdigit():
                    registry["highest_version"] = max(
                        int(registry.get("highest_version", 0)), int(chosen)
                    )
                for a in alias_list:
                    _record_move(registry, a, chosen)
                _write_json_atomic(d / REGISTRY, registry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    @classmethod
    def _checked_aliases(cls, aliases: Sequence[str]) -> builtins.list[str]:
        """``aliases`` without repeats, each a valid alias name."""
        alias_list = list(dict.fromkeys(aliases))
        for a in alias_list:
            cls._check_alias_name(a)
        return alias_list

    @staticmethod
    def _check_alias_name(alias: str) -> None:
        check_name("alias", alias)
        if alias.isdigit():
            raise InvalidNameError(
                f"invalid alias name {alias!r}: all-digit names are reserved for versions"
            )

    @staticmethod
    def _check_inputs(
        model: ProtoPNet,
        preprocessing: Preprocessing,
        class_names: builtins.list[str],
        prototypes: builtins.list[PrototypeRecord],
        visuals: dict[int, PrototypeVisuals],
        activation_maps: torch.Tensor | None,
    ) -> None:
        config = model.config
        P, K = model.num_prototypes, model.num_classes
        if config.num_prototypes != P or config.num_classes != K:
            raise PublishError(
                f"model.config says {config.num_prototypes} prototypes and "
                f"{config.num_classes} classes but the model has {P} and {K}"
            )
        if preprocessing.img_size != config.img_size:
            raise PublishError(
                f"preprocessing.img_size {preprocessing.img_size} differs from the "
                f"architecture's img_size {config.img_size}"
            )
        if len(class_names) != K:
            raise PublishError(f"{len(class_names)} class names for a model with {K} classes")
        if len(set(class_names)) != len(class_names):
            dup = sorted({c for c in class_names if class_names.count(c) > 1})
            raise PublishError(f"class names must be unique; repeated: {dup[:5]}")
        if len(prototypes) != P:
            raise PublishError(f"{len(prototypes)} prototype records for {P} prototypes")
        classes = config.classes_of_prototypes()
        for row, rec in enumerate(prototypes):
            if rec.index != row:
                raise PublishError(f"prototype record at row {row} has index {rec.index}")
            if rec.class_index != classes[row]:
                raise PublishError(
                    f"prototype {row} is recorded with class {rec.class_index} but the "
                    f"model assigns it class {classes[row]}"
                )
        bad = sorted(j for j in visuals if not (isinstance(j, int) and 0 <= j < P))
        if bad:
            raise PublishError(f"visuals for prototypes {bad[:5]} outside 0..{P - 1}")
        for j, vis in visuals.items():
            for kind in IMAGE_KINDS:
                _check_image(j, kind, getattr(vis, kind, None))
        if activation_maps is not None:
            shape = tuple(activation_maps.shape)
            if activation_maps.dim() != 3 or shape[0] != P:
                raise PublishError(f"activation_maps must be (P={P}, H', W'), got {shape}")

    @staticmethod
    def _write_images(tmp: Path, visuals: dict[int, PrototypeVisuals]) -> dict[str, str]:
        """Encode and write every PNG; ``encode_png`` releases the GIL, so use threads."""
        (tmp / "prototypes").mkdir(exist_ok=True)
        jobs = [(j, kind) for j in sorted(visuals) for kind in IMAGE_KINDS]
        jobs += [(j, NEAREST) for j in sorted(visuals) if visuals[j].nearest is not None]

        def one(job: tuple[int, str]) -> tuple[str, str]:
            j, kind = job
            rel = prototype_image_path(j, kind)
            return rel, _write(tmp / rel, encode_png(getattr(visuals[j], kind)))

        if not jobs:
            return {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(pool.map(one, jobs))

    # -- aliases and removal ------------------------------------------------------------
    def promote(
        self,
        name: str,
        target: str,
        alias: str,
        forced: bool = False,
        failed: Sequence[str] = (),
        by: str | None = None,
    ) -> str:
        """Point ``alias`` of ``name`` at ``target`` (a version or another alias).

        Creates the alias or moves it; returns the version it now points at. Every move
        (publishing's too) is appended to the registry's alias history
        (``alias_history``): when, by whom,
        from which version, and, for a move the promotion gate refused and ``forced``
        let through, the figures that failed (``failed``).
        """
        self._check_alias_name(alias)
        _, version = self.resolve(f"{name}@{target}")
        with self._locked(name) as d:
            if alias in self._versions(name):
                raise InvalidNameError(
                    f"{alias!r} is a version of {name}; an alias cannot shadow a version"
                )
            if version not in self._versions(name):  # removed meanwhile
                raise UnknownNameError("version", version, self._versions(name))
            registry = self._registry(name)
            _record_move(registry, alias, version, forced, failed, by)
            _write_json_atomic(d / REGISTRY, registry)
        return version

    def alias_history(self, name: str) -> builtins.list[dict[str, Any]]:
        """Every alias move of ``name``, oldest first (``promote``)."""
        check_name("model", name)
        return list(self._registry(name).get("history", []))

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete an alias (the version stays)."""
        aliases = self.aliases(name)
        if alias not in aliases:
            raise UnknownNameError("alias", alias, aliases)
        with self._locked(name) as d:
            registry = self._registry(name)
            registry["aliases"].pop(alias, None)
            _write_json_atomic(d / REGISTRY, registry)

    def remove(self, name: str, version: str, force: bool = False) -> builtins.list[str]:
        """Delete one version. Returns the aliases that were moved or dropped.

        "latest" moves to the newest remaining version. Any other alias pointing at the
        version makes this refuse unless ``force`` (then those aliases are dropped).
        """
        versions = self.versions(name)
        if version not in versions:
            raise UnknownNameError("version", version, versions)
        with self._locked(name) as d:
            registry = self._registry(name)
            aliases: dict[str, str] = registry["aliases"]
            pointing = sorted(a for a, v in aliases.items() if v == version)
            pinned = [a for a in pointing if a != DEFAULT_ALIAS]
            if pinned and not force:
                raise StoreError(
                    f"{name}@{version} is aliased as {', '.join(pinned)}; move the alias "
                    "first (promote) or remove with force"
                )
            folder = d / version
            if not folder.is_dir():
                raise UnknownNameError("version", version, self._versions(name))
            # Rename first: readers stop finding it at once, deletion can take its time.
            trash = d / f".removed-{version}-{uuid.uuid4().hex}"
            os.rename(folder, trash)
            remaining = self._versions(name)
            for a in pointing:
                if a == DEFAULT_ALIAS and remaining:
                    aliases[a] = remaining[-1]
                else:
                    del aliases[a]
            _write_json_atomic(d / REGISTRY, registry)
        shutil.rmtree(trash, ignore_errors=True)
        return pointing

    # -- inspection helpers for the command line -----------------------------------------
    def describe(self, ref: str) -> dict[str, Any]:
        """A JSON-ready summary of one version (for ``show``)."""
        name, version = self.resolve(ref)
        m = self.any_manifest(f"{name}@{version}")
        aliases = sorted(a for a, v in self._registry(name)["aliases"].items() if v == version)
        images = sum(1 for p in m.prototypes if p.has_images)
        pruned = sum(1 for p in m.prototypes if isinstance(p, PrototypeRecord) and p.pruned)
        return {
            "ref": f"{name}@{version}",
            "aliases": aliases,
            "created_at": m.created_at.isoformat(),
            "kind": m.kind,
            "source": getattr(m, "source", "training"),
            "code_version": m.code_version,
            "architecture": m.architecture.model_dump(mode="json"),
            "preprocessing": m.preprocessing.model_dump(mode="json"),
            "num_classes": len(m.class_names),
            "class_names": m.class_names,
            "num_prototypes": len(m.prototypes),
            "pruned_prototypes": pruned,
            "prototypes_with_images": images,
            "has_activation_maps": ACTIVATIONS in m.files,
            "metrics": m.metrics.model_dump(mode="json"),
            "files": len(m.files) + 2,
            "bytes": sum((self.root / name / version / rel).stat().st_size for rel in m.files),
            "path": str(self.root / name / version),
        }
