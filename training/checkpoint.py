"""Safe, atomic checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint ``<tag>`` in a folder is two files:

    <tag>-<serial>.safetensors   model state_dict ("model.*"), optimiser tensors
                                 ("optim.<name>.<param>.<key>") and push maps ("push.*")
    <tag>.json                   epoch/unit, configs, optimiser hyper-parameters,
                                 metrics history, push records, seeds, and the name and
                                 SHA-256 of the tensors file it belongs to

The tensors file is written first (temp file + os.replace) under a fresh name, then the
JSON (temp + os.replace) that points at it; only then is the previous tensors file
removed. A run killed at any moment leaves either the old or the new checkpoint whole,
and nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from protokit.atomic import atomic_write, atomic_write_with
from protopnet.errors import ProtoPNetError

FORMAT = 1


class CheckpointError(ProtoPNetError):
    """A checkpoint that is missing, incomplete or does not match its JSON."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Optimiser state <-> flat tensors + JSON


def flatten_optimizer(
    name: str, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state_dict into tensors (safetensors) and plain data (JSON)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of ``flatten_optimizer``: a state_dict for ``load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[field] = value
    for pid, fields in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(fields)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(
    folder: Path, tag: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write checkpoint ``tag`` atomically; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{tag}.json"
    previous = None
    if json_path.is_file():
        try:
            previous = json.loads(json_path.read_text()).get("tensors_file")
        except (OSError, ValueError):
            previous = None
    serial = 0
    while (folder / f"{tag}-{serial:06d}.safetensors").exists():
        serial += 1
    tensors_name = f"{tag}-{serial:06d}.safetensors"
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_with(
        folder / tensors_name, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"})
    )
    record = {
        **meta,
        "format": FORMAT,
        "tensors_file": tensors_name,
        "tensors_sha256": _sha256(folder / tensors_name),
    }
    atomic_write(json_path, json.dumps(record, indent=1, allow_nan=False))
    if previous and previous != tensors_name:
        (folder / previous).unlink(missing_ok=True)
    return json_path


def has_checkpoint(folder: Path, tag: str) -> bool:
    return (Path(folder) / f"{tag}.json").is_file()


def load_checkpoint(folder: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read checkpoint ``tag``; checks that the tensors file is the one the JSON names."""
    folder = Path(folder)
    json_path = folder / f"{tag}.json"
    if not json_path.is_file():
        existing = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise CheckpointError(
            f"no checkpoint {tag!r} in {str(folder)!r}; found: {', '.join(existing) or '(none)'}"
        )
    try:
        meta = json.loads(json_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{str(json_path)!r} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(json_path)!r} has format {meta.get('format')!r}, not {FORMAT}")
    tensors_path = folder / str(meta.get("tensors_file"))
    if not tensors_path.is_file():
        raise CheckpointError(f"{str(tensors_path)!r}, named by {json_path.name}, is missing")
    if _sha256(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"{str(tensors_path)!r} does not match the SHA-256 in {json_path.name}"
        )
    return load_file(str(tensors_path)), meta


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files and orphaned tensors files left by a killed run."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    named = set()
    for j in folder.glob("*.json"):
        try:
            named.add(json.loads(j.read_text()).get("tensors_file"))
        except (OSError, ValueError):
            continue
    for p in folder.iterdir():
        if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.name not in named):
            p.unlink(missing_ok=True)
