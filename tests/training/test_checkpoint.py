"""Checkpoints: safetensors + JSON, atomic, verified; optimiser state survives the trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    flatten_optimizer,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    unflatten_optimizer,
)


def _model_and_adam() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 1e-3},
            {"params": model[2].parameters(), "lr": 3e-3},
        ]
    )
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adam_state_round_trip_continues_identically(tmp_path: Path) -> None:
    model, opt = _model_and_adam()
    _step(model, opt, 3, seed=1)
    tensors, meta = flatten_optimizer("joint", opt)
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    save_checkpoint(tmp_path, "last", tensors, {"optimizers": {"joint": meta}, "epoch": 3})

    loaded, info = load_checkpoint(tmp_path, "last")
    model2, opt2 = _model_and_adam()
    model2.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    opt2.load_state_dict(unflatten_optimizer("joint", loaded, info["optimizers"]["joint"]))
    assert info["epoch"] == 3
    _step(model, opt, 2, seed=2)
    _step(model2, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "best", {"w": torch.ones(2, 3)}, {"note": "x"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best-000000.safetensors", "best.json"]
    meta = json.loads((tmp_path / "best.json").read_text())
    assert meta["tensors_file"] == "best-000000.safetensors" and meta["note"] == "x"
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / names[0]))["w"], torch.ones(2, 3))


def test_a_new_save_replaces_the_old_one_whole(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, {"unit": 1})
    save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, {"unit": 2})
    tensors, meta = load_checkpoint(tmp_path, "last")
    assert meta["unit"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-000001.safetensors", "last.json"]


def test_killed_between_the_two_writes_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    """A tensors file written but its JSON never replaced: the old pair still loads."""
    save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, {"unit": 1})
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "last-000001.safetensors"))  # orphan
    (tmp_path / ".last.json.abc.tmp").write_text("{half")  # a temp file cut short
    tensors, meta = load_checkpoint(tmp_path, "last")
    assert meta["unit"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-000000.safetensors", "last.json"]


def test_tampered_or_missing_files_are_named(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, {})
    with pytest.raises(CheckpointError, match=r"no checkpoint 'best' .* found: last"):
        load_checkpoint(tmp_path, "best")
    f = tmp_path / "last-000000.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\1\1\1\1")
    with pytest.raises(
        CheckpointError, match=r"last-000000\.safetensors.*does not match the SHA-256"
    ):
        load_checkpoint(tmp_path, "last")
    f.unlink()
    with pytest.raises(CheckpointError, match=r"last-000000\.safetensors.*is missing"):
        load_checkpoint(tmp_path, "last")
