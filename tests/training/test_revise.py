"""``python -m training revise`` on real store versions: prototypes removed, the last
layer refitted on the training split, a new version with its lineage; clear errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from model_store import ModelStore
from tests.model_store.conftest import publish_tiny
from tests.support.servers import start_server
from tests.training.conftest import run_cli
from training import engine
from training.config import validate_config
from training.data import build_splits
from training.run import eval_loader


@pytest.mark.slow
def test_revise_publishes_a_mended_version_with_its_lineage(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_root = tmp_path / "store"
    shutil.copytree(parts_run.store, store_root)
    store = ModelStore(store_root)
    before = store.load("parts")
    proc = run_cli(
        "revise", "--model", f"parts@{before.manifest.version}", "--remove", "4,0",
        "--reason", "on the clutter", "--store", str(store_root),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    after = store.load(out["published"])
    m = after.manifest
    assert m.version == "2" and store.aliases("parts")["latest"] == "2"
    assert m.lineage is not None and m.lineage.derived_from == "parts@1"
    assert m.lineage.removed_prototypes == [0, 4] and m.lineage.reason == "on the clutter"
    keep = [j for j in range(12) if j not in (0, 4)]
    assert m.lineage.kept_prototypes == keep
    # The kept prototypes are the same vectors, records and pictures, renumbered.
    assert torch.equal(after.model.prototype_vectors, before.model.prototype_vectors[keep])
    assert [r.source_image_id for r in m.prototypes] == [
        before.manifest.prototypes[j].source_image_id for j in keep
    ]
    for new, old in enumerate(keep):
        assert after.prototype_image_bytes(new, "patch") == before.prototype_image_bytes(
            old, "patch"
        )
    # Its published test accuracy is what the model scores on the test split now.
    cfg = validate_config(
        {k: v for k, v in m.training_config.items() if k not in ("checkpoint", "run_dir")}
    )
    test = build_splits(cfg.data, cfg.train.seed).test
    res = engine.evaluate(
        after.model, eval_loader(test, m.preprocessing, cfg), cfg.train.loss, torch.device("cpu")
    )
    assert m.metrics.test_accuracy == pytest.approx(res["accuracy"])
    assert out["test_accuracy_after"] == pytest.approx(res["accuracy"])
    assert m.interpretability is not None and m.interpretability.prototypes == 10
    assert m.familiarity == before.manifest.familiarity  # the latent space did not change


@pytest.mark.slow
def test_revise_errors_say_what_is_wrong(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = str(parts_run.store)

    def err(*args: str) -> str:
        proc = run_cli("revise", "--store", root, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr

    assert "unknown prototype 99: parts@1 has prototypes 0..11" in err(
        "--model", "parts@1", "--remove", "3,99"
    )
    classes = ModelStore(root).load("parts").model.prototype_class_identity.argmax(dim=1)
    own = ",".join(str(j) for j in torch.nonzero(classes == 1).flatten().tolist())
    assert "without prototypes" in err("--model", "parts@1", "--remove", own)
    assert "prototype indices separated by commas" in err("--model", "parts@1", "--remove", "x")
    assert "unknown version '7'" in err("--model", "parts@7", "--remove", "1")
    tiny = ModelStore(tmp_path / "tiny")
    publish_tiny(tiny)
    proc = run_cli("revise", "--store", str(tiny.root), "--model", "tiny@1", "--remove", "1")
    assert proc.returncode == 2 and "no training configuration and data recorded" in proc.stderr
    assert ModelStore(root).versions("parts") == ["1"]  # nothing was published


@pytest.mark.slow
def test_revise_over_http(parts_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """POST a revision to a real service with an admin key: 202 at once, a second one
    refused while it runs, the record done with what was published, the new version's
    lineage in its JSON and card; a revision the service is stopped during ends failed."""
    store_root = tmp_path / "store"
    shutil.copytree(parts_run.store, store_root)
    key = {"X-API-Key": "admin"}
    server = start_server(
        tmp_path, store_root, default_model="parts", models="parts", admin_keys="admin"
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"remove": [4, 0], "reason": "on the clutter", "by": "dr. reviewer"}
            r = c.post("/models/parts/revisions", json=body, headers=key)
            assert r.status_code == 202, r.text
            started = r.json()
            assert started["state"] == "running" and started["model"] == "parts@1"
            assert r.headers["location"] == started["url"]
            busy = c.post("/models/parts/revisions", json={"remove": [1]}, headers=key)
            assert busy.status_code == 409 and started["id"] in busy.json()["error"]["message"]
            deadline = time.monotonic() + 600
            while (record := c.get(started["url"]).json())["state"] == "running":
                assert time.monotonic() < deadline, record
                time.sleep(0.5)
            assert record["state"] == "done", record
            assert record["result"]["published"] == "parts@2"
            assert record["result"]["removed"] == [0, 4] and record["finished_at"]
            detail = c.get("/models/parts@latest").json()
            assert detail["version"] == "2" and detail["num_prototypes"] == 10
            lineage = detail["lineage"]
            assert (lineage["derived_from"], lineage["removed_prototypes"]) == ("parts@1", [0, 4])
            assert (lineage["reason"], lineage["by"]) == ("on the clutter", "dr. reviewer")
            card = c.get("/models/parts@2/card").text
            assert "Revised from <strong>parts@1</strong>" in card and "on the clutter" in card

            r = c.post("/models/parts@1/revisions", json={"remove": [1]}, headers=key)
            assert r.status_code == 202
            stopped = r.json()
    finally:
        server.stop()
    record = json.loads((store_root / "parts" / ".revisions" / f"{stopped['id']}.json").read_text())
    assert record["state"] == "failed" and "service stopped" in record["error"], record
    assert ModelStore(store_root).versions("parts") == ["1", "2"]  # nothing half-published
