"""SHA-256 of every published file, and the check that a version folder is intact.

``manifest.json`` lists the SHA-256 of every other file in the folder. The manifest
itself is covered by ``manifest.sha256``, written in ``sha256sum`` format so that
``sha256sum -c manifest.sha256`` works from a shell. A folder is intact when both
check out and it holds no file the manifest does not list.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from model_store.errors import IntegrityError
from model_store.manifest import AnyManifest, ManifestBase, parse_manifest

MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Streamed, so that large weight files are never held twice in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_hash_line(digest: str) -> str:
    return f"{digest}  {MANIFEST}\n"


def safe_relative(rel: str) -> bool:
    """A manifest path that stays inside the version folder."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _display(folder: Path, rel: str) -> str:
    return str(folder / rel)


def read_manifest(folder: Path) -> tuple[AnyManifest, str]:
    """Parse ``manifest.json`` after checking it against ``manifest.sha256``.

    Returns the manifest and the manifest file's SHA-256 (a cache key for the version).
    """
    hash_path, man_path = folder / MANIFEST_HASH, folder / MANIFEST
    try:
        recorded = hash_path.read_text(encoding="ascii").split()[0].lower()
    except FileNotFoundError:
        raise IntegrityError(str(hash_path), "missing: the version folder is incomplete") from None
    except (UnicodeDecodeError, IndexError):
        raise IntegrityError(
            str(hash_path), "damaged: expected '<sha256 hex>  manifest.json'"
        ) from None
    try:
        raw = man_path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(str(man_path), "missing: the version folder is incomplete") from None
    actual = sha256_bytes(raw)
    if actual != recorded:
        raise IntegrityError(
            str(man_path),
            f"changed after publishing: SHA-256 is {actual}, {MANIFEST_HASH} records {recorded}",
        )
    try:
        manifest = parse_manifest(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise IntegrityError(
            str(man_path), f"does not match the manifest schema at {where}: {first['msg']}"
        ) from None
    return manifest, actual


def listed_files(folder: Path) -> set[str]:
    """Every file under ``folder`` as a POSIX path relative to it."""
    out: set[str] = set()
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            out.add(Path(dirpath, f).relative_to(folder).as_posix())
    return out


def check_files(
    folder: Path, manifest: ManifestBase, skip: Iterable[str] = (), workers: int = 4
) -> None:
    """Raise IntegrityError naming the first file that is missing, changed or unexpected.

    ``skip``: listed files the caller hashes itself (e.g. weights it reads anyway).
    """
    skipped = set(skip)
    for rel in manifest.files:
        if not safe_relative(rel):
            raise IntegrityError(
                _display(folder, MANIFEST), f"lists a path outside the folder: {rel!r}"
            )
    present = listed_files(folder)
    expected = set(manifest.files) | {MANIFEST, MANIFEST_HASH}
    extra = sorted(present - expected)
    if extra:
        raise IntegrityError(
            _display(folder, extra[0]), "unexpected file: the manifest does not list it"
        )
    links = sorted(rel for rel in present if (folder / rel).is_symlink())
    if links:  # a link could make a "verified" read return any file on the machine
        raise IntegrityError(_display(folder, links[0]), "is a symbolic link, not a file")
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise IntegrityError(_display(folder, missing[0]), "missing: the manifest lists it")
    todo = sorted(rel for rel in manifest.files if rel not in skipped)
    # hashlib releases the GIL on large buffers, so threads overlap reading and hashing.
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        digests = list(pool.map(lambda rel: sha256_file(folder / rel), todo))
    for rel, actual in zip(todo, digests, strict=True):
        check_digest(folder, rel, manifest.files[rel], actual)


def check_digest(folder: Path, rel: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise IntegrityError(
            _display(folder, rel),
            f"changed or truncated after publishing: SHA-256 is {actual}, "
            f"the manifest records {expected}",
        )


def read_verified(folder: Path, manifest: ManifestBase, rel: str) -> bytes:
    """Read one listed file and check its hash on the bytes actually returned."""
    if rel not in manifest.files:
        raise IntegrityError(_display(folder, rel), "not listed in the manifest")
    try:
        data = (folder / rel).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(_display(folder, rel), "missing: the manifest lists it") from None
    check_digest(folder, rel, manifest.files[rel], sha256_bytes(data))
    return data
