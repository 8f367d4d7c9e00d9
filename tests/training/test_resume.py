"""A stopped run resumes where it stopped, and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.conftest import REPO, TINY, overrides_args, run_cli
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.run import RunError, Trainer, plan_units


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run_dir / "checkpoints", "last")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_resume_after_a_stop_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg = load_config("synthetic", TINY)
    n_units = len(plan_units(cfg.train))
    Trainer(cfg, tmp_path / "whole", progress=False).run()

    stopped = Trainer(cfg, tmp_path / "split", progress=False).run(max_units=3)
    assert stopped["stopped_after_units"] == 3
    _, meta = load_checkpoint(tmp_path / "split" / "checkpoints", "last")
    assert meta["units_done"] == 3
    with pytest.raises(RunError, match="already holds a checkpoint; pass --resume"):
        Trainer(cfg, tmp_path / "split", progress=False).run()
    summary = Trainer(cfg, tmp_path / "split", progress=False).run(resume=True)

    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["unit"] for line in lines] == list(range(n_units))
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["best"]["val_accuracy"] == pytest.approx(whole["best"]["val_accuracy"])


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    cfg = load_config("synthetic", TINY)
    Trainer(cfg, tmp_path, progress=False).run(max_units=1)
    changed = load_config("synthetic", [*TINY, "train.batch_size=8"])
    with pytest.raises(RunError, match=r"config differs .*train.batch_size: 16 -> 8"):
        Trainer(changed, tmp_path, progress=False).run(resume=True)


@pytest.mark.slow
def test_a_killed_process_resumes_with_resume(tmp_path: Path) -> None:
    """SIGKILL the real CLI mid-run, then `train --resume` finishes it."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", "synthetic", "--run-dir", str(run_dir), *overrides_args(TINY)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "--no-progress", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = run_dir / "checkpoints" / "last.json"
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                done = json.loads(last.read_text())["units_done"]
            except (ValueError, KeyError):
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, meta = load_checkpoint(run_dir / "checkpoints", "last")  # whole, not half written
    killed_at = meta["units_done"]
    assert killed_at >= 2

    again = run_cli("train", "--resume", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    units = [
        json.loads(line)["unit"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    cfg = load_config(run_dir / "config.yaml")
    assert units == list(range(len(plan_units(cfg.train))))  # every unit exactly once
    assert json.loads((run_dir / "summary.json").read_text())["best"]["test_accuracy"] is not None
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
