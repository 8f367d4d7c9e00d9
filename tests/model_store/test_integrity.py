"""Tamper detection: one changed byte, a truncation, a missing or an extra file."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from model_store import IntegrityError, ModelStore

from .conftest import publish_tiny

FILES = [
    "weights.safetensors",
    "familiarity.safetensors",
    "prototypes/activations.safetensors",
    "prototypes/0_patch.png",
    "prototypes/3_source.png",
    "prototypes/5_activation.png",
    "manifest.json",
    "manifest.sha256",
]


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * at))
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def published(store: ModelStore) -> Path:
    publish_tiny(store)
    return store.root / "tiny" / "1"


def test_fresh_version_verifies(store: ModelStore, published: Path) -> None:
    manifest = store.verify("tiny")
    assert manifest.version == "1"
    # The manifest hash file is in sha256sum's format, so a shell can check it too.
    subprocess.run(["sha256sum", "-c", "--quiet", "manifest.sha256"], cwd=published, check=True)
    for rel, digest in manifest.files.items():
        assert hashlib.sha256((published / rel).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("rel", FILES)
def test_one_changed_byte_is_refused_naming_the_file(
    store: ModelStore, published: Path, rel: str
) -> None:
    _flip(published / rel)
    for action in (store.verify, store.load):
        with pytest.raises(IntegrityError) as e:
            action("tiny")
        if rel == "manifest.sha256":  # either file of the pair may be the changed one
            assert "manifest.json" in str(e.value) and "manifest.sha256" in str(e.value)
        else:
            assert e.value.path == str(published / rel)
            assert str(published / rel) in str(e.value)


@pytest.mark.parametrize("rel", ["weights.safetensors", "prototypes/1_patch.png"])
def test_truncated_file_is_refused(store: ModelStore, published: Path, rel: str) -> None:
    path = published / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="changed or truncated after publishing") as e:
        store.load("tiny@1")
    assert e.value.path == str(path)


@pytest.mark.parametrize("rel", ["weights.safetensors", "prototypes/2_source.png"])
def test_missing_file_is_refused(store: ModelStore, published: Path, rel: str) -> None:
    (published / rel).unlink()
    with pytest.raises(IntegrityError, match="missing: the manifest lists it") as e:
        store.load("tiny")
    assert e.value.path == str(published / rel)


@pytest.mark.parametrize("rel", ["manifest.json", "manifest.sha256"])
def test_missing_manifest_files_are_refused(store: ModelStore, published: Path, rel: str) -> None:
    (published / rel).unlink()
    assert store.list()[0].versions == ["1"]  # still listed, so the damage is visible
    with pytest.raises(IntegrityError, match="missing: the version folder is incomplete") as e:
        store.load("tiny")
    assert e.value.path == str(published / rel)


def test_extra_file_is_refused(store: ModelStore, published: Path) -> None:
    (published / "prototypes" / "9_patch.png").write_bytes(b"\x89PNG planted")
    with pytest.raises(IntegrityError, match="unexpected file") as e:
        store.verify("tiny")
    assert e.value.path == str(published / "prototypes" / "9_patch.png")


def test_consistent_rewrite_of_the_manifest_must_match_its_folder(
    store: ModelStore, published: Path
) -> None:
    """A version copied into another folder (hashes rewritten to match) is refused."""
    import shutil

    shutil.copytree(published, store.root / "tiny" / "7")
    with pytest.raises(IntegrityError, match="describes tiny@1 but lies in tiny/7"):
        store.load("tiny@7")


def test_images_are_rechecked_when_read_later(store: ModelStore, published: Path) -> None:
    loaded = store.load("tiny")
    _flip(published / "prototypes" / "4_patch.png")
    _flip(published / "prototypes" / "activations.safetensors")
    with pytest.raises(IntegrityError, match=r"4_patch\.png"):
        loaded.prototype_image_bytes(4, "patch")
    with pytest.raises(IntegrityError, match=r"activations\.safetensors"):
        loaded.activation_maps()


def test_symbolic_link_is_refused(store: ModelStore, published: Path, tmp_path: Path) -> None:
    png = published / "prototypes" / "0_patch.png"
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(png.read_bytes())  # same bytes, so only the link itself is wrong
    png.unlink()
    png.symlink_to(copy)
    with pytest.raises(IntegrityError, match="is a symbolic link") as e:
        store.load("tiny")
    assert e.value.path == str(png)
