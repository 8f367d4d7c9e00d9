"""Concurrent publishers and a publisher killed mid-write, as real separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_store import ModelStore

from .conftest import publish_tiny, tiny_model

REPO = Path(__file__).resolve().parents[2]


def _worker(root: Path, name: str, seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.model_store.publish_worker",
            str(root),
            name,
            str(seed),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_concurrent_publishes_get_distinct_versions(
    store: ModelStore, tmp_path: Path, batch: torch.Tensor
) -> None:
    go = tmp_path / "go"
    seeds = [10, 11, 12]
    procs = [_worker(store.root, "tiny", s, "--go", str(go)) for s in seeds]
    for p in procs:  # every process has imported torch and built its model inputs
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    versions = {}
    for seed, p in zip(seeds, procs, strict=True):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        versions[seed] = out.strip()
    assert sorted(versions.values()) == ["1", "2", "3"]
    assert store.list()[0].versions == ["1", "2", "3"]
    assert store.resolve("tiny") == ("tiny", "3")  # latest is the newest, not the slowest
    for seed, version in versions.items():
        loaded = store.load(f"tiny@{version}")  # each version is whole and is its own model
        with torch.no_grad():
            assert torch.equal(loaded.model(batch)[0], tiny_model(seed)(batch)[0])
    assert not list((store.root / "tiny").glob(".publish-*"))


def test_threads_publishing_at_once_get_distinct_versions(store: ModelStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        manifests = list(pool.map(lambda s: publish_tiny(store, seed=s)[1], range(4)))
    assert sorted(m.version for m in manifests) == ["1", "2", "3", "4"]
    for m in manifests:
        assert store.verify(f"tiny@{m.version}").files == m.files


@pytest.mark.slow
def test_killed_publish_leaves_nothing_loadable(store: ModelStore, batch: torch.Tensor) -> None:
    """SIGKILL a publisher while its temp folder exists; the store must stay whole."""
    folder = store.root / "tiny"
    for _attempt in range(5):
        proc = _worker(store.root, "tiny", 3, "--forever")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait for a publish to be under way
                if folder.is_dir() and any(
                    p.name.startswith(".publish-") for p in folder.iterdir()
                ):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.0005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        leftovers = list(folder.glob(".publish-*"))
        if leftovers:
            break  # the kill landed mid-publish
    else:
        pytest.fail("never caught a publish in progress")

    # Half a version is never visible: every listed version is whole and loads.
    entries = store.list()
    complete = entries[0].versions if entries else []
    for v in complete:
        store.verify(f"tiny@{v}")
    if complete:
        assert store.resolve("tiny")[1] in complete
    # The next publish gets the next number and clears the dead process's temp folder.
    model, manifest = publish_tiny(store, seed=4)
    assert int(manifest.version) == len(complete) + 1
    assert not list(folder.glob(".publish-*"))
    with torch.no_grad():
        assert torch.equal(store.load("tiny").model(batch)[0], model(batch)[0])
