"""The command line: each verb through ``python -m training`` in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.training.conftest import run_cli
from training.cli import main


def _json(stdout: str) -> dict:  # type: ignore[type-arg]
    return json.loads(stdout[stdout.index("{") :])


def test_bad_config_key_exits_2_naming_the_key(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(
        ["train", "--config", "synthetic", "--set", "train.epochz=1", "--run-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epochz: unknown key" in err and "epochs" in err
    assert not (tmp_path / "checkpoints").exists()


def test_missing_dataset_exits_2_with_the_reason(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["train", "--config", "fashion_mnist", "--set", f"data.root={tmp_path}"]
    code = main([*argv, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "dataset-fashion-mnist" in err and "data.download: true" in err


def test_synthetic_verb_writes_image_folders(tmp_path: Path) -> None:
    proc = run_cli(
        "synthetic",
        "--out",
        str(tmp_path),
        "--config",
        "synthetic",
        "--set",
        "data.synthetic.num_classes=2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["green_ring", "red_square"]
    assert (tmp_path / "parts.json").is_file()


@pytest.mark.slow
def test_evaluate_matches_the_runs_summary(parts_run) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("evaluate", "--run-dir", str(parts_run.run_dir), "--split", "test")
    assert proc.returncode == 0, proc.stderr
    out = _json(proc.stdout)
    best = parts_run.summary["best"]
    assert out["accuracy"] == pytest.approx(best["test_accuracy"])
    assert out["balanced_accuracy"] == pytest.approx(best["test_balanced_accuracy"])
    assert out["per_class"] == best["test_per_class"]
    assert "confusion" not in proc.stdout  # K x K numbers: in summary.json, not on screen
    bad = run_cli("evaluate", "--run-dir", str(parts_run.run_dir), "--checkpoint", "nope")
    assert bad.returncode == 2 and "no checkpoint 'nope'" in bad.stderr and "best" in bad.stderr


@pytest.mark.slow
def test_prune_then_export_publishes_a_smaller_model(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("prune", "--run-dir", str(parts_run.run_dir), "--k", "6", "--tau", "3")
    assert proc.returncode == 0, proc.stderr
    info = _json(proc.stdout)
    assert info["prototypes_after"] == info["prototypes_before"] - len(info["pruned"])
    store = tmp_path / "store"
    exp = run_cli(
        "export", "--run-dir", str(parts_run.run_dir), "--checkpoint", "pruned",
        "--name", "parts-pruned", "--store", str(store), "--alias", "candidate",
    )  # fmt: skip
    assert exp.returncode == 0, exp.stderr
    loaded = ModelStore(store).load("parts-pruned@candidate")
    assert loaded.model.num_prototypes == info["prototypes_after"]
    assert len(loaded.manifest.prototypes) == info["prototypes_after"]
    assert loaded.manifest.metrics.test_accuracy == pytest.approx(info["test_accuracy"])
    per_class = loaded.manifest.metrics.test_per_class
    assert per_class is not None
    assert [r.model_dump() for r in per_class] == info["test_per_class"]
    kept = [j for j in range(info["prototypes_before"]) if j not in set(info["pruned"])]
    full = ModelStore(parts_run.store).load("parts").manifest.prototypes
    assert [r.source_image_id for r in loaded.manifest.prototypes] == [
        full[j].source_image_id for j in kept
    ]


@pytest.mark.slow
def test_push_verb_and_ensemble(parts_run) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(
        "push", "--run-dir", str(parts_run.run_dir), "--checkpoint", "last", "--out", "repushed"
    )
    assert proc.returncode == 0, proc.stderr
    out = _json(proc.stdout)
    assert out["checkpoint"] == "repushed" and out["prototypes_per_second"] > 0
    d = str(parts_run.run_dir)
    ens = run_cli("ensemble", "--run-dir", d, "--run-dir", f"{d}:repushed")
    assert ens.returncode == 0, ens.stderr
    res = _json(ens.stdout)
    assert res["members"][0]["accuracy"] == pytest.approx(
        parts_run.summary["best"]["test_accuracy"]
    )
    assert res["ensemble_prototypes"] == sum(m["prototypes"] for m in res["members"])
    assert 0.0 <= res["ensemble_accuracy"] <= 1.0
    assert res["ensemble_accuracy"] >= min(m["accuracy"] for m in res["members"]) - 0.1


@pytest.mark.slow
def test_demo_serves_the_published_model(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`make demo`'s command: with the model already in the store it skips training and
    starts the real service on it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.training.conftest import REPO

    store = tmp_path / "store"
    exp = run_cli(
        "export", "--run-dir", str(parts_run.run_dir), "--name", "fashion-mnist",
        "--alias", "production", "--store", str(store),
    )  # fmt: skip
    assert exp.returncode == 0, exp.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training",
            "--no-progress",
            "demo",
            "--store",
            str(store),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PROTOPNET_REDIS_URL"},  # no Redis
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/models/fashion-mnist", timeout=2)
                if r.status_code == 200:
                    body = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert "fashion-mnist" in str(body) and "red square" in str(body)
        # The bundled example is explained once the service is ready: its report works.
        report = None
        while time.monotonic() < deadline and report is None and proc.poll() is None:
            line = proc.stdout.readline() if proc.stdout else ""
            seen.append(line)
            if "example report:" in line:
                report = line.split("example report:")[1].strip()
        assert report is not None, "the demo printed no example report link"
        page = httpx.get(report, timeout=30)
        assert page.status_code == 200 and "<img" in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = "".join(seen) + (proc.stdout.read() if proc.stdout else "")
    assert f"serving fashion-mnist on http://127.0.0.1:{port}" in out
    assert "reusing fashion-mnist@production" in out  # the store had the model: no training
    assert "published fashion-mnist@" not in out
