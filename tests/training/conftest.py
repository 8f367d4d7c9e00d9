"""Fixtures for the training tests: a tiny synthetic run trained once through the real CLI.

The session-scoped ``parts_run`` trains the shipped synthetic config (shortened) with
``python -m training train ... --export`` in a subprocess and publishes to a temporary
model store; the end-to-end, evaluate, prune, ensemble and export tests read from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# A few seconds of training: 3 classes of the parts dataset, 4 epochs, one push mid-way,
# on the CPU also on a GPU machine (bit-exact resume, DDP with gloo; tests/gpu trains on
# CUDA).
TINY = [
    "train.device=cpu",
    "data.synthetic.num_classes=3",
    "data.synthetic.train_per_class=24",
    "data.synthetic.test_per_class=8",
    "data.synthetic.image_size=24",
    "data.synthetic.part_size=6",
    "train.epochs=3",
    "train.warm_epochs=1",
    "train.push_start=1",
    "train.push_every=5",
    "train.last_layer_epochs=5",
    "train.batch_size=16",
    "model.img_size=24",
    "model.prototypes_per_class=2",
    "model.prototype_depth=16",
]


def overrides_args(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m training <args>`` in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "training", "--no-progress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
    )


@dataclass
class TrainedRun:
    run_dir: Path
    store: Path
    summary: dict[str, Any]
    stdout: str


@pytest.fixture(scope="session")
def parts_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The shipped synthetic config, trained for real and exported to a temp store."""
    base = tmp_path_factory.mktemp("parts_run")
    run_dir, store = base / "run", base / "store"
    proc = run_cli(
        "train",
        "--config",
        "synthetic",
        "--run-dir",
        str(run_dir),
        "--set",
        f"export.store={store}",
        "--export",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    return TrainedRun(run_dir, store, summary, proc.stdout)
